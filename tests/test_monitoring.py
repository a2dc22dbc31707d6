"""Monitoring: TensorBoard files read back record by record, Ray gauges scraped from Prometheus, the
event feed driving the sinks."""

import json
import os
import socket
import struct
import time
import urllib.request
from collections import defaultdict

import pytest

from raytrain_spot.config.monitoring import LOW_GOODPUT, NOTIFY, AlertConfig, AlertRule, MonitoringConfig
from raytrain_spot.monitor.alerts import AlertRunner
from raytrain_spot.observe.events import EventFeed
from raytrain_spot.cost.ledger import build_ledger
from raytrain_spot.config.schema import Config
from raytrain_spot.monitor.metrics import (TENSORBOARD_DIR, MonitoringSink,
                                      RayMetricsWriter, TensorBoardWriter, build_writers, wandb_run_id)
from raytrain_spot.cost.pricing import PriceCatalog
from tests.test_alerts import slow_run
from tests.test_ledger import T0, preempted_run


def masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_scalars(logdir):
    """tag -> [(step, value, wall_time)] from TFRecord event files, checksums verified."""
    from tensorboardX.proto import event_pb2

    scalars = defaultdict(list)
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        offset = 0
        while offset < len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked_crc(header)
            payload = data[offset + 12:offset + 12 + length]
            assert struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] == masked_crc(payload)
            offset += 16 + length
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars[value.tag].append((event.step, value.simple_value, event.wall_time))
    return scalars


def test_tensorboard_holds_the_run_as_the_records_tell_it(tmp_path):
    log = preempted_run()
    logdir = str(tmp_path / TENSORBOARD_DIR)
    catalog = PriceCatalog.load()
    sink = MonitoringSink([TensorBoardWriter(logdir)], catalog)
    for record in log.records:
        sink.write(record)
    sink.close()
    scalars = read_scalars(logdir)

    steps = [r for r in log.records if r["ev"] == "step"]
    assert [(s, pytest.approx(v)) for s, v, _ in scalars["train/loss"]] == [(r["step"], r["loss"]) for r in steps]
    assert [w for _, _, w in scalars["train/loss"]] == pytest.approx([r["t"] for r in steps], abs=1e-3)
    world = [(s, v) for s, v, t in scalars["cluster/world_size"] if t in {r["t"] for r in steps}]
    assert world == [(r["step"], r["world_size"]) for r in steps]

    # Goodput so far at each step: the last execution of every step so far over the wall time so far.
    latest, expected_goodput = {}, []
    for record in steps:
        latest[record["step"]] = record["duration_s"]
        expected_goodput.append(sum(latest.values()) / (record["t"] - T0))
    goodput_at_steps = [v for _, v, t in scalars["goodput/so_far"] if t in {r["t"] for r in steps}]
    assert goodput_at_steps == pytest.approx(expected_goodput, rel=1e-5)

    # Consecutive steps of one group give samples/s; the first step of a group gives none.
    expected_rates, previous = [], None
    for record in (r for r in log.records if r["ev"] in ("step", "group")):
        if record["ev"] == "step" and previous is not None and record["step"] == previous["step"] + 1:
            expected_rates.append((record["step"], 48 / (record["t"] - previous["t"])))
        previous = record if record["ev"] == "step" else None
    assert [(s, v) for s, v, _ in scalars["train/samples_per_s"]] == [
        (s, pytest.approx(v, rel=1e-5)) for s, v in expected_rates]
    assert len(expected_rates) == 34 - 4  # every step but the first of each of the four groups

    # The last figures agree with the offline ledger.
    summary = build_ledger(log.records, catalog).summary
    assert scalars["cluster/preemptions"][-1][1] == summary["disruptions"]["preemptions"] == 2
    assert scalars["cost/usd_so_far"][-1][1] == pytest.approx(summary["cost"]["total_usd"], rel=1e-5)


def with_grad_norms(records):
    """The run's records, each step with a gradient norm, as the loop logs it."""
    return [{**r, "grad_norm": 10.0 / r["step"]} if r["ev"] == "step" else r for r in records]


SECRET = "https://hooks.example.com/services/T0K3N"


def secret_settings() -> dict:
    return Config(alerts=AlertConfig(webhook_url=SECRET)).to_dict()


