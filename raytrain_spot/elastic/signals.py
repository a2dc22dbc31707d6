"""What the cluster tells a running group after each step, as the loop asks it: notices, extra
capacity, usable workers, drain deadlines; the warm standbys a notice starts; and, once, how the
group was started. Ray in a run (elastic/capacity.py), a fault injector in the loop's unit tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Optional, Protocol, Set


@dataclass(frozen=True)
class ExtraCapacity:
    """More workers fit than the group has: how many in all, and since how long."""

    workers: int
    age_s: float


@dataclass(frozen=True)
class GroupStart:
    """What the scaling policy knew as it started a group (elastic/policy.py): its rank 0 measures the
    restart since the last handoff with it, for the regrow rule (elastic/regrow.py), and its restore
    leaves a step to the controller's copy-on."""

    waited_s: float = 0.0
    """Seconds the policy waited for capacity before it started the group (fewer than ``min_workers``
    fit on alive, non-draining nodes): nothing could have trained then, so it is not the restart's."""
    driver_started_at: float = 0.0
    """When this run's driver (its Ray Train controller) started, unix seconds: a handoff before it
    ended an earlier driver's run, and the time between the two is no restart."""
    copying_on: Optional[int] = None
    """A handoff's step the controller copies on to the shared tiers from a node's copy (elastic/stranded.py):
    the group restores it as usual and leaves its copy-on to the controller."""


class ClusterSignals(Protocol):
    """What the cluster says after a step. Every rank asks once per step; the answers of all
    ranks are then agreed on (raytrain_spot/loop/agreement.py), so a rank that hears first is enough."""

    def leaving_nodes(self, step: int) -> Set[str]:
        """Nodes of the group with a preemption notice, as this rank knows them after ``step``."""

    def extra_capacity(self, step: int) -> Optional[ExtraCapacity]:
        """Asked on rank 0 only: the larger group that would fit now, if any (the regrow rule,
        elastic/regrow.py, decides whether it pays)."""

    def usable_workers(self, step: int, leaving: Collection[str]) -> Optional[int]:
        """Asked on rank 0 only, while nodes have a notice: the workers that fit on alive nodes that
        are not ``leaving`` and have no notice of their own, if known (the notice hold, raytrain_spot/preemption/hold.py)."""

    def drain_deadline_s(self, nodes: Collection[str]) -> Optional[float]:
        """When the first of these nodes stops (unix seconds), if known."""


class StandbyStarter(Protocol):
    """Rank 0's warm standbys on the nodes a notice leaves (elastic/standby.py's ``NoticeStandbys`` in a run)."""

    def start(self, staying: Mapping[str, int]) -> None:
        """Start standbys for the group restarted without the noticed nodes (``staying``: node id -> ranks
        that stay there)."""

    def missing(self, staying: Mapping[str, int]) -> int:
        """How many of them are not warm yet."""
