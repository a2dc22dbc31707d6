"""What the training loop needs from its surroundings, injected: Ray Train in a run, a plain
process group and a fault injector in the loop's unit tests (tests/test_loop.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set

from raytrain_spot.distributed.collectives import RankGroup
from raytrain_spot.elastic.signals import ClusterSignals, GroupStart


@dataclass
class WorkerRuntime:
    group: RankGroup
    """This rank's collectives (rank, world size, training device)."""
    node_ids: List[str]
    """The node every rank runs on, by rank."""
    report: Callable[[int], None]
    """Joined by every rank for a committed step: a barrier (Ray Train's report in a run)."""
    signals: ClusterSignals
    """What the cluster says (the drain deadline a handoff checks its commit against)."""
    group_start: Optional[GroupStart] = GroupStart()
    """How the scaling policy started this group (elastic/capacity.py's ``GroupStarts`` in a run, read by
    rank 0): rank 0 measures the restart with it, and tells the restore which step the controller copies
    on; None: unknown, and the restart is not measured."""
    group_facts: Dict[str, Any] = field(default_factory=dict)
    """Further fields of the run's ``group`` event (in a run: how old each rank's process is)."""
    dead_nodes: Optional[Callable[[List[str]], Set[str]]] = None
    """Which of these nodes the cluster has declared dead (elastic/survivors.py's ``dead_nodes`` in a
    run); None: no survivor commit (loop/survivor_commit.py)."""
    mark_survivor: Callable[[int, str], None] = lambda rank, status: None
    """Tells the controller how a rank's survivor commit goes (``SurvivorMarks.mark`` in a run)."""
    stop_requested: Callable[[], bool] = lambda: False
    """Asked on rank 0 after each step: whether the driver asked the run to stop (loop/stop.py's ``StopPoll``
    in a run)."""

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size
