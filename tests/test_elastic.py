"""Resize decisions without a cluster: the live capacity count, regrow settling, handoff accounting."""

import threading

import pytest
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision
from ray.train.v2.api.config import FailureConfig, ScalingConfig
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from raytrain_spot.elastic.capacity import CapacityWatcher, LiveCapacity, NodeView, workers_that_fit
from raytrain_spot.elastic.policy import SpotFailurePolicy, SpotScalingPolicy
from raytrain_spot.loop.handoff import WorkerGroupHandoff
from raytrain_spot.elastic.signals import ExtraCapacity, GroupStart
from bench.baselines import BASELINES
from raytrain_spot.config.errors import TaskContractError
from raytrain_spot.loop.strategy import SPOT

CPU1 = {"CPU": 1.0}


def node(name, cpus=1.0, alive=True, draining=False, gpus=0.0):
    return NodeView(name, alive, draining, {"CPU": cpus, "GPU": gpus})


def test_draining_and_dead_nodes_do_not_count():
    nodes = [node("head", cpus=0), node("a"), node("b", draining=True), node("c", alive=False), node("d", cpus=2)]
    assert workers_that_fit(nodes, CPU1, max_workers=8) == 3
    assert workers_that_fit(nodes, CPU1, max_workers=2) == 2
    assert workers_that_fit(nodes, {"CPU": 1, "GPU": 1}, max_workers=8) == 0
    assert workers_that_fit([node("g", cpus=8, gpus=2)], {"CPU": 1, "GPU": 1}, max_workers=8) == 2


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_capacity_is_cached_briefly_then_reread():
    clock, reads = Clock(), []
    views = [[node("a")], [node("a"), node("b")]]

    def nodes():
        reads.append(clock.now)
        return views[min(len(reads) - 1, 1)]

    capacity = LiveCapacity(CPU1, 3, nodes=nodes, clock=clock, max_age_s=0.5)
    assert capacity.workers() == 1
    clock.now = 0.4
    assert capacity.workers() == 1 and len(reads) == 1
    clock.now = 0.6
    assert capacity.workers() == 2 and len(reads) == 2


def _policy(nodes, min_workers=1, max_workers=3):
    config = ScalingConfig(num_workers=(min_workers, max_workers), resources_per_worker=CPU1)
    policy = SpotScalingPolicy(config, capacity=LiveCapacity(CPU1, max_workers, nodes=lambda: nodes, max_age_s=0),
                               sleep=lambda s: None, remove_orphans=list)
    policy._maybe_send_resource_request = lambda: None  # no autoscaler in a unit test
    return policy


def test_new_group_is_sized_from_the_live_view():
    decision = _policy([node("a"), node("b", draining=True), node("c")]).make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2


def test_orphaned_placement_groups_are_removed_just_before_a_group_starts_and_only_then():
    config = ScalingConfig(num_workers=(2, 3), resources_per_worker=CPU1)
    nodes = [node("a", draining=True), node("b")]
    sweeps = []
    policy = SpotScalingPolicy(config, capacity=LiveCapacity(CPU1, 3, nodes=lambda: nodes, max_age_s=0),
                               sleep=lambda s: None, remove_orphans=lambda: sweeps.append(1) or [])
    policy._maybe_send_resource_request = lambda: None
    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)
    assert sweeps == [], "no sweep per wait: the controller asks every 0.1 s while capacity is short"
    nodes.append(node("c"))
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)
    assert sweeps == [1]


def test_below_min_workers_waits_for_capacity():
    decision = _policy([node("a", draining=True), node("b")], min_workers=2).make_decision_for_non_running_worker_group()
    assert isinstance(decision, NoopDecision)


def test_a_new_group_is_told_how_long_it_waited_for_capacity_and_when_its_driver_started():
    clock, announced = Clock(), []
    config = ScalingConfig(num_workers=(2, 3), resources_per_worker=CPU1)
    nodes = [node("a")]
    policy = SpotScalingPolicy(config, capacity=LiveCapacity(CPU1, 3, nodes=lambda: nodes, max_age_s=0), clock=clock,
                               sleep=lambda s: None, remove_orphans=list, announce=announced.append,
                               wall_clock=lambda: 1000.0)
    policy._maybe_send_resource_request = lambda: None
    clock.now = 5.0
    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision) and announced == []
    clock.now = 46.0
    nodes.append(node("b"))
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)
    assert announced == [GroupStart(waited_s=41.0, driver_started_at=1000.0)]
    clock.now = 60.0
    policy.make_decision_for_non_running_worker_group()
    assert announced[-1] == GroupStart(waited_s=0.0, driver_started_at=1000.0), "the next group did not wait"


