import json
import os
import subprocess
import tempfile

import pytest

from raytrain_spot.settings import unknown_override_key
from raytrain_spot.config.errors import ConfigError
from raytrain_spot.config.schema import load_config
from raytrain_spot.settings import checked_task
from raytrain_spot.loop.task import build_task
from tests.conftest import processes_of, run_main


def test_experiment_composes_into_typed_config(compose):
    cfg = load_config(compose("+experiment=vlm", "trainer.max_steps=7"))
    assert cfg.trainer.max_steps == 7
    assert cfg.run.name.startswith("vlm-")
    assert cfg.task["data"]["image_size"] == cfg.task["model"]["image_size"]
    assert cfg.cluster.embedded


def test_model_presets_are_valid(compose):
    for preset in ("tiny", "small", "base"):
        task = build_task(load_config(compose("+experiment=vlm", f"task/model={preset}")).task)
        assert task.model.preset == preset
        assert task.data.image_size == task.model.image_size


@pytest.mark.parametrize("override, key", [
    ("trainer.global_batch_size=2", "trainer.global_batch_size"),
    ("trainer.min_workers=4", "trainer.min_workers"),
    ("task.model.patch_size=7", "task.model.patch_size"),
    ("task.model.num_heads=5", "task.model.num_heads"),
    ("checkpoint.keep_latest_k=1", "checkpoint.keep_latest_k"),
    ("storage.uri=s3://bucket/x", "storage.uri"),
    ("storage.uri=gs://Bad_Bucket/x", "storage.uri"),
    ("task.data.image_size=48", "task.data.image_size"),
    ("run.name=has/slash", "run.name"),
    ("cluster.num_worker_nodes=0", "cluster.num_worker_nodes"),
    ("elastic.failure_settle_s=-1", "elastic.failure_settle_s"),
    ("elastic.survivor_commit_s=-1", "elastic.survivor_commit_s"),
    ("trainer.data_workers=-1", "trainer.data_workers"),
    # sections whose checks once named another key, or several at once
    ("checkpoint.milestone_every_steps=-1", "checkpoint.milestone_every_steps"),
    ("checkpoint.final_upload_wait_s=-1", "checkpoint.final_upload_wait_s"),
    ("alerts.min_wall_s=-1", "alerts.min_wall_s"),
    ("alerts.fallback_nodes=0", "alerts.fallback_nodes"),
    ("monitoring.wandb_mode=sometimes", "monitoring.wandb_mode"),
])
def test_bad_values_name_the_key_and_the_fix(compose, override, key):
    with pytest.raises(ConfigError) as error:
        checked_task(load_config(compose("+experiment=vlm", override)))
    assert str(error.value).count("Fix:") == 1, "one key at a time"
    message = str(error.value)
    assert message.startswith(key + ":")
    assert "Fix:" in message


def test_loader_processes_default_to_two_per_gpu_worker_and_none_on_cpu(compose):
    assert load_config(compose("+experiment=hf_vlm")).trainer.loader_processes == 0
    assert load_config(compose("+experiment=hf_vlm", "trainer.use_gpu=true")).trainer.loader_processes == 2
    assert load_config(compose("+experiment=hf_vlm", "trainer.use_gpu=true",
                               "trainer.data_workers=0")).trainer.loader_processes == 0


def test_chaos_margin_must_leave_time_before_the_kill(compose):
    with pytest.raises(ConfigError, match="chaos.margin_s"):
        load_config(compose("+experiment=vlm", "+chaos=events", "chaos.notice_s=4", "chaos.margin_s=5"))
    with pytest.raises(ConfigError, match="chaos.trace: trace mode needs a trace file"):
        load_config(compose("+experiment=vlm", "+chaos=trace"))


def test_sharded_checkpoints_refuse_compression(compose):
    with pytest.raises(ConfigError, match="checkpoint.compression: zstd applies to single-file checkpoints"):
        load_config(compose("+experiment=vlm", "checkpoint.sharded=true", "checkpoint.compression=zstd"))
    assert load_config(compose("+experiment=vlm", "checkpoint.sharded=true")).checkpoint.sharded


def test_min_workers_must_fit_the_embedded_cluster(compose):
    with pytest.raises(ConfigError, match="trainer.min_workers"):
        load_config(compose("+experiment=vlm", "trainer.min_workers=3", "cluster.num_worker_nodes=2"))


def test_wrong_type_is_rejected_by_the_schema(compose):
    with pytest.raises(Exception, match="trainer.max_steps"):
        compose("+experiment=vlm", "trainer.max_steps=lots")


