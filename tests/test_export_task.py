"""Export and ``RunResult.trained_model()`` build the user's task, never one a checkpoint's manifest names."""

import os
import sys

import pytest
import torch
from omegaconf import OmegaConf

from raytrain_spot.api import RunResult
from raytrain_spot.export import export_model, run_config
from raytrain_spot.checkpoint.format import STATE_FILE, Manifest, checkpoint_key, commit, write_state
from raytrain_spot.checkpoint.state import ModelWeights
from raytrain_spot.config.errors import ConfigError
from raytrain_spot.storage.store import LocalStore
from raytrain_spot.loop.task import build_task

USER_TASK = {"_target_": "raytrain_spot.tasks.vlm.task.VisionLanguageTask", "model": {"preset": "tiny"}}


@pytest.fixture
def planted_module(tmp_path, monkeypatch):
    """A module on sys.path whose import writes a marker: what a bucket writer would name."""
    marker = tmp_path / "imported"
    package = tmp_path / "planted"
    package.mkdir()
    name = f"planted_task_{os.getpid()}"
    (package / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from raytrain_spot.loop.task import TrainingTask\n"
        "class Task(TrainingTask):\n    pass\n")
    monkeypatch.syspath_prepend(str(package))
    yield f"{name}.Task", marker
    sys.modules.pop(name, None)


def _checkpoint(tmp_path, run_name: str, stored_config: dict) -> LocalStore:
    """A valid checkpoint of the user's model whose manifest carries ``stored_config``."""
    tmp_path.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = build_task(USER_TASK).build_model()
    entry = write_state({"model": ModelWeights(model).state_dict()}, str(tmp_path / STATE_FILE))
    store = LocalStore(str(tmp_path / "storage"))
    commit(store, checkpoint_key(run_name, 3), {STATE_FILE: str(tmp_path / STATE_FILE)},
           Manifest(step=3, samples_seen=24, kind="final", world_size=1, files={STATE_FILE: entry},
                    config=stored_config))
    return store


def _run_dir(tmp_path, run_name: str, store: LocalStore) -> RunResult:
    """A finished run's directory as the main command leaves it: its settings (seed 0) and where its checkpoints are."""
    run_dir = tmp_path / "outputs" / run_name
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save({"run": {"name": run_name, "seed": 0}, "task": USER_TASK}, run_dir / ".hydra" / "config.yaml")
    return RunResult(run_name, str(run_dir), "finished", {"checkpoints_at": f"{store.uri}/{run_name}/checkpoints"}, {})


def test_a_task_named_by_the_manifest_is_never_imported(tmp_path, planted_module):
    target, marker = planted_module
    planted = {"task": {"_target_": target}, "run": {"seed": 0}}
    store = _checkpoint(tmp_path, "r", planted)
    checkpoint = store.local_path(checkpoint_key("r", 3))

    with pytest.raises(ConfigError, match="only the run's own settings rebuild it"):
        export_model(checkpoint, str(tmp_path / "a"), "fp32", "pretrained")
    with pytest.raises(ConfigError, match=rf"other settings than the ones given: task._target_: '{target}' ->"):
        export_model(checkpoint, str(tmp_path / "b"), "fp32", "pretrained",
                     config={"task": USER_TASK, "run": {"seed": 0}})
    result = _run_dir(tmp_path, "r", store)
    with pytest.raises(ConfigError, match="other settings than the ones given"):
        result.trained_model()
    with pytest.raises(ConfigError, match="other settings than the ones given"):
        export_model(checkpoint, str(tmp_path / "c"), "fp32", "pretrained",
                     config=run_config(f"{result.run_dir}/.hydra/config.yaml"))
    assert not marker.exists(), "a module named by storage was imported"


def test_trained_model_rebuilds_the_runs_own_task_and_checks_the_stored_settings(tmp_path):
    store = _checkpoint(tmp_path, "ok", {"task": USER_TASK, "run": {"seed": 0}})
    task, model = _run_dir(tmp_path, "ok", store).trained_model()
    assert type(task).__name__ == "VisionLanguageTask" and not model.training

    seeded_otherwise = _checkpoint(tmp_path / "other", "seed", {"task": USER_TASK, "run": {"seed": 1234}})
    with pytest.raises(ConfigError, match=r"run.seed: 1234 -> 0"):
        _run_dir(tmp_path / "other", "seed", seeded_otherwise).trained_model()
