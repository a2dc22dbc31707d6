"""bench/gpu_check.py runs without Ray (the GPU machine has none): here on the CPU with gloo."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ray is made unimportable, as on the GPU machine.
WITHOUT_RAY = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = ['gpu_check.py'] + sys.argv[1:]; "
               "runpy.run_path('bench/gpu_check.py', run_name='__main__')")


def test_the_gpu_check_trains_agrees_and_times_the_snapshot_without_ray():
    result = subprocess.run([sys.executable, "-c", WITHOUT_RAY, "--device", "cpu", "--model", "tiny", "--steps", "3",
                             "--batch", "16", "--micro-batch", "8", "--state-gb", "0.01"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["backend"] == "gloo"
    assert figures["loss_last"] < figures["loss_first"]
    assert figures["state_gb"] > 0.01 and 0 < figures["snapshot_stall_s"] and 0 < figures["torch_save_s"]


def without_ray_env(tmp_path):
    """An environment where ``import ray`` fails in every Python process, as on the GPU machine."""
    stub = tmp_path / "no-ray" / "ray"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('the GPU machine has no Ray')\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path / "no-ray")}


def test_the_checkpoint_manager_restores_a_save_taken_while_training_exactly_in_both_formats(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_checkpoint.py", "--device", "cpu", "--width", "64",
                             "--layers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=without_ray_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert [f["format"] for f in figures["formats"]] == ["single-file", "sharded"]
    assert all(f["exact"] and f["restored_step"] == 3 and f["stall_s"] > 0 for f in figures["formats"])


def test_a_survivors_commit_ends_with_the_steps_state_without_ray(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_survivor_commit.py", "--device", "cpu", "--width", "64",
                             "--layers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=without_ray_env(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["committed"] and figures["state_matches"] and figures["marks"] == {"0": "committed:2"}


@pytest.mark.slow  # four stages of a minute or so on two loaded cores
def test_the_first_run_script_runs_every_stage_without_ray(tmp_path):
    out = tmp_path / "first.json"
    result = subprocess.run([sys.executable, "bench/gpu_first_run.py", "--small", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=1800, env=without_ray_env(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = {s["name"]: s for s in json.loads(out.read_text())["stages"]}
    assert stages["driver"]["status"] == "skipped"
    assert all(stages[name]["status"] == "ok" for name in ("train-step", "checkpoint", "survivor-commit", "hf-tiny-fp32"))
    assert stages["checkpoint"]["figures"]["formats"][1]["exact"]
