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

from raytrain_spot.observe.alerts import LOW_GOODPUT, NOTIFY, AlertConfig, AlertRule, AlertRunner
from raytrain_spot.observe.events import EventFeed
from raytrain_spot.cost.ledger import build_ledger
from raytrain_spot.observe.monitoring import (TENSORBOARD_DIR, MonitoringConfig, MonitoringSink,
                                      RayMetricsWriter, TensorBoardWriter, build_writers)
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
    runner = AlertRunner(config, PriceCatalog.load(), lambda ev, **fields: emitted.append(fields),
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
    assert len(emitted) == 1 and emitted[0]["alert"] == LOW_GOODPUT
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
        writer.write({"goodput/so_far": 0.8125, "cluster/world_size": 3.0, "train/loss": 1.0}, step=7,
                     wall_time=time.time())
        deadline, samples = time.time() + 60, {}
        while time.time() < deadline and len(samples) < 2:
            time.sleep(0.5)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            for line in body.splitlines():
                if line.startswith("ray_raytrain_spot_") and 'run="gauge-test"' in line:
                    samples[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
        assert samples == {"ray_raytrain_spot_goodput": 0.8125, "ray_raytrain_spot_world_size": 3.0}
    finally:
        ray.shutdown()
