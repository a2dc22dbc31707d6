"""No step lost without notice: the surviving ranks commit the state of the last step they completed.

The weights, the optimizer state and the loop state change only under the ``StepGuard``: the
optimizer step and the loop state's advance, which the training thread enters after the step's
last collective (the agreement) and leaves without another. So a rank blocked in the collective a
lost rank never joins holds, whole, the state of the last step it completed. ``SurvivorWatch``
reads the node table from a thread; when the cluster declares one of the group's nodes dead, it
takes the guard (waiting at most for an optimizer step in progress) and commits that state through
the checkpoint manager's normal path (snapshot, manifest, checksums): the lowest surviving rank
to the shared tiers, every node's local writer to its node's tier. Survivors may be one step apart
(a rank can die after some ranks left the agreement's all-reduce and before others did): each
commits the last step it completed, and the restore takes the newest that verifies.

Ray Train's controller waits for these commits before it tears the group down
(elastic/survivors.py). Not for sharded checkpoints: their saves are collectives.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import replace
from typing import Callable, Iterator, List, Mapping, Optional, Set

import torch

from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest
from raytrain_spot.checkpoint.state import LoopState, Stateful
from raytrain_spot.elastic.survivors import COMMITTED, COMMITTING, FAILED, WATCH_INTERVAL_S
from raytrain_spot.loop.sample_order import GlobalSampleOrder, rank_positions
from raytrain_spot.observe.events import EventLog
from raytrain_spot.observe.records import Samples

logger = logging.getLogger(__name__)
SURVIVOR = "survivor"
"""The kind of a checkpoint the survivors of a loss without notice committed."""
REPLAYED_STEPS = 64
"""How many of the last steps' sample records the lowest survivor writes again for each lost rank:
a lost process takes with it what it had not sent, at most the event log's batch (0.5 s)."""


class StepGuard:
    """Held by the training thread while the state moves (``moving``), by a survivor's commit while it
    snapshots (``lock``). On a GPU, leaving ``moving`` records an event after the step's kernels: the
    survivor's copy waits for that event on a stream of its own, not for the training stream, which
    by then waits on a collective that never completes."""

    def __init__(self, device: torch.device):
        self.lock = threading.Lock()
        self._cuda = device.type == "cuda"
        self.completed: Optional[torch.cuda.Event] = None

    @contextlib.contextmanager
    def moving(self) -> Iterator[None]:
        with self.lock:
            yield
            if self._cuda:
                event = torch.cuda.Event()
                event.record()
                self.completed = event


class SurvivorCommit:
    """What a surviving rank does once the cluster declared nodes of its group dead; see the module docstring."""

    def __init__(self, checkpoints: CheckpointManager, parts: Mapping[str, Stateful], loop: LoopState,
                 guard: StepGuard, node_ids: List[str], rank: int, mark: Callable[[int, str], None],
                 events: EventLog, replay: Optional["SampleReplay"] = None):
        self._checkpoints = checkpoints
        self._parts = parts
        self._loop = loop
        self._guard = guard
        self._node_ids = node_ids
        self._rank = rank
        self._mark = mark
        self._events = events
        self._replay = replay

    def __call__(self, lost: Set[str]) -> None:
        world_size = len(self._node_ids)
        survivors = [rank for rank in range(world_size) if self._node_ids[rank] not in lost]
        writer = self._rank == survivors[0]
        if not writer and not self._checkpoints.writes_local:
            return  # another rank on this node keeps its copy
        with self._guard.lock:  # the training thread is blocked in a collective, or finishing an optimizer step
            state = replace(self._loop, handed_off_at=0.0)  # no handoff: its restart is not measured
            if state.step <= self._checkpoints.committed_step:
                logger.info("Nodes %s were declared dead; step %d is committed already", sorted(lost), state.step)
                return
            self._mark(self._rank, COMMITTING)
            logger.warning("Nodes %s were declared dead: committing step %d, the last this rank completed, to %s",
                           sorted(lost), state.step, "the shared tiers and this node's" if writer else "this node's")
            try:
                self._checkpoints.save(self._parts, SaveRequest(state, world_size, SURVIVOR, reason="failure"),
                                       writer=writer, wait=True, after=self._guard.completed)
                if writer and self._replay is not None:
                    self._replay(state, [rank for rank in range(world_size) if rank not in survivors])
                self._events.send()  # this rank's records of the steps the commit holds, before the teardown
            finally:
                committed = state.step == (self._checkpoints.committed_step if writer
                                           else self._checkpoints.local_step)
                self._mark(self._rank, f"{COMMITTED}:{state.step}" if committed else FAILED)


class SampleReplay:
    """The sample records of the last steps, written again for lost ranks (``run.log_sample_ids``):
    a step's rows on any rank are a function of its cursor."""

    def __init__(self, order: GlobalSampleOrder, global_batch: int, world_size: int, first_step: int,
                 events: EventLog):
        self._order = order
        self._global_batch = global_batch
        self._world_size = world_size
        self._first_step = first_step  # this group's: earlier steps were trained by another group
        self._events = events

    def __call__(self, state: LoopState, lost_ranks: List[int]) -> None:
        for step in range(max(self._first_step + 1, state.step - REPLAYED_STEPS + 1), state.step + 1):
            cursor = state.samples_seen - (state.step - step + 1) * self._global_batch
            for rank in lost_ranks:
                positions = rank_positions(cursor, self._global_batch, rank, self._world_size)
                self._events.emit_soon(Samples(step=step, rank=rank, ids=self._order.rows_at(positions)))


class SurvivorWatch:
    """Reads which of the group's nodes the cluster declared dead, every ``interval_s`` in a thread;
    at the first, hands them to ``commit`` once and stops. A no-op without ``dead_nodes``."""

    def __init__(self, node_ids: List[str], rank: int, dead_nodes: Optional[Callable[[List[str]], Set[str]]],
                 commit: Callable[[Set[str]], None], interval_s: float = WATCH_INTERVAL_S):
        self._node_ids = node_ids
        self._own_node = node_ids[rank]
        self._dead_nodes = dead_nodes
        self._commit = commit
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="survivor-watch", daemon=True)

    def __enter__(self) -> "SurvivorWatch":
        if self._dead_nodes is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                lost = self._dead_nodes(self._node_ids)
            except Exception:  # noqa: BLE001 - a GCS hiccup: look again next interval
                logger.warning("Cannot read the node table", exc_info=True)
                continue
            if not lost:
                continue
            if self._own_node in lost:  # cut off from the cluster, not a survivor: the others commit
                logger.warning("This rank's own node %s was declared dead", self._own_node)
                return
            try:
                self._commit(lost)
            except Exception:  # noqa: BLE001 - the run falls back to its last checkpoint, as without this
                logger.exception("The survivor commit failed")
            return