def test_after_a_failure_the_new_group_waits_for_dead_nodes_to_be_declared():
    clock = Clock()
    config = ScalingConfig(num_workers=(1, 3), resources_per_worker=CPU1)
    view = [node("a"), node("b"), node("c")]  # "c" just died; the GCS has not noticed yet
    policy = SpotScalingPolicy(config, capacity=LiveCapacity(CPU1, 3, nodes=lambda: view, max_age_s=0),
                               failure_settle_s=4.0, clock=clock, sleep=lambda s: None, remove_orphans=list)
    policy._maybe_send_resource_request = lambda: None
    restarting = RestartingState(_group_error(RuntimeError("reset by peer")))
    policy.after_controller_state_update(RunningState(), restarting)
    clock.now = 1.0
    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)
    policy.after_controller_state_update(restarting, restarting)  # the controller re-enters after a Noop
    view[2] = node("c", alive=False)  # health checks failed: declared dead
    clock.now = 4.5
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2


def test_a_failure_whose_node_the_gcs_has_declared_dead_restarts_after_one_health_check_period():
    """A powered-off VM's failure reaches the controller through its node's death: the loss is
    known, and waiting out the rest of the settle period would only pause training longer."""
    clock = Clock()
    config = ScalingConfig(num_workers=(1, 3), resources_per_worker=CPU1)
    view = [node("a"), node("b"), node("c")]
    policy = SpotScalingPolicy(config, capacity=LiveCapacity(CPU1, 3, nodes=lambda: view, max_age_s=0),
                               failure_settle_s=4.0, clock=clock, sleep=lambda s: None, remove_orphans=list)
    policy._maybe_send_resource_request = lambda: None
    assert policy.make_decision_for_non_running_worker_group().num_workers == 3  # the group that will fail
    view[2] = node("c", alive=False)  # declared dead: its workers' failure follows
    restarting = RestartingState(_group_error(RuntimeError("actor died")))
    policy.after_controller_state_update(RunningState(), restarting)
    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision), \
        "a node lost with it may be declared a health-check period later"
    clock.now = 1.0
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2, "3 s before the settle period ends"

    view[1] = node("b", alive=True)  # a worker process crashed on a node that stays alive
    crashed = RestartingState(_group_error(RuntimeError("segfault")))
    policy.after_controller_state_update(restarting, crashed)
    clock.now = 4.9
    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision), \
        "no node declared dead: the whole settle period"
    clock.now = 5.1
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)


def test_a_handoff_restarts_at_once():
    clock = Clock()
    config = ScalingConfig(num_workers=(1, 3), resources_per_worker=CPU1)
    policy = SpotScalingPolicy(config, capacity=LiveCapacity(CPU1, 3, nodes=lambda: [node("a")], max_age_s=0),
                               failure_settle_s=4.0, clock=clock, sleep=lambda s: None, remove_orphans=list)
    policy._maybe_send_resource_request = lambda: None
    handoff = _group_error(WorkerGroupHandoff("preemption", 3), WorkerGroupHandoff("preemption", 3))
    policy.after_controller_state_update(RunningState(), RestartingState(handoff))
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)


def test_a_running_group_with_room_to_grow_is_left_to_its_handoff_but_capacity_is_still_requested():
    policy = _policy([node("a"), node("b"), node("c")])  # three fit; the running group has one
    requests = []
    policy._maybe_send_resource_request = lambda: requests.append(1)
    assert isinstance(policy.make_decision_for_running_worker_group(None, None), NoopDecision), \
        "a controller resize would kill the group and lose the steps since its last checkpoint"
    assert requests, "the autoscaler must still hear of max_workers while the group runs"


def test_extra_capacity_is_reported_with_its_age_which_restarts_when_it_vanishes():
    clock, view = Clock(), [node("a"), node("b")]
    watcher = CapacityWatcher(LiveCapacity(CPU1, 3, nodes=lambda: view, clock=clock, max_age_s=0),
                              group_nodes=["a", "b"], interval_s=1, clock=clock)
    watcher.check()
    assert watcher.extra is None
    view.append(node("c"))
    watcher.check()
    clock.now = 1.0
    watcher.check()
    assert watcher.extra == ExtraCapacity(3, 1.0)
    view.pop()  # the new node vanished: its age starts over with the next one
    clock.now = 1.5
    watcher.check()
    assert watcher.extra is None
    view.append(node("d"))
    clock.now = 2.0
    watcher.check()
    clock.now = 4.5
    assert watcher.extra == ExtraCapacity(3, 2.5)