def test_tensorboard_holds_the_hyperparameters_gradient_norm_step_time_and_checkpoint_stalls(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    log = preempted_run()
    logdir = str(tmp_path / TENSORBOARD_DIR)
    sink = MonitoringSink(build_writers(MonitoringConfig(ray_metrics=False), str(tmp_path), "r1", secret_settings()),
                          PriceCatalog.load())
    evaluations = [{"t": r["t"] + 0.01, "ev": "eval", "step": r["step"], "loss": 1.0 / r["step"], "samples": 192,
                    "duration_s": 0.2, "examples": [{"reference": "a red circle", "generated": f"a | red {r['step']}"}]}
                   for r in log.records if r["ev"] == "step" and r["step"] % 5 == 0]
    for record in sorted(with_grad_norms(log.records) + evaluations, key=lambda r: r["t"]):
        sink.write(record)
    sink.close()

    accumulator = EventAccumulator(logdir)
    accumulator.Reload()
    steps = [r for r in log.records if r["ev"] == "step"]
    scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    assert scalars["train/grad_norm"] == [(r["step"], pytest.approx(10.0 / r["step"])) for r in steps]
    assert scalars["train/step_s"] == [(r["step"], pytest.approx(r["duration_s"])) for r in steps]
    saves = [r for r in log.records if r["ev"] == "checkpoint"]
    assert scalars["checkpoint/stall_s"] == [(r["step"], pytest.approx(r["stall_s"])) for r in saves]
    assert scalars["eval/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in evaluations], "beside the loss"
    texts = accumulator.Tensors("eval/examples/text_summary")
    assert [t.step for t in texts] == [r["step"] for r in evaluations]
    last = texts[-1].tensor_proto.string_val[0].decode()
    assert "| reference | generated |" in last and f"a \\| red {evaluations[-1]['step']}" in last

    content = accumulator.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
               for key, value in session.session_start_info.hparams.items()}
    assert hparams["optim.lr"] == pytest.approx(Config().optim.lr) and hparams["trainer.global_batch_size"] == 48
    assert hparams["alerts.webhook_url"] != SECRET and "T0K3N" not in str(content)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"train/loss", "goodput/so_far"}


def wandb_records(run_dir):
    """Every record of each offline W&B run under ``run_dir``, by run directory, read from its
    ``.wandb`` transaction log (a LevelDB-style log of ``wandb_internal_pb2.Record``, checksums verified)."""
    import glob
    import zlib

    from wandb.proto import wandb_internal_pb2

    runs = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        data, records, position, pending = open(path, "rb").read(), [], 7, b""
        assert data[:4] == b":W&B"
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
                position += 32768 - position % 32768
                continue
            checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
            if kind == 0 and length == 0:
                break
            body = data[position + 7:position + 7 + length]
            assert zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum
            position += 7 + length
            pending += body
            if kind in (1, 4):  # a full record, or the last piece of one
                records.append(wandb_internal_pb2.Record.FromString(pending))
                pending = b""
        runs[os.path.basename(os.path.dirname(path))] = records
    return runs


