"""Elastic resizing that reacts in seconds: live capacity, handoffs, and the Ray Train hooks.

Plain Ray Train 2.60 resizes slowly on Spot: its elastic policy counts workers from the
autoscaling coordinator's node view, refreshed every 20 s and blind to draining nodes, so
after a loss it first retries the old size and waits out the worker-group start timeout.
And it grows a running group by killing it, losing every step since the last checkpoint.

Here instead:

* the size of a new worker group is counted from a **live view** of the cluster: alive,
  non-draining nodes, read from the GCS at decision time;
* the training loop itself starts every resize with a **handoff**: at a preemption notice
  or when more capacity has joined, all ranks agree at one step, commit a just-in-time
  checkpoint, and raise ``WorkerGroupHandoff`` so that Ray restarts the group at once,
  before the preempted node dies; no step is redone;
* a running group is never resized by the controller (that would lose progress).

Two private Ray classes are extended (``ElasticScalingPolicy``, ``DefaultFailurePolicy``)
and installed through ``TorchTrainer._initialize_and_run_controller``;
``tests/test_ray_pins.py`` fails loudly if a Ray upgrade moves them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.controller.state import ReschedulingState, RestartingState
from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision, ScalingDecision
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
from ray.train.v2.api.config import FailureConfig, ScalingConfig
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

logger = logging.getLogger(__name__)


# Ray Train reads these in the driver and passes them on to its controller and workers.
# Values already in the environment win.
RAY_TRAIN_TIMING = {
    # The controller notices a finished handoff or a dead worker within half a second (default 2 s).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray Train relays a node drain to the workers within half a second (default 5 s).
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
    # A group that cannot be placed (a node died while it started) is retried after 10 s, not 60 s:
    # with a live capacity count, waiting for a placement means the count went stale.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
}


NOOP_PACE_S = 0.1


class WorkerGroupHandoff(Exception):
    """Raised by every rank after a just-in-time checkpoint, to have Ray restart the group now."""

    def __init__(self, reason: str, step: int):
        super().__init__(f"handoff at step {step}: {reason}")
        self.reason = reason
        self.step = step

    def __reduce__(self):
        return (WorkerGroupHandoff, (self.reason, self.step))


@dataclass(frozen=True)
class NodeView:
    node_id: str
    alive: bool
    draining: bool
    resources: Mapping[str, float]


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


def live_nodes() -> List[NodeView]:
    """Nodes as the GCS sees them right now (production source of the live view)."""
    import ray

    draining = ray._private.state.state.get_draining_nodes()
    return [NodeView(n["NodeID"], n["Alive"], n["NodeID"] in draining, n.get("Resources", {})) for n in ray.nodes()]


class LiveCapacity:
    """Counts the workers a new group can have; cached briefly, the controller asks in a loop."""

    def __init__(self, per_worker: Mapping[str, float], max_workers: int,
                 nodes: Callable[[], List[NodeView]] = live_nodes, clock: Callable[[], float] = time.monotonic,
                 max_age_s: float = 0.25):
        self._per_worker = dict(per_worker)
        self._max_workers = max_workers
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
        return workers_that_fit(self.nodes(), self._per_worker, self._max_workers)


def is_handoff(error: Optional[TrainingFailedError]) -> bool:
    return isinstance(error, WorkerGroupError) and bool(error.worker_failures) and all(
        isinstance(failure, WorkerGroupHandoff) for failure in error.worker_failures.values()
    )


class SpotScalingPolicy(ElasticScalingPolicy):
    """Ray's elastic policy with a live capacity count; running groups are resized by handoff only.

    After a failure the new group is sized only once ``failure_settle_s`` has passed: a node
    that died without notice still looks alive to the GCS until its health checks fail, and a
    group placed on it would wait out the start timeout. Resource requests to the autoscaler
    (so a cloud cluster launches nodes up to max_workers) are kept from the base class.
    """

    def __init__(self, scaling_config: ScalingConfig, capacity: Optional[LiveCapacity] = None,
                 failure_settle_s: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(scaling_config)
        self._capacity = capacity or LiveCapacity(scaling_config._resources_per_worker_not_none,
                                                  scaling_config.max_workers)
        self._failure_settle_s = failure_settle_s
        self._clock = clock
        self._sleep = sleep
        self._last_failure: Optional[float] = None
        self._waiting_since: Optional[float] = None

    def after_controller_state_update(self, previous_state, current_state) -> None:
        """Entering a restart caused by a failure (not a handoff) starts the settle period."""
        error = getattr(current_state, "training_failed_error", None)
        entered = current_state is not previous_state  # a Noop decision keeps the very same state
        if entered and isinstance(current_state, (RestartingState, ReschedulingState)) and not is_handoff(error):
            self._last_failure = self._clock()

    def make_decision_for_non_running_worker_group(self) -> ScalingDecision:
        self._maybe_send_resource_request()
        if self._last_failure is not None and self._clock() - self._last_failure < self._failure_settle_s:
            return self._wait()
        workers = self._capacity.workers()
        minimum = self.scaling_config.min_workers
        if workers < minimum:
            if self._waiting_since is None:
                self._waiting_since = time.monotonic()
                logger.warning("Waiting for capacity: %d workers fit on alive, non-draining nodes, "
                               "min_workers=%d", workers, minimum)
            return self._wait()
        waited = time.monotonic() - self._waiting_since if self._waiting_since is not None else 0.0
        self._waiting_since = None
        logger.info("Starting a worker group of %d: that many fit on alive, non-draining nodes "
                    "(min %d, max %d, waited %.1f s)", workers, minimum, self.scaling_config.max_workers, waited)
        return ResizeDecision(num_workers=workers,
                              resources_per_worker=self.scaling_config._resources_per_worker_not_none)

    def _wait(self) -> NoopDecision:
        # The controller asks again at once after a Noop; pace it rather than spin the head's CPU.
        self._sleep(NOOP_PACE_S)
        return NoopDecision()

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status) -> ScalingDecision:
        self._maybe_send_resource_request()
        return NoopDecision()


class SpotFailurePolicy(DefaultFailurePolicy):
    """A handoff is a planned restart: retry it without spending the failure budget."""

    def __init__(self, failure_config: FailureConfig):
        super().__init__(failure_config)
        self.handoffs = 0

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if is_handoff(training_failed_error):
            self.handoffs += 1
            reasons = sorted({f.reason for f in training_failed_error.worker_failures.values()})
            logger.info("Restarting the worker group for a handoff (%s); handoffs so far: %d",
                        ", ".join(reasons), self.handoffs)
            return FailureDecision.RETRY
        return super().make_decision(training_failed_error)


class SpotTorchTrainer(TorchTrainer):
    """TorchTrainer with the Spot scaling and failure policies and fast controller timings.

    ``failure_settle_s``: after a failure, how long to wait for the GCS to declare dead nodes
    dead before sizing the new group (the cluster's health-check period times its threshold).
    """

    def __init__(self, *args, failure_settle_s: float = 4.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._failure_settle_s = failure_settle_s

    def fit(self):
        for key, value in RAY_TRAIN_TIMING.items():
            os.environ.setdefault(key, value)
        return super().fit()

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["scaling_policy"] = SpotScalingPolicy(self.scaling_config,
                                                                     failure_settle_s=self._failure_settle_s)
        controller_init_kwargs["failure_policy"] = SpotFailurePolicy(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


class CapacityWatcher:
    """Runs on rank 0: notices when more workers would fit than the group has (regrow), and
    which of the group's nodes are draining (a preemption notice).

    Growth is reported only after the extra capacity has stayed for ``settle_s``, so a node
    that joins and vanishes at once does not cost a restart. ``on_join`` hears of every node
    that joins while the group runs (warm standbys start there before the regrow). Draining
    nodes are read from the GCS, as Ray Train's controller reads them before relaying them to
    the workers: the loop acts on whichever arrives first, so a busy controller cannot make a
    notice come too late.
    """

    def __init__(self, capacity: LiveCapacity, group_nodes: List[str], interval_s: float, settle_s: float,
                 clock: Callable[[], float] = time.monotonic, on_join: Optional[Callable[[NodeView], None]] = None):
        self._capacity = capacity
        self._group_nodes = set(group_nodes)
        self._world_size = len(group_nodes)
        self._on_join = on_join
        self._seen: Optional[set] = None  # usable nodes seen so far; None before the first check
        self._interval_s = interval_s
        self._settle_s = settle_s
        self._clock = clock
        self._more_since: Optional[float] = None
        self.grow_to: int = 0
        self.draining: FrozenSet[str] = frozenset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capacity-watcher", daemon=True)

    def start(self) -> "CapacityWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        nodes = self._capacity.nodes()
        self.draining = frozenset(node.node_id for node in nodes if node.draining and node.node_id in self._group_nodes)
        usable = {node.node_id: node for node in nodes if node.alive and not node.draining}
        if self._on_join and self._seen is not None:
            for node_id in usable.keys() - self._seen:
                self._on_join(usable[node_id])
        self._seen = (self._seen or set()) | usable.keys()
        workers = self._capacity.workers()
        now = self._clock()
        if workers <= self._world_size:
            self._more_since = None
            return
        if self._more_since is None:
            self._more_since = now
        if now - self._more_since >= self._settle_s and not self.grow_to:
            self.grow_to = workers
            logger.info("Capacity for %d workers (group has %d) for %.1f s: regrowing",
                        workers, self._world_size, now - self._more_since)

    def _run(self) -> None:
        while True:  # the first check at once: a notice may have come while the group started
            try:
                self.check()
            except Exception:  # a GCS hiccup must not kill training; try again next interval
                logger.warning("Capacity check failed", exc_info=True)
            if self._stop.wait(self._interval_s):
                return


def drain_deadline_s(node_ids) -> Optional[float]:
    """The earliest drain deadline (unix seconds) of these nodes, from the GCS; None if none has one."""
    import ray

    try:
        draining = ray._private.state.state.get_draining_nodes()
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
    from ray.train.v2._internal.execution.context import get_train_context

    info = get_train_context().preemption_context.preemption_info
    return None if info is None else info.preempted_node_to_ranks
