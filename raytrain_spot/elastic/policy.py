"""The Ray Train hooks of elastic training: the scaling and failure policies, the trainer that installs them.

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
both come from ``raytrain_spot/_ray.py``, pinned by ``tests/test_ray_pins.py``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from concurrent.futures import Future
from typing import Callable, Dict, List, Optional, Set, Tuple

from ray.train.torch import TorchTrainer
from ray.train.v2.api.config import FailureConfig, ScalingConfig
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

from raytrain_spot._ray import (
    DefaultFailurePolicy,
    ElasticScalingPolicy,
    FailureDecision,
    NoopDecision,
    ReschedulingState,
    ResizeDecision,
    RestartingState,
    RunningState,
    ScalingDecision,
    WorkerGroupStartupTimeoutError,
    WorkerHealthCheckFailedError,
    WorkerHealthCheckTimeoutError,
)
from raytrain_spot.elastic.capacity import GroupStarts, LiveCapacity
from raytrain_spot.elastic.signals import GroupStart
from raytrain_spot.elastic.stranded import StrandedStep
from raytrain_spot.elastic.survivors import SurvivorMarks, SurvivorWait
from raytrain_spot.config.errors import TaskContractError

logger = logging.getLogger(__name__)


class WorkerGroupHandoff(Exception):
    """Raised by every rank after a just-in-time checkpoint, to have Ray restart the group now."""

    def __init__(self, reason: str, step: int, node_copies: Tuple[str, ...] = ()):
        super().__init__(f"handoff at step {step}: {reason}")
        self.reason = reason
        self.step = step
        self.node_copies = tuple(node_copies)
        """The nodes whose copies alone hold ``step`` (none: the shared tiers hold it too)."""

    def __reduce__(self):
        return (WorkerGroupHandoff, (self.reason, self.step, self.node_copies))


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
DECLARED_GRACE_S = 1.0
"""After the first node of a failed group is declared dead, how long to wait for others lost with
it: nodes that lost power together are declared dead within one health-check period (1 s)."""


def is_handoff(error: Optional[TrainingFailedError]) -> bool:
    return isinstance(error, WorkerGroupError) and bool(error.worker_failures) and all(
        isinstance(failure, WorkerGroupHandoff) for failure in error.worker_failures.values()
    )


def placement_timed_out(error: Optional[TrainingFailedError]) -> bool:
    """The controller gave up waiting for a new group's resources: the cluster's doing, never the
    training code's, however often it repeats. (A worker that dies while its group starts still
    counts: a broken environment does that every time.)"""
    return isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError)


def lowest_survivor(error: Optional[TrainingFailedError]) -> int:
    """The lowest rank whose worker the failure did not take (whose health check did not fail): the
    survivors' writer of the shared tiers (loop/survivor_commit.py)."""
    failures = error.worker_failures if isinstance(error, WorkerGroupError) else {}
    lost = {rank for rank, failure in failures.items()
            if isinstance(failure, (WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError))}
    return next(rank for rank in itertools.count() if rank not in lost)


def contract_breach(error: Optional[TrainingFailedError]) -> Optional[TaskContractError]:
    """The task's contract error among the workers' failures, if one is there (retrying cannot help)."""
    failures = error.worker_failures.values() if isinstance(error, WorkerGroupError) else ()
    return next((failure for failure in failures if isinstance(failure, TaskContractError)), None)


