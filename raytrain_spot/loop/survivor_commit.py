"""No step lost without notice: the surviving ranks commit the state of the last step they completed.

The weights, the optimizer state and the loop state change only under the ``StepGuard``: the step's
learning rate, the optimizer step and the loop state's advance, which the training thread enters after the step's
last collective (the agreement) and leaves without another. So a rank blocked in the collective a
lost rank never joins holds, whole, the state of the last step it completed. ``SurvivorWatch``
reads the node table from a thread; once the cluster has declared nodes of the group dead and the
steps have stopped, it takes the guard (waiting at most for an optimizer step in progress) and
commits that state through the checkpoint manager's normal path (snapshot, manifest, checksums):
the lowest surviving rank to the shared tiers, every node's local writer to its node's tier. When
the lost peer's connections are reset instead (its process killed), the collective fails at once
and the training thread commits the same way on its way out. Survivors may be one step apart (a
rank can die after some ranks left the agreement's all-reduce and before others did): each commits
the last step it completed, and the restore takes the newest that verifies.

Ray Train's controller waits for these commits before it tears the group down
(elastic/survivors.py). Not for sharded checkpoints: their saves are collectives.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import statistics
import threading
import time
from dataclasses import replace
from typing import Callable, Deque, Iterator, List, Mapping, Optional, Set, Tuple, Type

import torch

from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest
from raytrain_spot.checkpoint.state import LoopState, Stateful
from raytrain_spot.elastic.survivors import COMMITTED, COMMITTING, DECLARED_GRACE_S, FAILED, WATCH_INTERVAL_S
from raytrain_spot.loop.sample_order import GlobalSampleOrder, rank_positions
from raytrain_spot.observe.events import EventLog
from raytrain_spot.observe.records import Samples, Step

logger = logging.getLogger(__name__)
SURVIVOR = "survivor"
"""The kind of a checkpoint the survivors of a loss without notice committed."""
STALLED_STEPS, STALLED_MIN_S = 5, 2.0
"""The group has stopped when no step completed for 5 typical steps and 2 s (``StepGuard.stalled``)."""
REPLAYED_STEPS = 64
"""How many of the last steps' records the lowest survivor can write again for lost ranks: a lost
process takes with it what it had not sent, at most the event log's batch (0.5 s)."""


class StepGuard:
    """Held by the training thread while the state moves (``moving``), by a survivor's commit while it
    snapshots (``lock``). On a GPU, leaving ``moving`` records an event after the step's kernels: the
    survivor's copy waits for that event on a stream of its own, not for the training stream, which
    by then waits on a collective that never completes. Also tells whether the steps have stopped
    (``stalled``): a node the GCS declares dead may still run its worker (its raylet stopped at a
    soft-off, the worker not yet), and while the group trains on there is nothing to commit."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.monotonic):
        self.lock = threading.Lock()
        self._cuda = device.type == "cuda"
        self._clock = clock
        self.completed: Optional[torch.cuda.Event] = None
        self.torn = False
        self._moved_at = clock()
        self._intervals: Deque[float] = collections.deque(maxlen=16)

    @contextlib.contextmanager
    def moving(self) -> Iterator[None]:
        with self.lock:
            try:
                yield
            except BaseException:
                self.torn = True  # the state stopped half moved: never to be committed
                raise
            if self._cuda:
                event = torch.cuda.Event()
                event.record()
                self.completed = event
            now = self._clock()
            self._intervals.append(now - self._moved_at)
            self._moved_at = now

    def stalled(self) -> bool:
        """No step has completed for ``STALLED_STEPS`` of the recent steps' median, and ``STALLED_MIN_S``."""
        typical = statistics.median(self._intervals) if self._intervals else 0.0
        return self._clock() - self._moved_at >= max(STALLED_MIN_S, STALLED_STEPS * typical)


class SurvivorCommit:
    """What a surviving rank does once the cluster declared nodes of its group dead; see the module docstring."""

    def __init__(self, checkpoints: CheckpointManager, parts: Mapping[str, Stateful], loop: LoopState,
                 guard: StepGuard, node_ids: List[str], rank: int, mark: Callable[[int, str], None],
                 events: EventLog, replay: "RecordReplay"):
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
            if self._guard.torn:
                logger.error("Nodes %s were declared dead, but this rank's state stopped inside an optimizer step: "
                             "nothing to commit", sorted(lost))
                self._mark(self._rank, FAILED)
                return
            if state.step <= self._checkpoints.committed_step:
                logger.info("Nodes %s were declared dead; step %d is committed already", sorted(lost), state.step)
                self._mark(self._rank, f"{COMMITTED}:{state.step}")  # the controller waits for the writer's word
                return
            self._mark(self._rank, COMMITTING)
            tiers = ["the shared tiers"] if writer else []
            tiers += ["this node's"] if self._checkpoints.writes_local else []
            logger.warning("Nodes %s were declared dead: committing step %d, the last this rank completed, to %s",
                           sorted(lost), state.step, " and ".join(tiers))
            try:
                self._checkpoints.save(self._parts, SaveRequest(state, world_size, SURVIVOR, reason="failure"),
                                       writer=writer, wait=True, after=self._guard.completed)
                if writer:
                    self._replay(state, [rank for rank in range(world_size) if rank not in survivors])
                self._events.send()  # this rank's records of the steps the commit holds, before the teardown
            finally:
                committed = state.step == (self._checkpoints.committed_step if writer
                                           else self._checkpoints.local_step)
                self._mark(self._rank, f"{COMMITTED}:{state.step}" if committed else FAILED)


