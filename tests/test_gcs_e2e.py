"""Checkpoints in a GCS bucket, end to end: the main command against fake-gcs-server on loopback.

The bucket goes away mid-run (the server is killed, then restarted on the same port with its
data): training goes on from the head's copies, nothing half-uploaded ever verifies, and
uploads resume. Then a new driver with the node-local and head tiers gone resumes from GCS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from raytrain_spot.checkpoint.format import fetch_verified, listed_steps
from raytrain_spot.observe.events import read_events
from raytrain_spot.storage.gcs import GcsStore
from tests.servers.fake_gcs import FakeGcsServer
from tests.conftest import assert_clean_audit, run_main

pytestmark = pytest.mark.cluster

BUCKET = "raytrain-spot-e2e"


@pytest.fixture
def gcs(tmp_path):
    with FakeGcsServer(data_dir=str(tmp_path / "gcs-data")) as server:
        server.create_bucket(BUCKET)
        yield server


def _command(tmp_path, *overrides):
    return [sys.executable, "-m", "raytrain_spot.run", "+experiment=vlm", "run.name=gcs",
            f"storage.uri=gs://{BUCKET}/runs", "trainer.log_every_steps=50", "checkpoint.interval_steps=20",
            "checkpoint.durable_interval_s=0", f"checkpoint.local_dir={tmp_path}/node-local",
            f"checkpoint.head_dir={tmp_path}/head", *overrides]


def _wait_for_step(events_path: str, step: int, timeout_s: float) -> float:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if os.path.exists(events_path):
            steps = [e for e in read_events(events_path) if e["ev"] == "step" and e["step"] >= step]
            if steps:
                return steps[0]["t"]
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached in {timeout_s} s")


@pytest.mark.chaos
def test_bucket_outage_then_resume_from_gcs_alone(tmp_path, gcs, monkeypatch):
    env = {**os.environ, **gcs.env(), "RAY_TMPDIR": tempfile.mkdtemp(prefix="rts-", dir="/tmp")}
    events_path = str(tmp_path / "outputs" / "gcs" / "events.jsonl")
    driver = subprocess.Popen(_command(tmp_path, "trainer.max_steps=400"), cwd=tmp_path, env=env,
                              stdout=open(tmp_path / "run1.log", "w"), stderr=subprocess.STDOUT)
    outage_start = _wait_for_step(events_path, 60, timeout_s=300)
    gcs.kill()
    time.sleep(8)
    gcs.restart()
    outage_end = time.time()
    assert driver.wait(timeout=600) == 0, (tmp_path / "run1.log").read_text()[-4000:]

    events = read_events(events_path)
    trained_in_outage = [e["step"] for e in events if e["ev"] == "step" and outage_start < e["t"] < outage_end]
    assert len(trained_in_outage) > 20, "training must go on while the bucket is down"
    head_commits = [e["step"] for e in events if e["ev"] == "checkpoint" and e["tier"] == "head"]
    assert any(outage_start < e["t"] < outage_end for e in events if e["ev"] == "checkpoint" and e["tier"] == "head")
    durable_commits = [e for e in events if e["ev"] == "checkpoint" and e["tier"] == "durable"]
    assert durable_commits[-1]["step"] == 400 and durable_commits[-1]["t"] > outage_end, "uploads resume"

    store = GcsStore.from_uri(f"gs://{BUCKET}/runs", emulator_host=gcs.endpoint, retry_deadline_s=10)
    steps = listed_steps(store, "gcs")
    assert steps[0] == 400 and len(steps) == 3
    for step in steps:  # everything in the bucket verifies: nothing half-uploaded is listed as valid
        fetch_verified(store, f"gcs/checkpoints/step_{step:08d}", str(tmp_path))
    assert set(steps) <= set(head_commits)

    # A new driver, on a machine with none of the fast tiers: only the bucket has the run.
    shutil.rmtree(tmp_path / "node-local")
    shutil.rmtree(tmp_path / "head")
    second = run_main(*_command(tmp_path, "trainer.max_steps=420")[3:], cwd=str(tmp_path), env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    events = read_events(events_path)
    restart = max(i for i, e in enumerate(events) if e["ev"] == "start")
    restore = next(e for e in events[restart:] if e["ev"] == "restore")
    assert (restore["step"], restore["tier"]) == (400, "durable")
    assert [e["step"] for e in events[restart:] if e["ev"] == "step"] == list(range(401, 421))
    for name, value in gcs.env().items():
        monkeypatch.setenv(name, value)
    assert_clean_audit("gcs", f"gs://{BUCKET}/runs", f"{tmp_path}/head", f"{tmp_path}/node-local", 420,
                       env["RAY_TMPDIR"])


def test_missing_credentials_fail_before_ray_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    env.update(GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "missing.json"), GCE_METADATA_HOST="127.0.0.1:1",
               NO_GCE_CHECK="True")
    result = run_main("+experiment=vlm", f"storage.uri=gs://{BUCKET}/runs", cwd=str(tmp_path), env=env, timeout=120)
    assert result.returncode == 2
    assert "storage.uri" in result.stderr and "gcloud auth application-default login" in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs" / "storage").exists()


@pytest.mark.slow
@pytest.mark.chaos
def test_an_outage_longer_than_the_retry_deadline_even_at_the_final_upload(tmp_path, gcs, monkeypatch):
    """The bucket is down for 150 s, past the storage client's 120 s retry deadline, and still down
    when the run ends: training goes on on the head without a restart, the run ends with exit
    status 1 saying the final checkpoint is not in the bucket, and the same command, once the
    bucket is back, uploads it and succeeds."""
    env = {**os.environ, **gcs.env(), "RAY_TMPDIR": tempfile.mkdtemp(prefix="rts-", dir="/tmp")}
    command = _command(tmp_path, "trainer.max_steps=3000", "checkpoint.final_upload_wait_s=20")
    events_path = str(tmp_path / "outputs" / "gcs" / "events.jsonl")
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=open(tmp_path / "run1.log", "w"),
                              stderr=subprocess.STDOUT)
    _wait_for_step(events_path, 40, timeout_s=300)
    gcs.kill()
    down_at = time.time()
    assert driver.wait(timeout=900) == 1, (tmp_path / "run1.log").read_text()[-4000:]
    assert time.time() - down_at > 120, "the outage must outlast the client's retry deadline"
    log = (tmp_path / "run1.log").read_text()
    assert "the final checkpoint (step 3000) is not in" in log
    events = read_events(events_path)
    assert len([e for e in events if e["ev"] == "group"]) == 1, "the outage must not restart the group"
    assert [e["step"] for e in events if e["ev"] == "step"][-1] == 3000
    assert any(e["ev"] == "checkpoint_failed" and e.get("tier") == "durable" for e in events)
    summary = json.loads((tmp_path / "outputs" / "gcs" / "summary.json").read_text())
    assert summary["status"].startswith("finished without") and summary["failed_saves"] >= 1

    gcs.restart()
    second = run_main(*command[3:], cwd=str(tmp_path), env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    for name, value in gcs.env().items():
        monkeypatch.setenv(name, value)
    assert_clean_audit("gcs", f"gs://{BUCKET}/runs", f"{tmp_path}/head", f"{tmp_path}/node-local", 3000,
                       env["RAY_TMPDIR"])
