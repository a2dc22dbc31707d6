"""Watches the Ray cluster from the driver and logs node changes to the event log.

The same on the embedded cluster and on GCP: nodes joining (``add``, with node type and
pricing model from their labels), drains (``drain``, a preemption notice as Ray sees it),
deaths (``kill``) and clean departures (``remove``). The ledger turns these into node-hours.
With a ``ReplacementRequester`` (preemption/replacements.py) it also hands every view of the
cluster to it, which asks the autoscaler for replacements at a preemption notice.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional

from raytrain_spot.observe.events import EventLog
from raytrain_spot.observe.records import Add, Drain, EventRecord, Kill, Remove
from raytrain_spot.elastic.capacity import live_nodes

NODE_TYPE_LABEL = "raytrain-spot/node-type"
"""The Ray node label naming a node's type (the cluster YAML's, or the embedded cluster's)."""
PRICING_LABEL = "raytrain-spot/pricing"
"""The Ray node label saying how a node is priced (``spot`` or ``on_demand``): the ledger prices nodes by it."""

if TYPE_CHECKING:
    from raytrain_spot.preemption.replacements import ReplacementRequester

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeState:
    node_id: str
    alive: bool
    draining_deadline_ms: Optional[int]  # None: not draining; 0: draining without deadline
    node_type: str
    pricing: str
    gpus: float
    resources: Mapping[str, float] = field(default_factory=dict, compare=False)
    """The node's total resources (what a worker needs to fit)."""


def node_changes(before: Mapping[str, NodeState], after: Mapping[str, NodeState]) -> List[EventRecord]:
    """Event records for what changed between two views of the cluster."""
    records = []
    for node_id, node in after.items():
        previous = before.get(node_id)
        if node.alive and (previous is None or not previous.alive):
            records.append(Add(node=node_id, node_type=node.node_type, pricing=node.pricing, gpus=node.gpus))
        if node.alive and node.draining_deadline_ms is not None and (
                previous is None or previous.draining_deadline_ms is None):
            deadline = node.draining_deadline_ms / 1000 if node.draining_deadline_ms else None
            records.append(Drain(node=node_id, deadline=deadline))
        if not node.alive and previous is not None and previous.alive:
            records.append(Kill(node=node_id, with_notice=previous.draining_deadline_ms is not None))
    for node_id, previous in before.items():
        if node_id not in after and previous.alive:
            records.append(Remove(node=node_id))
    return records


def read_cluster() -> Dict[str, NodeState]:
    return {
        node.node_id: NodeState(
            node_id=node.node_id, alive=node.alive, draining_deadline_ms=node.drain_deadline_ms,
            node_type=node.labels.get(NODE_TYPE_LABEL, "unknown"), pricing=node.labels.get(PRICING_LABEL, "on_demand"),
            gpus=node.resources.get("GPU", 0.0), resources=dict(node.resources),
        )
        for node in live_nodes()
    }


class ClusterMonitor:
    """Polls the cluster in a thread; emits one event per change, and hands each view to
    ``replacements`` (if any)."""

    def __init__(self, events: EventLog, interval_s: float = 0.5,
                 read: Callable[[], Dict[str, NodeState]] = read_cluster,
                 replacements: Optional["ReplacementRequester"] = None):
        self._events = events
        self._interval_s = interval_s
        self._read = read
        self._replacements = replacements
        self._known: Dict[str, NodeState] = {}
        self._dead: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-monitor", daemon=True)

    def __enter__(self) -> "ClusterMonitor":
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def reported_dead(self, node_id: str, with_notice: bool) -> None:
        """A node died now, says someone who knows the moment (the Spot simulator): Ray itself
        notices a killed node only after missed heartbeats, seconds later."""
        with self._lock:
            self._dead.add(node_id)  # the GCS may list it alive for a few more seconds
            node = self._known.get(node_id)
            if node is not None and node.alive:
                self._known[node_id] = dataclasses.replace(node, alive=False)
                self._events.emit(Kill(node=node_id, with_notice=with_notice))

    def poll(self) -> None:
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        current = {node_id: dataclasses.replace(node, alive=False) if node_id in self._dead else node
                   for node_id, node in self._read().items()}
        for record in node_changes(self._known, current):
            self._events.emit(record)
        self._known = current
        if self._replacements is not None:
            self._replacements.update(current.values())

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.poll()
            except Exception:  # the GCS can be briefly unreachable; the next poll catches up
                logger.warning("Cluster poll failed", exc_info=True)