def test_watcher_reads_which_group_nodes_are_draining():
    view = [node("a"), node("b"), node("c", draining=True)]
    watcher = CapacityWatcher(LiveCapacity(CPU1, 3, nodes=lambda: view, max_age_s=0),
                              group_nodes=["a", "a", "b"], interval_s=1)
    watcher.check()
    assert watcher.draining == frozenset(), "a draining node outside the group is not the group's notice"
    view[1] = node("b", draining=True)
    watcher.check()
    assert watcher.draining == {"b"} and watcher.extra is None, "a group losing a node does not regrow"


def test_watcher_hears_of_nodes_that_join_while_the_group_runs():
    view, joined = [node("a"), node("b")], []
    watcher = CapacityWatcher(LiveCapacity(CPU1, 3, nodes=lambda: view, max_age_s=0), group_nodes=["a", "b"],
                              interval_s=1, on_join=joined.append)
    watcher.check()
    assert joined == [], "the group's own nodes are not news"
    view.append(node("c", draining=True))
    watcher.check()
    view[2] = node("c")
    view.append(node("d", alive=False))
    watcher.check()
    watcher.check()
    assert [n.node_id for n in joined] == ["c"], "once, and only once usable"


def _group_error(*failures):
    return WorkerGroupError("x", worker_failures=dict(enumerate(failures)))


def test_handoffs_do_not_spend_the_failure_budget():
    policy = SpotFailurePolicy(FailureConfig(max_failures=1))
    for _ in range(5):
        decision = policy.make_decision(_group_error(WorkerGroupHandoff("preemption", 7), WorkerGroupHandoff("preemption", 7)))
        assert decision == FailureDecision.RETRY
    assert policy.handoffs == 5
    assert policy.make_decision(_group_error(RuntimeError("boom"))) == FailureDecision.RETRY
    assert policy.make_decision(_group_error(RuntimeError("boom"))) == FailureDecision.RAISE


def test_a_real_error_beside_a_handoff_is_a_failure():
    policy = SpotFailurePolicy(FailureConfig(max_failures=0))
    mixed = _group_error(WorkerGroupHandoff("regrow", 3), RuntimeError("collective timed out"))
    assert policy.make_decision(mixed) == FailureDecision.RAISE


def test_a_task_that_breaks_its_contract_stops_the_run_even_with_failures_to_spare():
    policy = SpotFailurePolicy(FailureConfig(max_failures=-1))
    breach = _group_error(TaskContractError("loss returned (), not one loss per sample"), RuntimeError("peer gone"))
    assert policy.make_decision(breach) == FailureDecision.RAISE
    assert policy.make_decision(_group_error(RuntimeError("peer gone"))) == FailureDecision.RETRY


def test_the_same_error_again_and_again_is_a_bug_not_a_lost_node():
    policy = SpotFailurePolicy(FailureConfig(max_failures=-1), max_identical_failures=3)
    bug = lambda: _group_error(RuntimeError("Expected to have finished reduction in the prior iteration"))  # noqa: E731
    assert [policy.make_decision(bug()) for _ in range(2)] == [FailureDecision.RETRY] * 2
    assert policy.make_decision(bug()) == FailureDecision.RAISE
    other = SpotFailurePolicy(FailureConfig(max_failures=-1), max_identical_failures=3)
    lost = [RuntimeError("connection reset by peer 10.0.0.3"), RuntimeError("connection reset by peer 10.0.0.4"),
            RuntimeError("connection reset by peer 10.0.0.3")]
    assert [other.make_decision(_group_error(e)) for e in lost] == [FailureDecision.RETRY] * 3, "not the same error"
    between = SpotFailurePolicy(FailureConfig(max_failures=-1), max_identical_failures=3)
    for _ in range(2):
        between.make_decision(bug())
    between.make_decision(_group_error(WorkerGroupHandoff("preemption", 9), WorkerGroupHandoff("preemption", 9)))
    assert between.make_decision(bug()) == FailureDecision.RETRY, "a handoff between starts the count again"


def test_placement_timeouts_are_capacity_however_often_they_repeat():
    policy = SpotFailurePolicy(FailureConfig(max_failures=-1), max_identical_failures=3)
    timeout = lambda: ControllerError(WorkerGroupStartupTimeoutError(num_workers=3))  # noqa: E731
    assert [policy.make_decision(timeout()) for _ in range(6)] == [FailureDecision.RETRY] * 6
    bug = lambda: _group_error(RuntimeError("Expected to have finished reduction in the prior iteration"))  # noqa: E731
    decisions = [policy.make_decision(error) for error in (bug(), timeout(), bug(), timeout(), bug())]
    assert decisions[-1] == FailureDecision.RAISE, "timeouts between do not hide a bug's streak"


