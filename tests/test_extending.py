"""docs/extending.md's task, outside the package, trained as the page says: through a preemption,
no step redone, every sample once, the loss of the uninterrupted run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections import defaultdict

import pytest

from raytrain_spot.observe.events import read_events
from tests.conftest import REPO, assert_clean_audit, ray_internal_lines

DOC = os.path.join(REPO, "docs", "extending.md")
EXAMPLES = os.path.join(REPO, "examples")
LOSS_TOLERANCE = 0.05  # relative, on the mean loss of the last 10 steps


def documented_command() -> list:
    text = open(DOC).read()
    block = text.split("<!-- extending-command", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    words = shlex.split(block.strip())
    assert words[0] == "PYTHONPATH=$PWD/examples" and words[1:4] == ["python", "-m", "raytrain_spot.run"], words
    return words[4:]


def test_the_page_shows_the_tested_file_exactly():
    text = open(DOC).read()
    shown = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert shown == open(os.path.join(EXAMPLES, "blobs.py")).read()


def run(tmp_path, overrides: list) -> subprocess.CompletedProcess:
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": EXAMPLES, "RAY_TMPDIR": ray_tmp}
    result = subprocess.run([sys.executable, "-m", "raytrain_spot.run", *overrides], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=600)
    result.ray_tmp = ray_tmp
    return result


def trained(tmp_path, overrides: list):
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.name="))
    isolation = [f"checkpoint.local_dir={tmp_path}/node-local", f"checkpoint.head_dir={tmp_path}/head",
                 "run.log_sample_ids=true"]
    result = run(tmp_path, overrides + isolation)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert ray_internal_lines(result.stdout + result.stderr) == []
    steps = int(next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer.max_steps=")))
    assert_clean_audit(name, f"file://{tmp_path}/outputs/storage", f"{tmp_path}/head", f"{tmp_path}/node-local",
                       steps, result.ray_tmp)
    events = read_events(str(tmp_path / "outputs" / name / "events.jsonl"))
    samples = defaultdict(dict)
    for record in events:
        if record["ev"] == "samples":
            samples[record["step"]][record["rank"]] = record["ids"]
    by_step = {step: sorted(i for ids in ranks.values() for i in ids) for step, ranks in samples.items()}
    loss = {e["step"]: e["loss"] for e in events if e["ev"] == "step"}
    return events, by_step, sum(loss[s] for s in range(steps - 9, steps + 1)) / 10, steps


@pytest.mark.cluster
@pytest.mark.chaos
def test_the_documented_task_trains_through_a_preemption_like_an_uninterrupted_run(tmp_path):
    command = documented_command()
    uninterrupted = [o for o in command if not o.startswith(("+chaos", "chaos."))]
    assert uninterrupted != command, "the documented command must preempt"
    (tmp_path / "plain").mkdir()
    (tmp_path / "spot").mkdir()
    _, reference_samples, reference_loss, steps = trained(tmp_path / "plain", uninterrupted)
    events, samples, loss, _ = trained(tmp_path / "spot", command)

    step_records = [e["step"] for e in events if e["ev"] == "step"]
    assert len(step_records) == len(set(step_records)) == steps, "a step was redone"
    # The replacement may join after these few seconds of training end: the regrow is the chaos suite's.
    assert [g["world_size"] for g in events if g["ev"] == "group"][:2] == [3, 2]
    assert [h["reason"] for h in events if h["ev"] == "handoff"][0] == "preemption"
    assert [e for e in events if e["ev"] == "restore_mismatch"] == [], "every copy of a step must be the same"

    consumed = [i for step in range(1, steps + 1) for i in samples[step]]
    assert len(consumed) == len(set(consumed)), "a sample was repeated"
    assert samples == reference_samples, "the preempted run trained some step on other samples"
    losses = [e["loss"] for e in events if e["ev"] == "step"]
    assert losses[-1] < 0.5 * losses[0], "the task did not learn: the comparison would be vacuous"
    assert loss == pytest.approx(reference_loss, rel=LOSS_TOLERANCE)


def test_a_mistyped_task_setting_stops_the_run_with_the_tasks_settings(tmp_path):
    result = run(tmp_path, ["task=custom", "task._target_=blobs.BlobClassifierTask", "+task.nois=0.3"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "task.nois: no such setting of blobs.BlobClassifierTask" in result.stderr
    assert "image_size, num_samples, noise, channels" in result.stderr


def test_a_task_setting_is_validated_by_the_tasks_own_checks(tmp_path):
    result = run(tmp_path, ["task=custom", "task._target_=blobs.BlobClassifierTask", "+task.image_size=10"])
    assert result.returncode == 2
    assert "task.image_size: 10 is not a multiple of 4" in result.stderr


def test_a_task_from_a_config_file_of_your_own(tmp_path, compose):
    from raytrain_spot.config.schema import load_config
    from raytrain_spot.loop.task import build_task

    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "blobs.yaml").write_text("_target_: blobs.BlobClassifierTask\nnoise: 0.1\n")
    sys.path.insert(0, EXAMPLES)
    try:
        cfg = load_config(compose("task=blobs", f"hydra.searchpath=[file://{tmp_path}]"))
        task = build_task(cfg.task)
    finally:
        sys.path.remove(EXAMPLES)
    assert type(task).__name__ == "BlobClassifierTask" and task.noise == 0.1 and task.image_size == 16
    assert json.loads(json.dumps(cfg.to_dict()))["task"] == {"_target_": "blobs.BlobClassifierTask", "noise": 0.1}
