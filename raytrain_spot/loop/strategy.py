"""How a run meets Spot: the product's strategy, or a benchmark baseline's.

A strategy is what the driver and every worker take from outside the loop: whether Ray Train runs
with this project's hooks (elastic/policy.py's scaling and failure policies, live capacity, warm
standbys, replacements asked at a notice) or as plain Ray Train 2.60; what the loop hears of the
cluster (``ClusterSignals``); and the ``GroupPolicy`` that turns each step's agreement into a
decision (loop/decision.py). Runs use ``SPOT``; bench/baselines.py defines Ray's own paths as
strategies of the same shape, so the loop has no branch for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from raytrain_spot.config.schema import Config
from raytrain_spot.elastic.capacity import CapacityWatcher, RaySignals
from raytrain_spot.elastic.signals import ClusterSignals, StandbyStarter
from raytrain_spot.loop.decision import GroupPolicy, SpotPolicy


@dataclass(frozen=True)
class Strategy:
    name: str
    """Recorded in the run's ``start`` event (the planner reads it)."""
    spot_aware: bool
    """This project's Ray Train hooks, capacity watch, standbys and replacements; False: plain Ray Train."""
    signals: Callable[[Optional[CapacityWatcher]], ClusterSignals]
    """What the loop hears of the cluster, from rank 0's capacity watch (None on other ranks, and
    where the strategy is not spot-aware)."""
    group_policy: Callable[[Config, ClusterSignals, Sequence[str], Callable[..., None], Optional[StandbyStarter]],
                           GroupPolicy]
    """The group's policy, from the config, the signals, each rank's node, the event emitter and
    rank 0's notice warm-up of standbys."""


def spot_policy(cfg: Config, signals: ClusterSignals, node_ids: Sequence[str], emit: Callable[..., None],
                warmup: Optional[StandbyStarter]) -> GroupPolicy:
    return SpotPolicy(cfg, signals, node_ids, emit, warmup)


SPOT = Strategy("raytrain-spot", spot_aware=True, signals=RaySignals, group_policy=spot_policy)
