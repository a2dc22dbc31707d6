"""The main command on the embedded local cluster: trains, checkpoints, and resumes by name."""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from raytrain_spot.observe.events import read_events
from tests.conftest import assert_clean_audit, ray_internal_lines, run_main

pytestmark = pytest.mark.cluster

SMALL = ["+experiment=vlm", "run.name=e2e", "cluster.num_worker_nodes=2", "trainer.max_workers=2",
         "trainer.global_batch_size=24", "checkpoint.interval_steps=10", "trainer.log_every_steps=5"]


def _ray_processes_under(path: str) -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if path in line]


@pytest.mark.chaos
def test_trains_checkpoints_then_resumes_by_name(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")  # Ray's socket paths must stay short
    secret = "T0KEN-e2e-0a1b2c"  # a webhook URL carries its token: it must never be written anywhere
    env = {"RAY_TMPDIR": ray_tmp, "ALERT_WEBHOOK": f"http://127.0.0.1:9/hooks/{secret}"}
    tiers = [f"checkpoint.local_dir={tmp_path}/node-local", f"checkpoint.head_dir={tmp_path}/head"]
    first = run_main(*SMALL, *tiers, "trainer.max_steps=20", "alerts.webhook_url=${oc.env:ALERT_WEBHOOK}",
                     cwd=str(tmp_path), env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert secret not in first.stdout + first.stderr
    leaked = subprocess.run(["grep", "-rl", secret, str(tmp_path)], capture_output=True, text=True).stdout
    assert leaked == "", f"the webhook token was written to {leaked}"
    assert "== run finished ==" in first.stdout
    assert "world 2" in first.stdout and "step     20/20" in first.stdout
    assert ray_internal_lines(first.stdout + first.stderr) == [], "Ray's own log lines reached the console"
    run_dir = tmp_path / "outputs" / "e2e"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["checkpoints_written"] == 2
    assert summary["final_loss"] < summary["first_loss"]
    checkpoints = sorted(p.name for p in (tmp_path / "outputs" / "storage" / "e2e" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000010", "step_00000020"]
    assert _ray_processes_under(ray_tmp) == [], "the embedded cluster left processes behind"

    changed = run_main(*SMALL, *tiers, "trainer.max_steps=30", "task.model.text_layers=3", cwd=str(tmp_path), env=env,
                       timeout=120)
    assert changed.returncode == 2, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "saved with other settings: task.model.text_layers: 2 -> 3" in changed.stderr

    # A short lease: the twin is refused once it sees the lease renewed (every third of the TTL).
    command = [sys.executable, "-m", "raytrain_spot.run", *SMALL, *tiers, "trainer.max_steps=30", "tuning.lease_ttl_s=6"]
    with subprocess.Popen(command, cwd=str(tmp_path), env={**os.environ, **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as resumed:
        while not (run_dir.parent / "storage" / "e2e" / "lease.json").exists() or "released\": true" in \
                (run_dir.parent / "storage" / "e2e" / "lease.json").read_text():
            time.sleep(0.2)
        twin = run_main(*SMALL, *tiers, "trainer.max_steps=30", "tuning.lease_ttl_s=6", cwd=str(tmp_path), env=env,
                        timeout=120)
        out, err = resumed.communicate(timeout=600)
    assert twin.returncode == 2 and "run.name=e2e is in use by another driver" in twin.stderr, twin.stderr[-2000:]
    second = subprocess.CompletedProcess(command, resumed.returncode, out, err)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "from restored step 20" in second.stdout
    events = read_events(str(run_dir / "events.jsonl"))
    starts = [i for i, e in enumerate(events) if e["ev"] == "start"]
    assert len(starts) == 2
    resumed_steps = [e["step"] for e in events[starts[1]:] if e["ev"] == "step"]
    assert resumed_steps == list(range(21, 31)), "the resumed run must continue at the next step, redoing none"
    restore = next(e for e in events[starts[1]:] if e["ev"] == "restore")
    assert restore["step"] == 20
    first_run_positions = [e["samples"] for e in events[:starts[1]] if e["ev"] == "step"]
    resumed_positions = [e["samples"] for e in events[starts[1]:] if e["ev"] == "step"]
    assert resumed_positions[0][0] == first_run_positions[-1][1], "the data cursor must continue where it stopped"
    assert_clean_audit("e2e", f"file://{tmp_path}/outputs/storage", f"{tmp_path}/head", f"{tmp_path}/node-local", 30,
                       ray_tmp)


def test_sharded_checkpoints_from_two_workers_resume_on_one(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")
    env = {"RAY_TMPDIR": ray_tmp}
    tiers = [f"checkpoint.local_dir={tmp_path}/node-local", f"checkpoint.head_dir={tmp_path}/head",
             "checkpoint.sharded=true"]
    first = run_main(*SMALL, *tiers, "trainer.max_steps=20", cwd=str(tmp_path), env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    final = tmp_path / "outputs" / "storage" / "e2e" / "checkpoints" / "step_00000020"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["sharded"] and manifest["world_size"] == 2
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    shares = [manifest["files"][f"__{rank}_0.distcp"]["size"] for rank in (0, 1)]
    assert min(shares) > 0.4 * max(shares), f"the two workers' shares should be balanced: {shares}"

    second = run_main(*SMALL, *tiers, "trainer.max_workers=1", "trainer.max_steps=30", cwd=str(tmp_path), env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    events = read_events(str(tmp_path / "outputs" / "e2e" / "events.jsonl"))
    second_start = [i for i, e in enumerate(events) if e["ev"] == "start"][1]
    restore = next(e for e in events[second_start:] if e["ev"] == "restore")
    resize = next(e for e in events[second_start:] if e["ev"] == "resize")
    assert (restore["step"], restore["tier"]) == (20, "head")
    assert (resize["old_world_size"], resize["world_size"]) == (2, 1)
    losses = {e["step"]: e["loss"] for e in events if e["ev"] == "step"}
    assert sorted(losses) == list(range(1, 31))
    assert abs(losses[21] - losses[20]) < 0.5 * abs(losses[1] - losses[20]), \
        "the resumed run must continue from the trained state, not from scratch"
