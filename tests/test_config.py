import pytest

from raytrain_spot.config.overrides import unknown_override_key
from raytrain_spot.config.errors import ConfigError
from raytrain_spot.config.schema import load_config
from raytrain_spot.train.task import build_task
from tests.conftest import run_main


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
    ("trainer.failure_settle_s=-1", "trainer.failure_settle_s"),
    # sections whose checks once named another key, or several at once
    ("checkpoint.milestone_every_steps=-1", "checkpoint.milestone_every_steps"),
    ("checkpoint.final_upload_wait_s=-1", "checkpoint.final_upload_wait_s"),
    ("alerts.min_wall_s=-1", "alerts.min_wall_s"),
    ("alerts.fallback_nodes=0", "alerts.fallback_nodes"),
    ("monitoring.wandb_mode=sometimes", "monitoring.wandb_mode"),
])
def test_bad_values_name_the_key_and_the_fix(compose, override, key):
    with pytest.raises(ConfigError) as error:
        load_config(compose("+experiment=vlm", override))
    assert str(error.value).count("Fix:") == 1, "one key at a time"
    message = str(error.value)
    assert message.startswith(key + ":")
    assert "Fix:" in message


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