class RecordReplay:
    """The records of the last steps that lost ranks took with them (a process sends its step records
    in batches): rank 0's step records the event log never got, and, with ``run.log_sample_ids``, each
    lost rank's sample records (a step's rows on any rank are a function of its cursor). Every rank
    keeps the last ``REPLAYED_STEPS`` step records, as rank 0 makes them; the lowest survivor writes
    them again."""

    def __init__(self, order: GlobalSampleOrder, global_batch: int, world_size: int, events: EventLog,
                 sample_ids: bool):
        self._order = order
        self._global_batch = global_batch
        self._world_size = world_size
        self._events = events
        self._sample_ids = sample_ids
        self._recent: Deque[Step] = collections.deque(maxlen=REPLAYED_STEPS)

    def stepped(self, record: Step) -> None:
        self._recent.append(record)

    def __call__(self, state: LoopState, lost_ranks: List[int]) -> None:
        steps = [record for record in self._recent if record.step <= state.step]
        if 0 in lost_ranks:
            written = self._events.last_step()
            for record in steps:
                if written is None or record.step > written:
                    self._events.emit_soon(record)
        if self._sample_ids:
            for record in steps:
                for rank in lost_ranks:
                    positions = rank_positions(record.samples[0], self._global_batch, rank, self._world_size)
                    self._events.emit_soon(Samples(step=record.step, rank=rank, ids=self._order.rows_at(positions)))


class SurvivorWatch:
    """Reads which of the group's nodes the cluster declared dead, every ``interval_s`` in a thread.
    Once one is, no other has joined it for ``settle_s`` (so the survivors agree on the lowest of
    them, the writer of the shared tiers) and the steps have stopped (``stalled``), hands them to
    ``commit`` and ends. Also commits when the training thread leaves the block with a failure other
    than ``planned_exits``: a lost peer whose connections were reset (its process killed, not its VM
    powered off) fails the collective at once instead of hanging it, and the state is as whole then.
    A no-op without ``dead_nodes``."""

    def __init__(self, node_ids: List[str], rank: int, dead_nodes: Optional[Callable[[List[str]], Set[str]]],
                 commit: Callable[[Set[str]], None], stalled: Callable[[], bool],
                 planned_exits: Tuple[Type[BaseException], ...] = (KeyboardInterrupt, SystemExit),
                 interval_s: float = WATCH_INTERVAL_S, settle_s: float = DECLARED_GRACE_S):
        self._node_ids = node_ids
        self._own_node = node_ids[rank]
        self._dead_nodes = dead_nodes
        self._commit = commit
        self._stalled = stalled
        self._planned_exits = planned_exits
        self._interval_s = interval_s
        self._settle_s = settle_s
        self._stop = threading.Event()
        self._committed = False
        self._thread = threading.Thread(target=self._run, name="survivor-watch", daemon=True)

    def __enter__(self) -> "SurvivorWatch":
        if self._dead_nodes is not None:
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._stop.set()
        if self._dead_nodes is None or exc is None or isinstance(exc, self._planned_exits):
            return
        self._thread.join()  # a commit it began ends first; it commits once
        if self._committed:
            return
        logger.warning("The training thread failed (%s: %s); committing the last step it completed",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        self._commit_once(self._settled_loss() - {self._own_node})

    def _settled_loss(self) -> Set[str]:
        """The group's dead nodes once no other has joined them for ``settle_s``, waiting at most twice
        that: the collective fails as soon as the first lost node's connections reset (the simulator
        reaps a node Ray declared dead), a health-check period before the nodes lost with it are
        declared, and a survivor that counted a lost rank alive would leave the shared tiers unwritten."""
        declared = _Declared(self._settle_s)
        started = time.monotonic()
        while True:
            try:
                declared.read(self._dead_nodes(self._node_ids))
            except Exception:  # noqa: BLE001 - unreadable now: keep what was read (at worst nothing: the
                pass  # lowest rank writes the shared tiers, every node its own)
            if declared.settled or time.monotonic() - started >= 2 * self._settle_s:
                return declared.lost
            time.sleep(self._interval_s)

    def _commit_once(self, lost: Set[str]) -> None:
        self._committed = True
        try:
            self._commit(lost)
        except Exception:  # noqa: BLE001 - the run falls back to its last checkpoint, as without this
            logger.exception("The survivor commit failed")

    def _run(self) -> None:
        declared = _Declared(self._settle_s)
        while not self._stop.wait(self._interval_s):
            try:
                declared.read(self._dead_nodes(self._node_ids))
            except Exception:  # noqa: BLE001 - a GCS hiccup: look again next interval
                logger.warning("Cannot read the node table", exc_info=True)
                continue
            # This rank's own node declared dead: its raylet is gone, its disk may be too; the others commit.
            if not declared.lost or self._own_node in declared.lost or not declared.settled or not self._stalled():
                continue
            self._commit_once(declared.lost)
            return


class _Declared:
    """The group's nodes declared dead, as read, and whether no other has joined them for ``settle_s``:
    nodes that lost power together are declared dead within a health-check period of each other."""

    def __init__(self, settle_s: float):
        self._settle_s = settle_s
        self.lost: Set[str] = set()
        self._since = time.monotonic()

    def read(self, lost: Set[str]) -> None:
        if lost != self.lost:
            self.lost, self._since = lost, time.monotonic()

    @property
    def settled(self) -> bool:
        return time.monotonic() - self._since >= self._settle_s