def test_handoff_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(WorkerGroupHandoff("regrow", 12)))
    assert (error.reason, error.step) == ("regrow", 12)


@pytest.mark.parametrize("strategy, overrides, trainer_type, num_workers, torch_config_type", [
    (SPOT, [], "SpotTorchTrainer", (1, 3), "StoreFirstTorchConfig"),
    (BASELINES["plain-ray-train"], [], "TorchTrainer", (1, 3), "TorchConfig"),
    # Ray's fixed scaling policy
    (BASELINES["plain-ray-train"], ["trainer.min_workers=3"], "TorchTrainer", 3, "TorchConfig"),
])
def test_trainer_matches_the_configured_scaling(compose, strategy, overrides, trainer_type, num_workers,
                                                torch_config_type):
    from raytrain_spot.config.schema import load_config
    from raytrain_spot.loop.ray_trainer import build_trainer
    from raytrain_spot.loop.worker import LoopContext

    cfg = load_config(compose("+experiment=vlm", *overrides))
    trainer = build_trainer(cfg, LoopContext(config=cfg.to_dict(), storage_uri="file:///tmp/unused", events=None,
                                             head_store=None, strategy=strategy))
    assert type(trainer).__name__ == trainer_type
    assert trainer.scaling_config.num_workers == num_workers
    assert type(trainer.backend_config).__name__ == torch_config_type, "a baseline keeps Ray's own setup"
    assert trainer.run_config.failure_config.max_failures != 0, "a lost Spot node must not end the run"


def test_a_node_outside_the_group_counts_for_a_regrow_once_warm_or_after_the_wait_limit():
    view, warm, clock = [node("a"), node("b")], set(), Clock()
    watcher = CapacityWatcher(LiveCapacity(CPU1, 3, nodes=lambda: view, max_age_s=0), group_nodes=["a"],
                              interval_s=1, clock=clock, warm=lambda: warm, warm_wait_limit_s=60)
    watcher.check()
    assert watcher.extra is None, "b is still importing: a restart onto it would wait for the import"
    warm.add("b")
    clock.now += 5
    watcher.check()
    assert watcher.extra == ExtraCapacity(2, 0.0), "its age counts from when it is warm"
    view.append(node("c"))
    watcher.check()
    clock.now += 60
    watcher.check()
    assert watcher.extra.workers == 3, "a node that never reports warm counts after the wait limit"


def test_without_a_warm_view_every_usable_node_counts_and_a_failing_one_counts_them_all():
    view = [node("a"), node("b")]
    plain = CapacityWatcher(LiveCapacity(CPU1, 3, nodes=lambda: view, max_age_s=0), ["a"], interval_s=1)
    plain.check()

    def unreadable():
        raise ConnectionError("GCS")

    failing = CapacityWatcher(LiveCapacity(CPU1, 3, nodes=lambda: view, max_age_s=0), ["a"], interval_s=1,
                              warm=unreadable)
    failing.check()
    assert plain.extra.workers == failing.extra.workers == 2


def test_the_first_look_at_the_cluster_is_done_before_the_group_trains():
    """A notice in the group's first seconds must find the capacity outside the noticed node known;
    unknown, the notice hold hands off at once (seen on a loaded machine: a notice 1.7 s in)."""
    view, readers = [node("a"), node("b"), node("c")], []

    def nodes():
        readers.append(threading.current_thread())
        return view

    watcher = CapacityWatcher(LiveCapacity(CPU1, 3, nodes=nodes, max_age_s=0), ["a", "b"], interval_s=60).start()
    try:
        assert readers == [threading.current_thread()], "read by the caller, not left to the watch's thread"
        assert watcher.workers_without({"b"}) == 2
    finally:
        watcher.stop()


def test_a_node_outside_the_group_at_its_start_is_news_at_the_first_check():
    """A group sized while nodes were still joining (after an outage) must warm them too: without
    a standby nothing preloads there, and the node would never count as warm."""
    view, joined = [node("a"), node("b"), node("c", draining=True)], []
    watcher = CapacityWatcher(LiveCapacity(CPU1, 3, nodes=lambda: view, max_age_s=0), group_nodes=["a"],
                              interval_s=1, on_join=joined.append)
    watcher.check()
    watcher.check()
    assert [n.node_id for n in joined] == ["b"]