class SpotScalingPolicy(ElasticScalingPolicy):
    """Ray's elastic policy with a live capacity count; running groups are resized by handoff only.

    After a failure the new group is sized only once ``failure_settle_s`` has passed: a node
    that died without notice still looks alive to the GCS until its health checks fail, and a
    group placed on it would wait out the start timeout. The wait ends sooner once the GCS has
    declared dead a node that was alive when the failed group started, and ``DECLARED_GRACE_S``
    (a health-check period) has passed since it was seen so, for nodes lost with it: a powered-off
    VM's failure reaches the controller only through its node's death (its workers' sockets close
    nothing), so by then the loss is known and the wait would be lost time. Resource requests to the autoscaler
    (so a cloud cluster launches nodes up to max_workers) are kept from the base class. Before a
    group starts, ``remove_orphans`` removes what a group that failed to start left holding
    resources (``remove_orphaned_placement_groups``), and ``announce`` tells the group how long it
    waited for capacity (``GroupStarts.publish``), so that its restart is measured without the wait.
    ``copy_on`` copies a handoff's step held by node copies alone on to the shared tiers where the step is
    at risk (elastic/stranded.py's ``StrandedStep``; None: never).
    """

    def __init__(self, scaling_config: ScalingConfig, capacity: Optional[LiveCapacity] = None,
                 failure_settle_s: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 remove_orphans: Optional[Callable[[], List[str]]] = None,
                 announce: Callable[[GroupStart], None] = lambda start: None,
                 wall_clock: Callable[[], float] = time.time,
                 copy_on: Optional[Callable[[str, int], "Future[bool]"]] = None):
        super().__init__(scaling_config)
        self._remove_orphans = remove_orphans or (lambda: remove_orphaned_placement_groups(
            scaling_config._resources_per_worker_not_none, scaling_config.placement_strategy))
        self._capacity = capacity or LiveCapacity(scaling_config._resources_per_worker_not_none,
                                                  scaling_config.max_workers)
        self._failure_settle_s = failure_settle_s
        self._clock = clock
        self._sleep = sleep
        self._last_failure: Optional[float] = None
        self._declared_at: Optional[float] = None  # when a node of the failed group was first seen declared dead
        self._nodes_at_start: Set[str] = set()  # alive when the last group started
        self._waiting_since: Optional[float] = None
        self._announce = announce
        self._started_at = wall_clock()
        self._stranded = StrandedStep(copy_on, self._capacity.nodes) if copy_on is not None else None

    def after_controller_state_update(self, previous_state, current_state) -> None:
        """Entering a restart caused by a failure (not a handoff) starts the settle period; one caused by a
        handoff, or a group running, tells ``StrandedStep`` where the handoff's step is."""
        error = getattr(current_state, "training_failed_error", None)
        entered = current_state is not previous_state  # a Noop decision keeps the very same state
        if entered and isinstance(current_state, RunningState) and self._stranded is not None:
            self._stranded.group_running()
        if not (entered and isinstance(current_state, (RestartingState, ReschedulingState))):
            return
        if not is_handoff(error):
            self._last_failure = self._clock()
            self._declared_at = None
        elif self._stranded is not None:
            last = max(error.worker_failures.values(), key=lambda handoff: handoff.step)
            self._stranded.handed_off(last.step, last.node_copies)

    def _settling(self) -> bool:
        """Whether a failure's settle period still runs (see the class docstring)."""
        now = self._clock()
        if self._last_failure is None or now - self._last_failure >= self._failure_settle_s:
            return False
        if self._declared_at is None and any(not node.alive and node.node_id in self._nodes_at_start
                                             for node in self._capacity.nodes()):
            self._declared_at = now
        return self._declared_at is None or now - self._declared_at < DECLARED_GRACE_S

    def make_decision_for_non_running_worker_group(self) -> ScalingDecision:
        self._maybe_send_resource_request()
        if self._settling():
            return self._wait()
        workers = self._capacity.workers()
        minimum = self.scaling_config.min_workers
        if workers < minimum:
            if self._waiting_since is None:
                self._waiting_since = self._clock()
                logger.warning("Waiting for capacity: %d workers fit on alive, non-draining nodes, "
                               "min_workers=%d", workers, minimum)
            if self._stranded is not None:
                self._stranded.waiting_for_capacity()
            return self._wait()
        waited = self._clock() - self._waiting_since if self._waiting_since is not None else 0.0
        self._waiting_since = None
        logger.info("Starting a worker group of %d: that many fit on alive, non-draining nodes "
                    "(min %d, max %d, waited %.1f s)", workers, minimum, self.scaling_config.max_workers, waited)
        self._remove_orphans()
        self._nodes_at_start = {node.node_id for node in self._capacity.nodes() if node.alive}
        self._announce(GroupStart(waited_s=waited, driver_started_at=self._started_at,
                                  copying_on=self._stranded.group_starting() if self._stranded is not None else None))
        return ResizeDecision(num_workers=workers,
                              resources_per_worker=self.scaling_config._resources_per_worker_not_none)

    def _wait(self) -> NoopDecision:
        # The controller asks again at once after a Noop; pace it rather than spin the head's CPU.
        self._sleep(NOOP_PACE_S)
        return NoopDecision()

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status) -> ScalingDecision:
        self._maybe_send_resource_request()
        return NoopDecision()


