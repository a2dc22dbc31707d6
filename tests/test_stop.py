"""Ctrl-C or SIGTERM to the main command: every worker stops after the same step, that step's
checkpoint is committed to durable storage as the final one, the summary and the ledger are
written, and the driver exits with 130 (143) leaving no Ray process behind; a second Ctrl-C
stops at once."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from raytrain_spot.observe.events import read_events
from raytrain_spot.run import newest_durable_step
from tests.conftest import assert_clean_audit, processes_of

pytestmark = pytest.mark.cluster

ENDLESS = ["+experiment=vlm", "run.name=stop", "cluster.num_worker_nodes=2", "trainer.max_workers=2",
           "trainer.global_batch_size=24", "trainer.max_steps=100000", "checkpoint.interval_steps=1000"]


def start_driver(tmp_path, ray_tmp: str) -> subprocess.Popen:
    """The main command in a session of its own, so a signal to its process group is what a
    terminal's Ctrl-C sends: every process of the foreground job gets it, Ray's included."""
    command = [sys.executable, "-m", "raytrain_spot.run", *ENDLESS, f"checkpoint.local_dir={tmp_path}/node-local",
               f"checkpoint.head_dir={tmp_path}/head"]
    return subprocess.Popen(command, cwd=str(tmp_path), env={**os.environ, "RAY_TMPDIR": ray_tmp},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(events_path, step: int, driver: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        if os.path.exists(events_path) and any(e["ev"] == "step" and e["step"] >= step
                                               for e in read_events(str(events_path))):
            return
        time.sleep(0.5)
    raise AssertionError(f"no step {step} in {timeout_s} s")


def ctrl_c(driver: subprocess.Popen) -> None:
    os.killpg(driver.pid, signal.SIGINT)


def sigterm(driver: subprocess.Popen) -> None:
    """As a process manager stops a service: SIGTERM to the driver alone."""
    driver.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("send, status", [(ctrl_c, 130), pytest.param(sigterm, 143, marks=pytest.mark.slow)])
def test_a_signal_ends_the_run_at_a_durable_final_checkpoint_with_its_summary(tmp_path, send, status):
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")  # Ray's socket paths must stay short
    run_dir = tmp_path / "outputs" / "stop"
    with start_driver(tmp_path, ray_tmp) as driver:
        wait_for_step(run_dir / "events.jsonl", 3, driver)
        send(driver)
        out, err = driver.communicate(timeout=300)
    assert driver.returncode == status, out[-3000:] + err[-3000:]
    assert "== run stopped ==" in out

    events = read_events(str(run_dir / "events.jsonl"))
    stopped = [e["step"] for e in events if e["ev"] == "stopped"]
    assert len(stopped) == 1, "one stop, decided once for every rank"
    last = stopped[0]
    assert max(e["step"] for e in events if e["ev"] == "step") == last, "no step trained after the stop"
    assert any(e["ev"] == "checkpoint" and e["step"] == last and e["kind"] == "final" and e["tier"] == "durable"
               for e in events)
    storage = f"file://{tmp_path}/outputs/storage"
    assert newest_durable_step(storage, "stop") == last
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] == last and summary["durable_checkpoint_step"] == last
    assert (run_dir / "ledger.json").exists()
    assert_clean_audit("stop", storage, f"{tmp_path}/head", f"{tmp_path}/node-local", last, ray_tmp)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")
    run_dir = tmp_path / "outputs" / "stop"
    with start_driver(tmp_path, ray_tmp) as driver:
        wait_for_step(run_dir / "events.jsonl", 1, driver)
        os.killpg(driver.pid, signal.SIGINT)
        time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGINT)
        driver.communicate(timeout=60)
    assert driver.returncode in (-signal.SIGINT, 128 + signal.SIGINT), driver.returncode
    assert not (run_dir / "summary.json").exists()
    deadline = time.time() + 15  # a driver's cluster takes a moment to go after it exits
    while (left := processes_of(ray_tmp)) and time.time() < deadline:
        time.sleep(0.5)
    assert left == [], f"processes left behind: {left}"
