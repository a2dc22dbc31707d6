"""Replacement nodes at the preemption notice: the autoscaler starts them while a preempted VM
still runs out an advance notice, instead of after it is gone.

What Ray 2.60's autoscalers do with a draining node (read from the installed wheel):

* **v1** (``StandardAutoscaler``, what ``ray up`` runs on GCE) counts cloud instances, not Ray
  nodes. Every VM the provider lists as non-terminated counts against its node type's and the
  cluster's ``max_workers``, and with its full resources ("as if idle") towards a
  ``request_resources()`` request (``resource_demand_scheduler._add_min_workers_nodes``). Ray's GCP
  provider lists PROVISIONING, STAGING and RUNNING VMs. A VM in GCE's 30 s shutdown is STOPPING, so
  it stops counting at the notice and ``min_workers`` (and Ray Train's standing request for
  ``max_workers`` bundles) launch its replacement at the next update. With an advance notice
  (``scheduling.preemptionNoticeDuration``, up to 120 s) the VM stays RUNNING until the shutdown
  begins, and a request for ``max_workers`` bundles is satisfied by the very node that is going.
* **v2** marks a draining Ray node RAY_STOPPING and leaves it out of scheduling altogether
  (``scheduler.SchedulingNode.new``), so Ray Train's standing request already asks for its
  replacement at the notice.

So on v1, while some node drains with more than GCE's 30 s shutdown left before its drain
deadline, ``ReplacementRequester`` asks for ``max_workers`` plus the workers those nodes hold;
once that window has closed for all of them it asks for ``max_workers`` again (what Ray Train's
own request says). It re-sends while the window is open, because Ray Train's autoscaling
coordinator re-sends its merged request every 20 s and ``request_resources`` replaces the previous
request. The autoscaler can launch the replacement only where the node type's and the cluster's
``max_workers`` leave room above the nodes that exist, the draining one included
(``python -m raytrain_spot.cluster.check`` says how much room a YAML leaves).

The driver's ``ClusterMonitor`` (preemption/node_events.py) feeds it every poll; the request
function, the autoscaler-version probe and the clock are injected.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Mapping, Optional, Set

from raytrain_spot.observe.records import EventRecord, ReplacementRequested
from raytrain_spot.preemption.drain_decision import GCE_SHUTDOWN_S

if TYPE_CHECKING:
    from raytrain_spot.preemption.node_events import NodeState

logger = logging.getLogger(__name__)

Bundles = List[Dict[str, float]]

REASSERT_S = 2.0
"""While a replacement is wanted, the request is sent again this often: Ray Train's coordinator
replaces it with its own every 20 s, and the v1 autoscaler reads the request every 5 s."""


def request_worker_bundles(bundles: Bundles) -> None:
    """Ray's public request to the autoscaler (replaces any earlier request)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def detect_autoscaler_v2() -> bool:
    """Whether the cluster runs Ray's autoscaler v2 (from the GCS; v1 when it cannot be read)."""
    from raytrain_spot._ray import is_autoscaler_v2

    try:
        return bool(is_autoscaler_v2())
    except Exception:  # noqa: BLE001 - no GCS client yet, or an old cluster: ray up's default is v1
        logger.warning("Cannot tell the autoscaler version; assuming v1 (ray up's default)", exc_info=True)
        return False


