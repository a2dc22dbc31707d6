"""The benchmarks' own instruments: who used the cores (bench/cpu_accounting.py), and the
lifetime prior a compressed trace replay runs with (bench/bench_recovery.py), the baselines' entry (bench/baselines.py),
a pause cut into its parts (bench/bench_scaling.py)."""

import argparse
import subprocess
import sys
import time

import pytest

from raytrain_spot.config.schema import CheckpointingConfig
from tests.conftest import load_bench

BUSY_CHILD = "import time\nstarted = time.time()\nwhile time.time() - started < 2.5: pass"
# The started process idles while a child titled like a Ray Train worker running the training function
# (Ray Train names its calls into a worker execute.<function>) burns a core.
IDLE_PARENT = (f"import subprocess, sys\nsubprocess.Popen(['ray::execute.train_fn_with_final_checkpoint_flush', '-c', "
               f"{BUSY_CHILD!r}], executable=sys.executable).wait()")


def test_cpu_is_charged_to_the_process_kind_that_used_it():
    accounting = load_bench("cpu_accounting")
    parent = subprocess.Popen([sys.executable, "-c", IDLE_PARENT])
    sampler = accounting.CpuSampler(parent.pid)
    started = time.time()
    parent.wait(timeout=30)
    sampler.stop()

    cores = sampler.cores_by_kind(started + 0.5, started + 2.0)  # inside the child's busy loop
    assert cores.get("ray::RayTrainWorker", 0.0) > 0.5, cores
    assert cores.get("driver", 0.0) < 0.2, cores  # the started process, waiting
    assert list(cores)[0] == "ray::RayTrainWorker"  # largest first


def test_a_compressed_replay_compresses_the_node_lifetime_prior_unless_it_is_set():
    recovery = load_bench("bench_recovery")
    args = argparse.Namespace(overrides=[], compression=50.0)
    (setting,) = recovery.compressed_lifetime_prior(args)
    key, value = setting.split("=")
    assert key == "checkpoint.mtbi_prior_s"
    assert float(value) * 50.0 == CheckpointingConfig.mtbi_prior_s

    args.overrides = ["checkpoint.mtbi_prior_s=900"]
    assert recovery.compressed_lifetime_prior(args) == []


def test_the_loops_own_share_counts_samples_in_the_loop_outside_the_step_and_the_loading(tmp_path):
    accounting = load_bench("cpu_accounting")
    loop = "run_group (raytrain_spot/loop/worker.py:108)"
    profile = tmp_path / "py-spy.txt"
    profile.write_text("\n".join([
        f"Thread.run (threading.py:982);{loop};accumulate (raytrain_spot/loop/step.py:86);forward (x.py:1) 60",
        f"Thread.run (threading.py:982);{loop};update (raytrain_spot/loop/step.py:110) 10",
        f"Thread.run (threading.py:982);{loop};next (raytrain_spot/loop/batches.py:88) 20",
        f"Thread.run (threading.py:982);{loop};start_agreement (raytrain_spot/loop/agreement.py:80) 10",
        "<module> (ray/_private/workers/default_worker.py:323);Worker.main_loop (ray/_private/worker.py:1069) 50",
    ]) + "\n")
    assert accounting.loop_own_share(str(profile), "run_group (raytrain_spot/loop/worker.py") == 10 / 100
    assert accounting.loop_own_share(str(profile), "plain_loop_per_worker (") is None


@pytest.mark.cluster
def test_a_baseline_runs_the_main_command_as_its_strategy(tmp_path):
    """``bench/baselines.py NAME`` is the main command with a baseline's strategy: plain Ray Train's
    trainer around the same loop, the strategy named in the run's start event."""
    import json
    import os
    import tempfile

    from tests.conftest import REPO

    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "baselines.py"), "ray-preemption-api", "+experiment=vlm",
         "run.name=baseline", "trainer.max_steps=6", "cluster.num_worker_nodes=2", "trainer.max_workers=2",
         f"checkpoint.local_dir={tmp_path}/node-local", f"checkpoint.head_dir={tmp_path}/head"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rts-", dir="/tmp")})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "outputs" / "baseline" / "events.jsonl")]
    assert next(r["strategy"] for r in records if r["ev"] == "start") == "ray-preemption-api"
    assert max(r["step"] for r in records if r["ev"] == "step") == 6


def _group(t, world_size, nodes="abc"):
    return {"ev": "group", "t": t, "world_size": world_size, "nodes": list(nodes[:world_size]),
            "startup_s": {"data": 0.1, "model": 0.2, "restore": 0.3, "ddp": 0.4}}


def test_a_pause_is_cut_into_parts_that_add_up_to_it_and_the_benchmarks_own_stop_is_left_out():
    scaling = load_bench("bench_scaling")
    step = lambda t, n: {"ev": "step", "t": t, "step": n, "duration_s": 0.1}  # noqa: E731
    events = [_group(10.0, 3), step(11.0, 1), step(12.0, 2),
              {"ev": "handoff", "t": 12.5, "reason": "preemption", "step": 2},
              {"ev": "checkpoint", "t": 14.0, "step": 2, "kind": "jit", "tier": "local", "stall_s": 0.0, "bytes": 2**30},
              {"ev": "restore", "t": 20.0, "step": 2, "tier": "local", "duration_s": 0.25, "read_s": 0.2},
              _group(20.0, 2), step(20.5, 3),
              # the node dies after the handoff; later the run stops and a group restarts for the final save
              {"ev": "kill", "t": 21.0, "node": "c"}, step(22.0, 4),
              {"ev": "stop_requested", "t": 23.0}, _group(30.0, 3), step(31.0, 5)]
    (pause,) = scaling.pauses(events)["preemption"]
    assert pause["pause_s"] == pytest.approx(20.5 - 12.0)
    assert (pause["old_group_end"], pause["ray_train_restart"], pause["first_step"]) == pytest.approx((2.0, 5.0, 0.5))
    assert sum(pause[part] for part in scaling.PARTS) == pytest.approx(pause["pause_s"])
    # The copy's bytes over rank 0's own work on it; the rest of the restore waited for the other ranks.
    assert pause["restore_gbps"] == pytest.approx(5.0) and pause["restore_tier"] == "local"
    assert pause["restore_wait_s"] == pytest.approx(0.05)
    assert scaling.pauses(events)["regrow"] == []

    baseline = [_group(10.0, 3), step(12.0, 2), {"ev": "kill", "t": 13.0, "node": "c"}, _group(40.0, 2),
                step(41.0, 3)]
    (pause,) = scaling.pauses(baseline)["preemption"]
    assert (pause["old_group_end"], pause["ray_train_restart"]) == pytest.approx((1.0, 40.0 - 1.0 - 13.0))
