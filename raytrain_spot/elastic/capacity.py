"""The live view of the cluster: how many workers fit now, which nodes are draining, when more joined,
how long a new group waited for them.

Read from the GCS at decision time (Ray's own elastic policy counts from a node view refreshed
every 20 s and blind to draining nodes). The scaling policy sizes new groups with
``LiveCapacity``; rank 0 watches the running group with ``CapacityWatcher``; ``RaySignals`` is
what the training loop hears from the cluster (loop/runtime.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection, Dict, FrozenSet, List, Mapping, Optional, Set, Tuple

from raytrain_spot._ray import draining_nodes, preempted_node_to_ranks
from raytrain_spot.config.schema import Config
from raytrain_spot.elastic.standby import start_standbys, warm_nodes
from raytrain_spot.elastic.signals import ExtraCapacity, GroupStart

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeView:
    """One node as the GCS lists it: the one read of the node table (capacity here, node events in preemption/)."""

    node_id: str
    alive: bool
    draining: bool
    resources: Mapping[str, float]
    drain_deadline_ms: Optional[int] = None
    """While draining: the deadline in unix milliseconds (0: none given)."""
    labels: Mapping[str, str] = field(default_factory=dict)


def workers_that_fit(nodes: List[NodeView], per_worker: Mapping[str, float], max_workers: int) -> int:
    """Workers that fit on alive, non-draining nodes, at most ``max_workers``."""
    needed = {k: v for k, v in per_worker.items() if v > 0}
    if not needed:
        return max_workers
    total = 0
    for node in nodes:
        if node.alive and not node.draining:
            total += int(min(node.resources.get(k, 0.0) // v for k, v in needed.items()))
    return min(total, max_workers)


GROUP_START_NAMESPACE = "raytrain_spot_group_start"
"""GCS key-value namespace: one key per run, its latest ``GroupStart``."""


class GroupStarts:
    """The latest ``GroupStart`` of run ``run_name``, in the GCS key-value store: the controller's
    scaling policy writes it as it starts a group, the group's rank 0 reads it."""

    def __init__(self, run_name: str):
        self._key = run_name

    def publish(self, start: GroupStart) -> None:
        from raytrain_spot._ray import internal_kv_put

        internal_kv_put(self._key, json.dumps(asdict(start)), overwrite=True, namespace=GROUP_START_NAMESPACE)

    def latest(self) -> Optional[GroupStart]:
        from raytrain_spot._ray import internal_kv_get

        value = internal_kv_get(self._key, namespace=GROUP_START_NAMESPACE)
        return GroupStart(**json.loads(value)) if value is not None else None


def live_nodes() -> List[NodeView]:
    """Nodes as the GCS sees them right now (production source of the live view)."""
    import ray

    draining = draining_nodes()
    return [NodeView(n["NodeID"], n["Alive"], n["NodeID"] in draining, n.get("Resources", {}),
                     drain_deadline_ms=draining.get(n["NodeID"]), labels=n.get("Labels", {})) for n in ray.nodes()]


class LiveCapacity:
    """Counts the workers a new group can have; cached briefly, the controller asks in a loop."""

    def __init__(self, per_worker: Mapping[str, float], max_workers: int,
                 nodes: Callable[[], List[NodeView]] = live_nodes, clock: Callable[[], float] = time.monotonic,
                 max_age_s: float = 0.25):
        self.per_worker = dict(per_worker)
        self.max_workers = max_workers
        self._nodes = nodes
        self._clock = clock
        self._max_age_s = max_age_s
        self._cached: Optional[tuple[float, List[NodeView]]] = None

    def nodes(self) -> List[NodeView]:
        now = self._clock()
        if self._cached is None or now - self._cached[0] > self._max_age_s:
            self._cached = (now, self._nodes())
        return self._cached[1]

    def workers(self) -> int:
        return workers_that_fit(self.nodes(), self.per_worker, self.max_workers)


