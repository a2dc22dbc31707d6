"""The Python API: bad settings refused in the caller before any process or cluster starts; a run
started, stopped and its result found where it wrote it."""

import os
import tempfile

import pytest

import raytrain_spot
from raytrain_spot.config.errors import ConfigError
from tests.conftest import assert_clean_audit


@pytest.mark.parametrize("override, named", [
    ("trainer.max_step=10", "trainer.max_step"),
    ("trainer.max_steps=-1", "trainer.max_steps"),
    ("task.model.preset=huge", "task.model.preset"),
])
def test_a_bad_setting_raises_in_the_caller_naming_it(tmp_path, override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.") + ".*Fix"):
        raytrain_spot.start(["+experiment=hf_vlm" if "task.model" in override else "+experiment=vlm", override],
                            workdir=str(tmp_path))
    assert not os.path.exists(tmp_path / "outputs"), "nothing started"


def test_the_run_name_and_directory_are_resolved_once_for_caller_and_run(tmp_path):
    from raytrain_spot.api import checked_run, quoted

    name, run_dir, _ = checked_run(["+experiment=vlm"], str(tmp_path))
    assert name.startswith("vlm-") and "${" not in name and run_dir == str(tmp_path / "outputs" / name)
    assert checked_run(["+experiment=vlm", "run.name=mine", "trainer.max_steps=7"], str(tmp_path)) == \
        ("mine", str(tmp_path / "outputs/mine"), 7)
    assert checked_run(["+experiment=vlm", "run.name=mine", "hydra.run.dir=runs/${run.name}-x"], str(tmp_path))[:2] == \
        ("mine", str(tmp_path / "runs/mine-x"))
    odd = str(tmp_path / "it's a dir")  # what start() hands the run, quoted, comes back whole
    assert checked_run(["+experiment=vlm", "run.name=mine", f"hydra.run.dir={quoted(odd)}"], str(tmp_path))[:2] == \
        ("mine", odd)


@pytest.mark.cluster
def test_a_run_stopped_from_the_api_in_its_own_hydra_run_dir(tmp_path):
    """``Run.stop()`` ends the run at a durable final checkpoint with its summary, and ``wait()`` finds
    that summary where ``hydra.run.dir`` put the run, not under outputs/<run.name>."""
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")  # Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = ray_tmp  # the run's process inherits it
    try:
        run = raytrain_spot.start(["+experiment=vlm", "run.name=api-stop", "hydra.run.dir=elsewhere/dir",
                                   "cluster.num_worker_nodes=2", "trainer.max_workers=2", "trainer.max_steps=100000",
                                   f"checkpoint.local_dir={tmp_path}/node-local",
                                   f"checkpoint.head_dir={tmp_path}/head"],
                                  workdir=str(tmp_path))
        assert next((e for e in run.follow() if e["ev"] == "step"), None), open(run.log_path).read()[-3000:]
        run.stop()
        result = run.wait(timeout=300)
    finally:
        del os.environ["RAY_TMPDIR"]
    assert run.process.returncode == 130
    assert result.run_dir == str(tmp_path / "elsewhere" / "dir") and result.run_name == "api-stop"
    assert result.status == "stopped" and result.ledger
    stopped = next(e["step"] for e in result.events() if e["ev"] == "stopped")
    assert result.summary["durable_checkpoint_step"] == stopped
    assert_clean_audit("api-stop", f"file://{tmp_path}/outputs/storage", f"{tmp_path}/head",
                       f"{tmp_path}/node-local", stopped, ray_tmp)


def test_the_public_names_stay_the_api_whatever_the_caller_imported():
    """A custom task imports the task base class; the API's ``train`` must stay a function after it
    (a subpackage named like it would replace the attribute on import)."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(raytrain_spot.__path__, "raytrain_spot."):
        if not module.name.startswith("raytrain_spot.tasks.hf_vlm"):  # the [hf] extra
            importlib.import_module(module.name)
    assert callable(raytrain_spot.train) and callable(raytrain_spot.start)
    assert raytrain_spot.TrainingTask.__module__ == "raytrain_spot.loop.task"
    assert issubclass(raytrain_spot.ConfigError, ValueError)


@pytest.mark.cluster
def test_the_api_trains_twice_in_one_process_after_a_task_is_imported(tmp_path):
    """A notebook's second ``raytrain_spot.train([...])``, after a cell that defined a task."""
    import raytrain_spot.loop.task  # noqa: F401  what every custom task imports

    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    try:
        results = [raytrain_spot.train(["+experiment=vlm", f"run.name=twice-{i}", "cluster.num_worker_nodes=1",
                                        "trainer.max_workers=1", "trainer.max_steps=3",
                                        f"checkpoint.local_dir={tmp_path}/node-local",
                                        f"checkpoint.head_dir={tmp_path}/head"], workdir=str(tmp_path))
                   for i in range(2)]
    finally:
        del os.environ["RAY_TMPDIR"]
    assert [(r.run_name, r.status, r.summary["durable_checkpoint_step"]) for r in results] == \
        [("twice-0", "finished", 3), ("twice-1", "finished", 3)]
