"""The checkpoint tiers' directories: a killed worker's scratch is swept at the next start, and
the tier roots are private to their user."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from raytrain_spot.checkpoint.manager import CheckpointManager
from raytrain_spot.checkpoint.scratch import private_dir, scratch_prefix, sweep_orphans
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.config.errors import ConfigError
from raytrain_spot.config.schema import CheckpointingConfig
from raytrain_spot.observe.events import EventLog
from raytrain_spot.storage.store import LocalStore

# A worker that saves a large state without end (so it is always mid-save when killed).
SAVING_WORKER = """
import sys, torch
from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest
from raytrain_spot.checkpoint.state import LoopState
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.observe.events import EventLog
from raytrain_spot.storage.store import LocalStore
scratch, storage = sys.argv[1:]
model = torch.nn.Linear(2048, 2048)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
manager = CheckpointManager("r", {}, None, [StoreTier("durable", LocalStore(storage), "r", 2)], writes_local=False,
                            events=EventLog(), scratch_root=scratch)
step = 0
while True:
    step += 1
    manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(step, step), 1, "periodic"),
                 writer=True, wait=True)
"""


def _manager(scratch: str, storage: str) -> CheckpointManager:
    return CheckpointManager("r", {}, None, [StoreTier("durable", LocalStore(storage), "r", 2)], writes_local=False,
                             events=EventLog(), scratch_root=scratch)


@pytest.mark.slow
def test_the_scratch_of_a_worker_killed_mid_save_is_swept_at_the_next_start(tmp_path):
    scratch, storage = str(tmp_path / "scratch"), str(tmp_path / "storage")
    def saves():
        return [n for n in (os.listdir(scratch) if os.path.isdir(scratch) else []) if n.startswith("save-")]

    seen = set()
    for _ in range(3):  # seen after three SIGKILLs
        worker = subprocess.Popen([sys.executable, "-c", SAVING_WORKER, scratch, storage])
        deadline = time.time() + 300
        while not set(saves()) - seen:
            assert time.time() < deadline and worker.poll() is None, "the worker never started a save"
            time.sleep(0.01)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        seen |= set(saves())
    assert len(saves()) == 1, f"each start sweeps the saves of the workers killed before it: {saves()}"

    ours = os.path.join(scratch, f"{scratch_prefix('save')}step_00000009-live")
    os.mkdir(ours)  # a save of a live process: not touched
    _manager(scratch, storage)
    assert sorted(os.listdir(scratch)) == [os.path.basename(ours)]


def test_sweep_takes_only_scratch_directories_of_gone_processes(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    names = [f"restore-{dead_pid}-abc", f"save-{dead_pid}-step_00000001-x", f"save-{os.getpid()}-step_00000002-y",
             "save-step_00000003-old-style", "data"]
    for name in names:
        os.mkdir(tmp_path / name)
    assert sweep_orphans(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def test_the_tier_roots_are_private_under_the_users_cache_by_default(tmp_path):
    defaults = CheckpointingConfig()
    for root in (defaults.head_dir, defaults.local_dir):
        assert root.startswith("~/.cache/raytrain_spot/"), root
    root = private_dir(str(tmp_path / "a" / "b" / "node-local"), "checkpoint.local_dir")
    for directory in (tmp_path / "a", tmp_path / "a" / "b", root):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    os.chmod(root, 0o755)
    private_dir(root, "checkpoint.local_dir")
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, "a root opened up is made private again"


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory another user owns needs root")
def test_a_tier_root_another_user_owns_is_refused(tmp_path):
    planted = tmp_path / "raytrain_spot"
    planted.mkdir()
    os.chown(planted, 12345, 12345)
    os.chmod(tmp_path, 0o755)
    with pytest.raises(ConfigError, match=r"checkpoint.head_dir: .*raytrain_spot belongs to another user \(uid 12345\)"
                                          r".*Fix: set checkpoint.head_dir"):
        private_dir(str(planted / "head" / "ns"), "checkpoint.head_dir")


@pytest.mark.slow  # a subprocess that imports the whole command: ~90 s on 2 busy cores
@pytest.mark.skipif(os.getuid() != 0, reason="making a directory another user owns needs root")
def test_the_main_command_refuses_a_head_dir_another_user_owns_before_ray_starts(tmp_path):
    from tests.conftest import run_main

    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, 12345, 12345)
    result = run_main("+experiment=vlm", "run.name=private", f"checkpoint.head_dir={planted}",
                      f"checkpoint.local_dir={tmp_path}/node-local", cwd=str(tmp_path), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "checkpoint.head_dir: " in result.stderr and "belongs to another user (uid 12345)" in result.stderr
    assert "Ray" not in result.stdout, "stopped before Ray started"