def workers_on(resources: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    """Workers of ``per_worker`` that fit on one node of ``resources``."""
    needed = {k: v for k, v in per_worker.items() if v > 0}
    if not needed:
        return 0
    return int(min(resources.get(k, 0.0) // v for k, v in needed.items()))


def nodes_to_replace(nodes: Iterable["NodeState"], per_worker: Mapping[str, float], now_s: float,
                     shutdown_s: float = GCE_SHUTDOWN_S) -> Dict[str, int]:
    """Workers held by each node whose VM Ray's v1 autoscaler still counts although it is going:
    alive, draining, with its drain deadline more than ``shutdown_s`` away (so GCE has not begun
    the shutdown that makes the VM STOPPING: the deadline is the hard stop minus a margin >= 0)."""
    replace = {}
    for node in nodes:
        deadline_ms = node.draining_deadline_ms
        if not node.alive or not deadline_ms or deadline_ms / 1000 - shutdown_s <= now_s:
            continue
        workers = workers_on(node.resources, per_worker)
        if workers:
            replace[node.node_id] = workers
    return replace


class ReplacementRequester:
    """Asks the autoscaler for the replacements of noticed nodes (see the module docstring).

    ``update(nodes)`` is called with the cluster's nodes on every poll; it decides, logs one line per
    decision with its numbers, calls ``request`` and emits ``replacement_requested`` once per node.
    """

    def __init__(self, per_worker: Mapping[str, float], max_workers: int, emit: Callable[[EventRecord], None],
                 request: Callable[[Bundles], None] = request_worker_bundles,
                 autoscaler_v2: Callable[[], bool] = detect_autoscaler_v2, clock: Callable[[], float] = time.time,
                 shutdown_s: float = GCE_SHUTDOWN_S, reassert_s: float = REASSERT_S):
        self._bundle = {k: v for k, v in per_worker.items() if v}
        self._max_workers = max_workers
        self._emit = emit
        self._request = request
        self._autoscaler_v2 = autoscaler_v2
        self._clock = clock
        self._shutdown_s = shutdown_s
        self._reassert_s = reassert_s
        self._v2: Optional[bool] = None  # probed at the first drain
        self._sent: Optional[int] = None  # bundles last requested; None: never (Ray Train's request stands)
        self._sent_at = float("-inf")
        self._announced: Set[str] = set()  # nodes whose replacement was requested
        self._explained: Set[str] = set()  # draining nodes that needed none, said once

    def update(self, nodes: Iterable["NodeState"]) -> None:
        nodes = list(nodes)
        draining = {n.node_id: n for n in nodes if n.alive and n.draining_deadline_ms is not None}
        if not draining and self._sent is None:
            return
        if self._v2 is None:
            self._v2 = self._autoscaler_v2()
        now = self._clock()
        if self._v2:
            self._explain(draining, "Ray's autoscaler v2 counts a draining node as gone, so Ray Train's "
                                    f"standing request for max_workers={self._max_workers} already asks for its "
                                    "replacement")
            return
        replace = nodes_to_replace(draining.values(), self._bundle, now, self._shutdown_s)
        for node_id, node in draining.items():
            if node_id not in replace and node_id not in self._announced:
                self._explain({node_id: node}, self._why_not(node, now))
        target = self._max_workers + sum(replace.values())
        new = [node_id for node_id in replace if node_id not in self._announced]
        due = bool(replace) and now - self._sent_at >= self._reassert_s
        if (not new and self._sent == target and not due) or (self._sent is None and not replace):
            return
        try:
            self._request([dict(self._bundle) for _ in range(target)])
        except Exception:  # noqa: BLE001 - the autoscaler may be briefly unreachable; the next poll retries
            logger.warning("Replacement request for %d worker bundles failed; retrying at the next poll", target,
                           exc_info=True)
            return
        changed, self._sent, self._sent_at = self._sent != target, target, now
        for node_id in new:
            node = draining[node_id]
            until = node.draining_deadline_ms / 1000 - self._shutdown_s
            logger.info("Replacement for node %s requested at its notice: %d worker bundles of %s (max_workers=%d "
                        "+ %d on the %d node(s) running out a notice, which Ray's v1 autoscaler still counts); its "
                        "drain deadline is in %.1f s, GCE's shutdown starts in about %.1f s", node_id, target,
                        self._bundle, self._max_workers, target - self._max_workers, len(replace),
                        node.draining_deadline_ms / 1000 - now, until - now)
            self._emit(ReplacementRequested(node=node_id, workers=replace[node_id], bundles=target,
                                            bundle=dict(self._bundle), until=round(until, 3)))
            self._announced.add(node_id)
        if changed and not new:
            if replace:
                logger.info("Replacement request now %d worker bundles (max_workers=%d + %d on the %d node(s) "
                            "still running out a notice)", target, self._max_workers, target - self._max_workers,
                            len(replace))
            else:
                logger.info("Replacement request back to max_workers=%d worker bundles: no draining node is left "
                            "before GCE's shutdown, and the autoscaler counts a stopping VM as gone", target)
        self._announced &= set(draining)

    def _why_not(self, node: "NodeState", now: float) -> str:
        if not node.draining_deadline_ms:
            return "its drain has no deadline, so it is not a notice whose VM outlives it"
        left = node.draining_deadline_ms / 1000 - now
        if left <= self._shutdown_s:
            return (f"its drain deadline is {left:.1f} s away, within GCE's {self._shutdown_s:.0f} s shutdown, so "
                    "its VM is stopping and Ray's autoscaler already counts it as gone")
        return f"it holds no worker of {self._bundle}"

    def _explain(self, nodes: Mapping[str, "NodeState"], why: str) -> None:
        for node_id in nodes.keys() - self._explained:
            logger.info("No replacement request for node %s: %s", node_id, why)
            self._explained.add(node_id)
