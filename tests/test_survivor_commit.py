"""A rank lost without notice at every phase of a step: its survivor commits the last step it
completed, whole, and a group resumed from that commit at another size ends with the uninterrupted
run's weights.

A plain gloo group of two ranks with no Ray cluster (tests/test_loop.py's harness). The lost rank
stops itself with SIGSTOP at the phase under test, as a powered-off VM stops: its peer's collective
hangs, nothing is reset. The test then plays the cluster: it declares the rank's node dead (the
survivor's watch reads that as it reads Ray's node table), waits for the survivor's mark, as the
controller does, and kills both processes, as the controller's teardown does.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_spot.checkpoint.format import STATE_FILE, checkpoint_key, load_state, read_manifest
from raytrain_spot.checkpoint.manager import CheckpointManager
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.config.schema import Config
from raytrain_spot.distributed.collectives import RankGroup
from raytrain_spot.elastic.survivors import COMMITTING
from raytrain_spot.loop.runtime import WorkerRuntime
from raytrain_spot.loop.strategy import SPOT
from raytrain_spot.loop.worker import Phases, run_group
from raytrain_spot.storage.store import LocalStore
from tests.conftest import Recorder, stored_path
from tests.test_loop import RUN, FaultInjector, LinearTask, config, of, train_group

NODES = ["node-a", "node-b"]
STEPS = 10
AT = 5
"""The step the loss lands in."""
GLOBAL_BATCH = 8  # tests/test_loop.py's config
SURVIVOR_PAUSE_S = 4.0
"""How long the survivor's optimizer step pauses between two parameters, when the loss lands in it:
longer than its watch takes to find the steps stopped (loop/survivor_commit.py's ``STALLED_MIN_S``)."""


@dataclass
class Loss:
    """Rank ``rank`` loses power at ``phase`` of step ``AT`` (or, with SIGKILL, its process dies)."""

    rank: int
    phase: str
    """forward (before the gradients' all-reduce), agreement (before the step's agreement), optimizer
    (in the optimizer step, after the agreement), between_steps (after the optimizer step, as the next step's
    forward begins), upload
    (rank 0, in the background upload of a periodic save of step AT, its files up, not its manifest)."""
    signal: int = signal.SIGSTOP
    """SIGSTOP: its connections go silent, the peer's collective hangs (a powered-off VM); SIGKILL: the
    kernel resets them, the peer's collective fails at once, and nothing declares a node dead."""

    def __call__(self) -> None:
        os.kill(os.getpid(), self.signal)


class OneAtATimeSGD(torch.optim.Optimizer):
    """SGD that moves the parameters one at a time and calls ``between`` in between: a snapshot
    taken inside its step would hold some parameters of the new step and some of the last."""

    def __init__(self, params, between):
        super().__init__(params, {"lr": 0.05})
        self._between = between

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        for index, param in enumerate(params):
            if index:
                self._between()
            param.add_(param.grad, alpha=-self.param_groups[0]["lr"])


@dataclass
class PhasedTask(LinearTask):
    """tests/test_loop.py's task, whose lost rank stops at the phase of ``loss``."""

    loss_at: Optional[Loss] = None

    def __post_init__(self):
        super().__post_init__()
        self.updating = 0  # the step whose update began last: the loop sets the learning rate there

    def _lost_here(self, phase: str, step: int) -> bool:
        return (self.loss_at is not None and self.loss_at.phase == phase and step == AT
                and dist.get_rank() == self.loss_at.rank)

    def learning_rate(self, samples_seen, total_samples, optim):
        self.updating = samples_seen // GLOBAL_BATCH + 1
        return super().learning_rate(samples_seen, total_samples, optim)

    def loss(self, model, batch):
        if self._lost_here("forward", self.updating + 1) or self._lost_here("between_steps", self.updating):
            self.loss_at()
        return super().loss(model, batch)

    def build_optimizer(self, model, optim):
        return OneAtATimeSGD(model.parameters(), self._between_parameters)

    def _between_parameters(self):
        if self.loss_at is None or self.loss_at.phase != "optimizer" or self.updating != AT:
            return
        if self._lost_here("optimizer", self.updating):
            self.loss_at()
        else:
            time.sleep(SURVIVOR_PAUSE_S)  # the survivor is inside its optimizer step when it hears of the loss


class PhasedSignals(FaultInjector):
    """No notice; the lost rank stops just before the step's agreement when that is ``loss_at``'s phase."""

    def __init__(self, node_ids: List[str], loss_at: Loss):
        super().__init__(node_ids)
        self.loss_at = loss_at

    def leaving_nodes(self, step):
        if self.loss_at.phase == "agreement" and step == AT and dist.get_rank() == self.loss_at.rank:
            self.loss_at()
        return super().leaving_nodes(step)


class FreezingStore(LocalStore):
    """Durable storage on local disk where rank 0 stops after putting a file of step ``AT``."""

    def __init__(self, root: str, loss_at: Optional[Loss]):
        super().__init__(root)
        self._loss_at = loss_at

    def put_file(self, key: str, local_path: str) -> None:
        super().put_file(key, local_path)
        if (self._loss_at and self._loss_at.phase == "upload" and key.startswith(checkpoint_key(RUN, AT) + "/")
                and dist.get_rank() == self._loss_at.rank):
            self._loss_at()


def _rank_losing_power(rank: int, world_size: int, init_file: str, storage: str, loss_at: Loss, cfg: Config,
                       out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    group = RankGroup(torch.device("cpu"))
    events = Recorder()
    durable = StoreTier("durable", FreezingStore(storage, loss_at), RUN, keep_latest_k=5)
    local = StoreTier("local", LocalStore(f"{storage}-on-{NODES[rank]}"), RUN, keep_latest_k=5)
    checkpoints = CheckpointManager(RUN, cfg.to_dict(), local, [durable], writes_local=True, events=events,
                                    scratch_root=f"{storage}/../scratch-{rank}", group=group)
    signals = PhasedSignals(NODES, loss_at)

    def dead_nodes(node_ids: List[str]) -> set:
        declared = os.path.join(out, "declared-dead")
        return {open(declared).read()} & set(node_ids) if os.path.exists(declared) else set()

    def mark(rank: int, status: str) -> None:
        with open(os.path.join(out, f"mark-{rank}.tmp"), "w") as f:
            f.write(status)
        os.replace(os.path.join(out, f"mark-{rank}.tmp"), os.path.join(out, f"mark-{rank}"))

    runtime = WorkerRuntime(group, NODES, report=lambda step: None, signals=signals, dead_nodes=dead_nodes,
                            mark_survivor=mark)
    policy = SPOT.group_policy(cfg, signals, NODES, events.emit, None)
    run_group(cfg, PhasedTask(loss_at=loss_at), runtime, policy, checkpoints, events, Phases())


def lose_power(tmp_path, loss_at: Loss, cfg: Config, declare_dead: bool = True) -> Dict[int, str]:
    """Train two ranks until ``loss_at``'s rank stops; declare its node dead and wait for the survivor's
    mark (at most 60 s), or, without ``declare_dead``, wait a second; kill both. Returns the marks by rank."""
    out = tmp_path / "lost-group"
    out.mkdir()
    context = mp.start_processes(_rank_losing_power, args=(2, str(out / "pg"), str(tmp_path / "durable"), loss_at, cfg,
                                                           str(out)),
                                 nprocs=2, start_method="spawn", join=False)
    survivor = 1 - loss_at.rank
    try:
        lost = context.processes[loss_at.rank]
        deadline = time.time() + 120
        while lost.is_alive() and psutil.Process(lost.pid).status() != psutil.STATUS_STOPPED:
            assert time.time() < deadline, "the rank never stopped"
            time.sleep(0.05)
        if not declare_dead:
            time.sleep(1.0)  # the survivor's watch looks twice and sees no dead node
        else:
            if loss_at.signal == signal.SIGSTOP:
                (out / "declared-dead").write_text(NODES[loss_at.rank])
            deadline = time.time() + 60
            mark = out / f"mark-{survivor}"
            while not mark.exists() or mark.read_text() == COMMITTING:
                assert time.time() < deadline, "the survivor never ended its commit"
                time.sleep(0.05)
    finally:
        for process in context.processes:
            process.kill()
            process.join()
    return {rank: (out / f"mark-{rank}").read_text() for rank in range(2) if (out / f"mark-{rank}").exists()}


def final_weights(storage: str) -> Dict[str, torch.Tensor]:
    store = LocalStore(storage)
    key = checkpoint_key(RUN, STEPS)
    assert read_manifest(store, key).kind == "final"
    return load_state(stored_path(store, key, STATE_FILE))["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Dict[str, torch.Tensor]:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    train_group(tmp_path, 2, FaultInjector(NODES), config(max_steps=STEPS), task=PhasedTask())
    return final_weights(str(tmp_path / "durable"))


@pytest.mark.parametrize("loss_at, completed", [
    (Loss(rank=1, phase="forward"), AT - 1),
    (Loss(rank=1, phase="agreement"), AT - 1),
    (Loss(rank=1, phase="optimizer"), AT),
    (Loss(rank=0, phase="between_steps"), AT),
    (Loss(rank=0, phase="upload"), (AT, AT + 1)),  # its training thread may complete AT + 1 before the upload stops
    (Loss(rank=1, phase="forward", signal=signal.SIGKILL), AT - 1),
], ids=lambda value: f"{value.phase}-{signal.Signals(value.signal).name}" if isinstance(value, Loss) else None)
def test_a_loss_at_any_phase_of_a_step_loses_no_completed_step(tmp_path, uninterrupted, loss_at, completed):
    cfg = config(max_steps=STEPS, interval_steps=AT if loss_at.phase == "upload" else 0)
    marks = lose_power(tmp_path, loss_at, cfg)
    survivor = 1 - loss_at.rank
    assert set(marks) == {survivor}, "the survivor commits the last step it completed"
    committed = int(marks[survivor].removeprefix("committed:"))
    assert committed in (completed if isinstance(completed, tuple) else (completed,)), marks
    completed = committed
    if loss_at.phase != "upload":  # there the survivor's own periodic copy of AT is on its node
        assert read_manifest(LocalStore(str(tmp_path / "durable")), checkpoint_key(RUN, completed)).kind == "survivor"

    # The next group, of one rank on the survivor's node, resumes from it and trains to the end.
    (resumed,) = train_group(tmp_path, 1, FaultInjector([NODES[survivor]]), config(max_steps=STEPS),
                             task=PhasedTask(), storage=str(tmp_path / "durable"))
    assert [r["step"] for r in of(resumed, "restore")] == [completed]
    assert sorted(of(resumed, "step"), key=lambda e: e["step"])[0]["step"] == completed + 1
    for name, value in uninterrupted.items():
        torch.testing.assert_close(final_weights(str(tmp_path / "durable"))[name], value, rtol=1e-5, atol=1e-6,
                                   msg=f"{name}: the resumed run left the uninterrupted one")


def test_without_a_survivor_commit_the_resume_falls_back_to_the_last_checkpoint(tmp_path, uninterrupted):
    """Nothing declares the node dead (the watch is off, or its commit missed the deadline): the
    controller's teardown kills the survivor in its collective, and the run resumes from the periodic
    checkpoint before the loss, redoing the steps since, as it always did."""
    marks = lose_power(tmp_path, Loss(rank=1, phase="forward"), config(max_steps=STEPS, interval_steps=3),
                       declare_dead=False)
    assert marks == {}
    (resumed,) = train_group(tmp_path, 1, FaultInjector([NODES[0]]), config(max_steps=STEPS),
                             task=PhasedTask(), storage=str(tmp_path / "durable"))
    assert [r["step"] for r in of(resumed, "restore")] == [3]
    for name, value in uninterrupted.items():
        torch.testing.assert_close(final_weights(str(tmp_path / "durable"))[name], value, rtol=1e-5, atol=1e-6)