class CapacityWatcher:
    """Runs on rank 0: notices when more workers would fit than the group has (``extra``: how many
    and since when; the regrow rule decides whether to use them), and which of the group's nodes
    are draining (a preemption notice). ``on_join`` hears of every usable node outside the group,
    at the first check and as it joins later (warm standbys start there before the regrow). Draining
    nodes are read from the GCS, as Ray Train's controller reads them before relaying them to
    the workers: the loop acts on whichever arrives first, so a busy controller cannot make a
    notice come too late.

    With ``warm`` (the nodes with the stack preloaded, elastic/standby.py), a node outside the
    group counts toward ``extra`` only once it is warm, or after ``warm_wait_limit_s`` (its
    standby's start failed, or it preloads nothing): a group
    restarted onto a node still importing waits for the import, with no training meanwhile,
    while the group that waits for it trains on.
    """

    def __init__(self, capacity: LiveCapacity, group_nodes: List[str], interval_s: float,
                 clock: Callable[[], float] = time.monotonic, on_join: Optional[Callable[[NodeView], None]] = None,
                 warm: Optional[Callable[[], Set[str]]] = None, warm_wait_limit_s: float = 60.0):
        self._capacity = capacity
        self._group_nodes = set(group_nodes)
        self._world_size = len(group_nodes)
        self._on_join = on_join
        self._warm = warm
        self._warm_wait_limit_s = warm_wait_limit_s
        self._seen: Optional[Dict[str, float]] = None  # usable node -> when first seen; None before the first check
        self._interval_s = interval_s
        self._clock = clock
        self._more: Optional[Tuple[int, float]] = None  # (workers that fit, since when)
        self._nodes: Optional[List[NodeView]] = None  # as of the last check
        self.draining: FrozenSet[str] = frozenset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capacity-watcher", daemon=True)

    def start(self) -> "CapacityWatcher":
        """The first look at the cluster here, before the group's first step: a notice that comes in
        the first seconds finds the capacity outside the noticed nodes known (unknown, the notice
        hold hands off at once). Then a look every ``interval_s`` in a thread."""
        self._checked()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        nodes = self._nodes = self._capacity.nodes()
        self.draining = frozenset(node.node_id for node in nodes if node.draining and node.node_id in self._group_nodes)
        usable = {node.node_id: node for node in nodes if node.alive and not node.draining}
        if self._on_join:  # at the first check, the nodes outside the group are news too
            for node_id in usable.keys() - (self._group_nodes if self._seen is None else self._seen.keys()):
                self._on_join(usable[node_id])
        now = self._clock()
        self._seen = {node_id: now for node_id in usable} | (self._seen or {})
        workers = workers_that_fit([usable[node_id] for node_id in self._regrow_nodes(usable, now)],
                                   self._capacity.per_worker, self._capacity.max_workers)
        if workers <= self._world_size:
            self._more = None
        elif self._more is None or self._more[0] != workers:
            self._more = (workers, self._clock())
            logger.info("Capacity for %d workers (the group has %d)", workers, self._world_size)

    def _regrow_nodes(self, usable: Mapping[str, NodeView], now: float) -> List[str]:
        if self._warm is None or usable.keys() <= self._group_nodes:
            return list(usable)
        try:
            warm = self._warm()
        except Exception:  # noqa: BLE001 - the notice half of this check must not fail with it
            logger.warning("Cannot read which nodes are warm; counting every node", exc_info=True)
            return list(usable)
        return [node_id for node_id in usable if node_id in self._group_nodes or node_id in warm
                or now - self._seen[node_id] >= self._warm_wait_limit_s]

    @property
    def extra(self) -> Optional[ExtraCapacity]:
        more = self._more
        return ExtraCapacity(more[0], self._clock() - more[1]) if more else None

    def workers_without(self, leaving: Collection[str]) -> Optional[int]:
        """Workers that fit, as of the last check, on nodes other than ``leaving``; None before it."""
        nodes = self._nodes
        if nodes is None:
            return None
        return workers_that_fit([n for n in nodes if n.node_id not in leaving], self._capacity.per_worker,
                                self._capacity.max_workers)

    def room_outside_group(self, most: int) -> Dict[str, int]:
        """Workers that fit on each usable node outside the group as of the last check, at most ``most``
        in all: where a group restarted after a notice places the workers its survivors cannot hold."""
        room: Dict[str, int] = {}
        for node in self._nodes or ():
            if most <= 0:
                break
            if node.node_id not in self._group_nodes and (fit := workers_that_fit([node], self._capacity.per_worker,
                                                                                    most)):
                room[node.node_id] = fit
                most -= fit
        return room

    def drain_deadline_s(self, nodes: Collection[str]) -> Optional[float]:
        """The earliest drain deadline of these nodes as of the last check (unix seconds), if every one
        of them was draining then; None otherwise."""
        deadlines = {n.node_id: n.drain_deadline_ms for n in self._nodes or () if n.draining}
        if not nodes or any(not deadlines.get(node) for node in nodes):
            return None
        return min(deadlines[node] for node in nodes) / 1000.0

    def _checked(self) -> None:
        try:
            self.check()
        except Exception:  # a GCS hiccup must not kill training; try again next interval
            logger.warning("Capacity check failed", exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._checked()


def drain_deadline_s(node_ids) -> Optional[float]:
    """The earliest drain deadline (unix seconds) of these nodes, from the GCS; None if none has one."""
    try:
        draining = draining_nodes()
    except Exception:  # noqa: BLE001 - without the deadline the handoff goes on; only the lateness check is lost
        logger.warning("Cannot read drain deadlines", exc_info=True)
        return None
    deadlines = [ms for node, ms in draining.items() if node in node_ids and ms]
    return min(deadlines) / 1000.0 if deadlines else None


def local_preemption_notice() -> Optional[Dict[str, List[int]]]:
    """This worker's copy of Ray Train's preemption signal, read without a barrier.

    ``ray.train.get_preemption_info()`` is a barrier costing tens of milliseconds, too much
    for every step; the loop agrees on what each rank knows with its own per-step all-reduce.
    """
    return preempted_node_to_ranks()


class RaySignals:
    """What the loop hears from the cluster in a run: notices from Ray Train's relay of the drain
    and, on rank 0, from its own reading of the GCS (whichever is first); regrow from rank 0's watch."""

    def __init__(self, capacity: Optional[CapacityWatcher]):
        self._capacity = capacity

    def leaving_nodes(self, step: int) -> Set[str]:
        draining = set(local_preemption_notice() or ())
        if self._capacity is not None:
            draining |= self._capacity.draining
        return draining

    def extra_capacity(self, step: int) -> Optional[ExtraCapacity]:
        return self._capacity.extra if self._capacity is not None else None

    def usable_workers(self, step: int, leaving: Collection[str]) -> Optional[int]:
        return self._capacity.workers_without(leaving) if self._capacity is not None else None

    def drain_deadline_s(self, nodes: Collection[str]) -> Optional[float]:
        """From rank 0's last look at the GCS where it has one (no call on the training thread at
        every step of a notice hold), else from the GCS."""
        known = self._capacity.drain_deadline_s(nodes) if self._capacity is not None else None
        return known if known is not None else drain_deadline_s(nodes)


def watch_capacity(cfg: Config, node_ids: List[str], standbys: bool) -> CapacityWatcher:
    """Rank 0's watch on the cluster: regrow capacity, notices, and (``standbys``) standbys for nodes that join."""
    per_worker, most = cfg.trainer.resources_per_worker, cfg.trainer.max_workers

    def warm(node: NodeView) -> None:
        start_standbys(node.node_id, workers_that_fit([node], per_worker, most))

    return CapacityWatcher(LiveCapacity(per_worker, most), node_ids, cfg.tuning.resize_check_interval_s,
                           on_join=warm if standbys else None, warm=warm_nodes if standbys else None,
                           warm_wait_limit_s=cfg.elastic.warm_wait_limit_s).start()