def test_wandb_continues_one_run_per_run_name_with_its_redacted_config_and_the_training_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = preempted_run()
    records = with_grad_norms(log.records)
    first_half = records[:len(records) // 2]
    config = MonitoringConfig(wandb_project="spot", wandb_mode="offline", tensorboard=False, ray_metrics=False)
    for invocation in (first_half, records):  # a run, then its resume (which reads the event log from the start)
        sink = MonitoringSink(build_writers(config, str(tmp_path), "spot/caption run", secret_settings()),
                              PriceCatalog.load())
        for record in invocation:
            sink.write(record)
        sink.close()

    import wandb

    wandb.teardown()  # the wandb-core service writes a finished run's log out as it exits, like a driver's exit
    runs = wandb_records(str(tmp_path))
    assert len(runs) == 2 and all(name.endswith(wandb_run_id("spot/caption run")) for name in runs)
    for records_of_run in runs.values():
        (run,) = [r.run for r in records_of_run if r.WhichOneof("record_type") == "run"]
        assert run.run_id == wandb_run_id("spot/caption run") and run.display_name == "spot/caption run"
        config_items = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config_items["optim"]["lr"] == Config().optim.lr
        assert "T0K3N" not in json.dumps(config_items) and config_items["alerts"]["webhook_url"] != SECRET

    history = [r.history for r in runs[sorted(runs)[0]] if r.WhichOneof("record_type") == "history"]
    rows = {row.step.num: {i.nested_key[0]: json.loads(i.value_json) for i in row.item} for row in history}
    steps = [r for r in first_half if r["ev"] == "step"]
    # W&B's step is the training step: one row per step (and step 0's, the records before the first
    # step); the kill and the group records after step 13 went into that step's row, and the redone
    # steps 11-13 were not sent again.
    assert sorted(rows) == [0] + sorted({r["step"] for r in steps})
    assert all(rows[r["step"]]["train/loss"] == pytest.approx(r["loss"]) for r in steps if r["step"] <= 10)
    assert rows[13]["cluster/world_size"] == 2 and rows[13]["train/loss"] == pytest.approx(3.0 / 13)
    assert rows[5]["train/grad_norm"] == pytest.approx(2.0) and "train/step" not in rows[5]


def test_wandb_run_ids_are_stable_and_valid_and_names_that_clean_up_alike_differ():
    assert wandb_run_id("spot/caption run") == wandb_run_id("spot/caption run")
    assert wandb_run_id("spot/caption run") != wandb_run_id("spot:caption run")
    assert all(c.isalnum() or c in "-_" for c in wandb_run_id("a/b:c#d?e%f\\g" * 20))
    assert len(wandb_run_id("x" * 500)) <= 64


def test_wandb_is_skipped_when_not_installed(tmp_path, caplog):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    writers = build_writers(MonitoringConfig(wandb_project="spot", ray_metrics=False), str(tmp_path), "r1")
    assert [type(w).__name__ for w in writers] == ["TensorBoardWriter"]
    assert "wandb is not installed" in caplog.text
    for writer in writers:
        writer.close()


def test_event_feed_drives_every_sink_from_a_growing_log(tmp_path):
    log = slow_run()
    path = tmp_path / "events.jsonl"
    lines = [json.dumps(r) + "\n" for r in log.records]
    path.write_text("".join(lines[:10]) + lines[10][:7])  # a torn last line, as mid-write
    emitted = []
    config = AlertConfig(rules=[AlertRule(LOW_GOODPUT, 0.7, NOTIFY)], min_wall_s=3000.0)
    # The clock of a live run: the time of the newest record.
    runner = AlertRunner(config, PriceCatalog.load(), emitted.append,
                         clock=lambda: runner.totals.last_t, request_capacity=lambda bundles: None)
    sink = MonitoringSink([TensorBoardWriter(str(tmp_path / TENSORBOARD_DIR))], PriceCatalog.load())
    with EventFeed(str(path), [sink, runner], poll_s=0.05) as feed:
        time.sleep(0.2)
        assert sink.totals.completed_steps() == 6 and emitted == []  # 1816 s of wall time: not judged yet
        with open(path, "a") as f:
            f.write("".join(lines)[len("".join(lines[:10])) + 7:])
        deadline = time.time() + 10
        while not emitted and time.time() < deadline:
            time.sleep(0.05)
        feed.poll()
    assert sink.totals.completed_steps() == 600
    assert len(emitted) == 1 and emitted[0].alert == LOW_GOODPUT
    assert len(read_scalars(str(tmp_path / TENSORBOARD_DIR))["train/loss"]) == 600


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cluster
def test_ray_gauges_reach_prometheus():
    ray = pytest.importorskip("ray")
    port = _free_port()
    # address="local": a private cluster, never one another process on this machine started.
    ray.init(address="local", num_cpus=1, include_dashboard=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500}, logging_level="ERROR")
    try:
        writer = RayMetricsWriter("gauge-test")
        saved_at = time.time() - 3600  # records of an earlier driver, read again at a resume
        writer.write({"goodput/so_far": 0.8125, "cluster/world_size": 3.0, "train/loss": 1.5,
                      "cluster/preemptions": 2.0, "checkpoint/durable_step": 6.0}, step=7, wall_time=saved_at)
        writer.write({"cluster/preemptions": 3.0, "train/lr": 0.1}, step=8, wall_time=time.time())
        expected = {"ray_raytrain_spot_goodput_ratio": 0.8125, "ray_raytrain_spot_world_size": 3.0,
                    "ray_raytrain_spot_loss": 1.5, "ray_raytrain_spot_step": 8.0,
                    "ray_raytrain_spot_preemptions_total": 1.0, "ray_raytrain_spot_last_durable_checkpoint_step": 6.0,
                    "ray_raytrain_spot_last_durable_checkpoint_timestamp_seconds": saved_at}
        deadline, samples, types = time.time() + 60, {}, {}
        while time.time() < deadline and samples != expected:
            time.sleep(0.5)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            for line in body.splitlines():
                if line.startswith("ray_raytrain_spot_") and 'run="gauge-test"' in line:
                    samples[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
                elif line.startswith("# TYPE ray_raytrain_spot_"):
                    types[line.split()[2]] = line.split()[3]
        assert samples == expected
        assert types["ray_raytrain_spot_preemptions_total"] == "counter" and types["ray_raytrain_spot_step"] == "gauge"
    finally:
        ray.shutdown()