def remove_orphaned_placement_groups(resources_per_worker: Dict[str, float], strategy: str) -> List[str]:
    """Remove this job's worker-group placement groups; called just before a new group starts, when
    no group of the run exists, so each one found is an orphan. Returns their ids.

    Ray Train 2.60 orphans one when a group fails after its state is built: an
    ``after_worker_group_start`` callback (the torch process group's setup) meets a worker on a node
    that just died, and ``WorkerGroup._start`` cleans up only groups that have not started. When the
    orphan's nodes die, the GCS reschedules its bundles onto the nodes that join next, and every
    later group times out waiting for the resources it holds (seen on a trace replay: the run
    failed; plain Ray Train never trained again). Matched by shape: a placement group's id ends with
    its job's id, and a worker group's has one bundle of ``resources_per_worker`` per worker.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()
    wanted = {name: float(amount) for name, amount in resources_per_worker.items()}
    orphans = [pg_id for pg_id, info in placement_group_table().items()
               if pg_id.endswith(job_id) and info["state"] != "REMOVED" and info["strategy"] == strategy
               and info["bundles"] and all(bundle == wanted for bundle in info["bundles"].values())]
    for pg_id in orphans:
        logger.warning("Removing placement group %s, which a worker group that failed to start left behind "
                       "(Ray Train 2.60 keeps it, and it would hold the resources the next group needs)", pg_id)
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
    return orphans


def failure_signature(error: TrainingFailedError) -> str:
    """What a failure says, whichever ranks said it: equal for the same bug hit again."""
    failures = error.worker_failures.values() if isinstance(error, WorkerGroupError) else [error]
    return "; ".join(sorted({f"{type(f).__name__}: {str(f).strip().splitlines()[-1] if str(f).strip() else ''}"
                             for f in failures}))


class SpotFailurePolicy(DefaultFailurePolicy):
    """A handoff is a planned restart: retry it without spending the failure budget. A task that
    breaks its contract fails the same way in every group: stop at once, with the task's message.
    And the same error ``max_identical_failures`` times in a row, with no handoff between, is a bug,
    not a lost node: stop (``trainer.max_failures=-1`` would otherwise restart it forever). A group
    whose placement timed out (``placement_timed_out``) is not counted: that repeats while capacity is short.
    Any other failure waits first for the survivors' commits of their last completed step (``survivors``,
    elastic/survivors.py; the controller tears the group down after the decision)."""

    def __init__(self, failure_config: FailureConfig, max_identical_failures: int = 3,
                 survivors: Optional[SurvivorWait] = None):
        super().__init__(failure_config)
        self.handoffs = 0
        self._max_identical = max_identical_failures
        self._last_failure = ("", 0)  # (signature, times in a row)
        self._survivors = survivors

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if breach := contract_breach(training_failed_error):
            logger.error("The training task breaks its contract; a restart would fail the same way: %s", breach)
            return FailureDecision.RAISE
        if is_handoff(training_failed_error):
            self.handoffs += 1
            self._last_failure = ("", 0)
            reasons = sorted({f.reason for f in training_failed_error.worker_failures.values()})
            logger.info("Restarting the worker group for a handoff (%s); handoffs so far: %d",
                        ", ".join(reasons), self.handoffs)
            return FailureDecision.RETRY
        if placement_timed_out(training_failed_error):
            # Capacity, not code: the streak of identical failures neither grows nor ends.
            return super().make_decision(training_failed_error)
        if self._survivors is not None:
            self._survivors.wait(writer=lowest_survivor(training_failed_error))
        signature = failure_signature(training_failed_error)
        times = self._last_failure[1] + 1 if signature == self._last_failure[0] else 1
        self._last_failure = (signature, times)
        if self._max_identical and times >= self._max_identical:
            logger.error("The worker group failed %d times in a row with the same error, so it is not a lost node; "
                         "stopping (trainer.max_identical_failures=%d): %s", times, self._max_identical, signature)
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class SpotTorchTrainer(TorchTrainer):
    """TorchTrainer with the Spot scaling and failure policies and fast controller timings.

    ``failure_settle_s``: after a failure, how long to wait for the GCS to declare dead nodes
    dead before sizing the new group (the cluster's health-check period times its threshold).
    ``max_identical_failures``: see ``SpotFailurePolicy`` (0: never stop for it).
    ``survivor_commit_s``: after a failure, the longest wait for the survivors' commits (0: no wait).
    ``copy_on``: see ``SpotScalingPolicy``.
    """

    def __init__(self, *args, failure_settle_s: float = 4.0, max_identical_failures: int = 3,
                 survivor_commit_s: float = 0.0, copy_on: Optional[Callable[[str, int], "Future[bool]"]] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._failure_settle_s = failure_settle_s
        self._max_identical_failures = max_identical_failures
        self._survivor_commit_s = survivor_commit_s
        self._copy_on = copy_on

    def fit(self):
        for key, value in RAY_TRAIN_TIMING.items():
            os.environ.setdefault(key, value)
        return super().fit()

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["scaling_policy"] = SpotScalingPolicy(
            self.scaling_config, failure_settle_s=self._failure_settle_s,
            announce=GroupStarts(self.run_config.name).publish, copy_on=self._copy_on)
        survivors = (SurvivorWait(SurvivorMarks(self.run_config.name), self._survivor_commit_s)
                     if self._survivor_commit_s > 0 else None)
        controller_init_kwargs["failure_policy"] = SpotFailurePolicy(self.run_config.failure_config,
                                                                     self._max_identical_failures, survivors)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


