"""What the training loop needs from its surroundings, injected: Ray Train in a run, a plain
process group and a fault injector in the loop's unit tests (tests/test_loop.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Protocol, Set

from raytrain_spot.train.collectives import RankGroup


@dataclass(frozen=True)
class ExtraCapacity:
    """More workers fit than the group has: how many in all, and since how long."""

    workers: int
    age_s: float


class ClusterSignals(Protocol):
    """What the cluster says after a step. Every rank asks once per step; the answers of all
    ranks are then agreed on (train/agreement.py), so a rank that hears first is enough."""

    def leaving_nodes(self, step: int) -> Set[str]:
        """Nodes of the group with a preemption notice, as this rank knows them after ``step``."""

    def extra_capacity(self, step: int) -> Optional[ExtraCapacity]:
        """Asked on rank 0 only: the larger group that would fit now, if any (the regrow rule,
        elastic/regrow.py, decides whether it pays)."""

    def usable_workers(self, step: int, leaving: Collection[str]) -> Optional[int]:
        """Asked on rank 0 only, while nodes have a notice: the workers that fit on alive nodes that
        are not ``leaving`` and have no notice of their own, if known (the notice hold, train/handoff.py)."""

    def drain_deadline_s(self, nodes: Collection[str]) -> Optional[float]:
        """When the first of these nodes stops (unix seconds), if known."""


class StandbyWarmup(Protocol):
    """Rank 0's warm standbys on the nodes a notice leaves (elastic/standby.py's ``NoticeWarmup`` in a run)."""

    def start(self, staying: Mapping[str, int]) -> None:
        """Start standbys for the group restarted without the noticed nodes (``staying``: node id -> ranks
        that stay there)."""

    def missing(self, staying: Mapping[str, int]) -> int:
        """How many of them are not warm yet."""


@dataclass
class WorkerRuntime:
    group: RankGroup
    """This rank's collectives (rank, world size, training device)."""
    node_ids: List[str]
    """The node every rank runs on, by rank."""
    report: Callable[[int], None]
    """Joined by every rank for a committed step: a barrier (Ray Train's report in a run)."""
    signals: ClusterSignals
    warmup: Optional[StandbyWarmup] = None
    """Rank 0's notice warm-up of the nodes that stay (train/handoff.py); None: the group hands off cold."""
    group_facts: Dict[str, Any] = field(default_factory=dict)
    """Further fields of the run's ``group`` event (in a run: how old each rank's process is)."""
    stop_requested: Callable[[], bool] = lambda: False
    """Asked on rank 0 after each step: whether the driver asked the run to stop (train/stop.py's ``StopPoll``
    in a run)."""

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size