def test_unknown_key_is_rejected(compose):
    with pytest.raises(Exception, match="max_stepz"):
        compose("+experiment=vlm", "trainer.max_stepz=3")


def test_unknown_key_gets_a_suggestion():
    assert unknown_override_key(["+experiment=vlm", "trainer.max_stepz=3"]) == \
        "trainer.max_stepz: no such setting. Fix: did you mean trainer.max_steps?"
    assert unknown_override_key(["task.model.text_layerz=1"]) == \
        "task.model.text_layerz: no such setting. Fix: did you mean task.model.text_layers?"
    assert "settings under task.model are" in unknown_override_key(["task.model.zzz=1"])
    assert unknown_override_key(["+experiment=vlm", "task/model=small", "trainer.max_steps=3", "hydra.run.dir=x",
                                 "task.data.path=/x"]) is None


def test_main_command_stops_before_ray_on_a_bad_value(tmp_path):
    result = run_main("+experiment=vlm", "trainer.global_batch_size=1", cwd=str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert "trainer.global_batch_size" in result.stderr and "Fix:" in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs" / "storage").exists()


@pytest.mark.parametrize("url", ["ftp://hooks.example/T0KEN", "http://hooks.example/T0KEN", "hooks.example/T0KEN"])
def test_a_webhook_url_must_be_https_and_is_never_echoed(compose, url):
    with pytest.raises(ConfigError, match="alerts.webhook_url") as error:
        load_config(compose("+experiment=vlm", f"alerts.webhook_url={url}"))
    assert "T0KEN" not in str(error.value)


def test_secrets_are_redacted_from_what_checkpoints_and_workers_get(compose):
    cfg = load_config(compose("+experiment=vlm", "alerts.webhook_url=https://hooks.example/T0KEN"))
    assert cfg.alerts.webhook_url == "https://hooks.example/T0KEN"
    assert "T0KEN" not in str(cfg.to_dict())
    assert load_config(compose("+experiment=vlm", "alerts.webhook_url=http://127.0.0.1:9/T0KEN")).alerts.webhook_url


@pytest.mark.parametrize("override, key", [
    ("chaos.provisioning_s=-1", "chaos.provisioning_s"),
    ("chaos.margin_s=-1", "chaos.margin_s"),
    ("chaos.events=[{action:preempt,at_step:3,after_s:-1}]", "chaos.events[].after_s"),
    ("chaos.events=[{action:preempt,at_step:3,metadata_delay_s:-2}]", "chaos.events[].metadata_delay_s"),
])
def test_simulator_settings_name_the_one_bad_key(compose, override, key):
    with pytest.raises(ConfigError, match=r"^" + key.replace("[", r"\[").replace("]", r"\]") + ":"):
        load_config(compose("+experiment=vlm", "+chaos=events", override))


def _stops_before_ray(cwd, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the main command that must refuse its input: exit 2, and no Ray process or session made."""
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")
    result = run_main(*overrides, cwd=str(cwd), timeout=120, env={"RAY_TMPDIR": ray_tmp, **(env or {})})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert not os.path.exists(os.path.join(ray_tmp, "ray")) and processes_of(ray_tmp) == [], "Ray was started"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


TRACE = ["+experiment=vlm", "+chaos=trace", "chaos.trace={tmp}/trace.json"]


@pytest.mark.parametrize("overrides, trace, message", [
    (["+experiment=vlmm"], None, "experiment: there is no 'vlmm'. Fix: use one of hf_vlm, timed, vlm"),
    (["+experiment=vlm", "task/model=huge"], None, "task/model: there is no 'huge'. Fix: use one of base, small, tiny"),
    (["+experiment=vlm", "trainer.max_steps=abc"], None,
     "trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer. Fix:"),
    (["+experiment=vlm", "trainer.max_steps=["], None, "trainer.max_steps=[: "),
    (["+experiment=vlm", "chaos.notice_s=5"], None,
     "chaos.notice_s: the chaos group is off, so it has no settings. Fix: select it first, e.g. +chaos=events "
     "chaos.notice_s=5"),
    (TRACE, '{"metadata": {"gap_seconds": 30}, "data": [1, 2', "chaos.trace: {tmp}/trace.json is not JSON"),
    (TRACE, '{"data": [1, 2]}', 'chaos.trace: {tmp}/trace.json has no "metadata" object. Fix:'),
    (TRACE, '{"metadata": {"gap_seconds": 30}, "data": [1, "two"]}',
     'chaos.trace: {tmp}/trace.json has a "data" entry that is not a node count'),
    (TRACE + ["chaos.start_tick=5"], '{"metadata": {"gap_seconds": 30}, "data": [1, 2]}',
     "chaos.start_tick: 5 is past the trace's 2 ticks. Fix: set chaos.start_tick below 2"),
], ids=["experiment", "group-option", "type", "syntax", "group-off", "trace-json", "trace-keys", "trace-counts",
        "trace-start"])
def test_every_bad_input_stops_before_ray_with_exit_2_naming_the_setting_and_the_fix(tmp_path, overrides, trace,
                                                                                      message):
    if trace is not None:
        (tmp_path / "trace.json").write_text(trace)
    result = _stops_before_ray(tmp_path, *[o.format(tmp=tmp_path) for o in overrides])
    assert f"Configuration error: {message.format(tmp=tmp_path)}" in result.stderr, result.stderr[-3000:]
    assert "Fix:" in result.stderr


SECRET = "T0KEN-cfg-5e3d"
WEBHOOK = f"https://hooks.example/{SECRET}"


def test_a_literal_secret_on_the_command_line_is_refused_and_written_nowhere(tmp_path):
    result = _stops_before_ray(tmp_path, "+experiment=vlm", f"alerts.webhook_url={WEBHOOK}")
    assert "Configuration error: alerts.webhook_url: a secret on the command line" in result.stderr
    assert "alerts.webhook_url='${oc.env:ALERTS_WEBHOOK_URL}'" in result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert subprocess.run(["grep", "-rl", SECRET, str(tmp_path)], capture_output=True, text=True).stdout == ""


@pytest.mark.parametrize("stop", ["config", "storage"])
def test_no_secret_reaches_the_runs_files_when_it_stops_on_an_error(tmp_path, stop):
    """A secret from the environment and one written in a config file of the user's own: the run's
    .hydra/ record holds neither, whichever check stops the run."""
    from tests.servers.fake_gcs import FakeGcsServer

    user_conf = tmp_path / "my_conf" / "experiment"
    user_conf.mkdir(parents=True)
    (user_conf / "hooked.yaml").write_text(f"# @package _global_\nalerts:\n  webhook_url: {WEBHOOK}\n")
    from_env = ["+experiment=vlm", "run.name=env", "alerts.webhook_url=${oc.env:ALERT_WEBHOOK}"]
    from_file = ["--config-dir", str(tmp_path / "my_conf"), "+experiment=hooked", "run.name=file"]
    with FakeGcsServer(log_path=str(tmp_path / "gcs.log")) as server:
        error = ["trainer.global_batch_size=1"] if stop == "config" else ["storage.uri=gs://no-such-bucket-x/runs"]
        env = {"ALERT_WEBHOOK": WEBHOOK, **server.env()}
        for overrides in (from_env, from_file):
            result = _stops_before_ray(tmp_path, *overrides, *error, env=env)
            expected = "trainer.global_batch_size" if stop == "config" else "bucket 'no-such-bucket-x'"
            assert expected in result.stderr, result.stderr[-3000:]
    leaked = subprocess.run(["grep", "-rl", SECRET, str(tmp_path / "outputs")], capture_output=True, text=True).stdout
    assert leaked == "", f"the webhook token was written to {leaked}"
    for run in ("env", "file"):
        record = tmp_path / "outputs" / run / ".hydra"
        assert sorted(os.listdir(record)) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
        assert {oct(p.stat().st_mode & 0o777) for p in record.iterdir()} == {"0o600"}
    assert "${oc.env:ALERT_WEBHOOK}" in (tmp_path / "outputs" / "env" / ".hydra" / "config.yaml").read_text()


@pytest.mark.parametrize("experiment", ["vlm", "hf_vlm", "timed"])
def test_every_setting_of_a_built_in_task_can_be_overridden(compose, experiment):
    """The task group's YAML holds every field of the task's settings: Hydra refuses an override of a
    key the composed config lacks (``task.data.cache_dir=DIR``: "not in struct")."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    from raytrain_spot.loop.task import task_class

    def fields(cls) -> dict:
        hints = typing.get_type_hints(cls)
        return {f.name: fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else None
                for f in dataclasses.fields(cls)}

    def keys(values: dict) -> dict:
        return {k: keys(v) if isinstance(v, dict) else None for k, v in values.items() if k != "_target_"}

    composed = OmegaConf.to_container(compose(f"+experiment={experiment}").task)
    assert keys(composed) == fields(task_class(composed["_target_"]))
