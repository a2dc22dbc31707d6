"""A handoff's step held by node copies alone is copied on to the shared tiers by the controller where it is
at risk (elastic/stranded.py), decided without a cluster."""

from concurrent.futures import Future

from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState
from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision
from ray.train.v2.api.config import ScalingConfig

from raytrain_spot.elastic.capacity import LiveCapacity
from raytrain_spot.elastic.policy import SpotScalingPolicy, WorkerGroupHandoff
from tests.test_elastic import CPU1, _group_error, node


class CopiesOn:
    """``copy_on`` that records each call and hands out futures the test completes."""

    def __init__(self):
        self.calls, self.futures = [], []

    def __call__(self, node_id, step):
        self.calls.append((node_id, step))
        self.futures.append(Future())
        return self.futures[-1]


def _policy(nodes, copies, min_workers=2):
    announced = []
    config = ScalingConfig(num_workers=(min_workers, 3), resources_per_worker=CPU1)
    policy = SpotScalingPolicy(config, capacity=LiveCapacity(CPU1, 3, nodes=lambda: nodes, max_age_s=0),
                               sleep=lambda s: None, remove_orphans=list, announce=announced.append, copy_on=copies)
    policy._maybe_send_resource_request = lambda: None
    return policy, announced


def _handed_off(policy, step, node_copies):
    failures = [WorkerGroupHandoff("regrow", step, node_copies) for _ in range(2)]
    policy.after_controller_state_update(RunningState(), RestartingState(_group_error(*failures)))


def _running(policy):
    policy.after_controller_state_update(RestartingState(_group_error(RuntimeError())), RunningState())


def test_a_step_one_node_holds_is_copied_on_at_the_handoff_and_the_next_group_leaves_it_to_the_controller():
    nodes, copies = [node("a"), node("b")], CopiesOn()
    policy, announced = _policy(nodes, copies)
    _handed_off(policy, 116, ("a",))
    assert copies.calls == [("a", 116)], "before a notice can make its node draining (Ray places nothing there)"
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision), "no wait for the copy"
    assert announced[-1].copying_on == 116, "two uploads of one step to the head would spoil each other"
    _running(policy)
    _handed_off(policy, 130, ("a", "b"))
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)
    assert copies.calls == [("a", 116)] and announced[-1].copying_on is None, \
        "two nodes hold it and the next group starts at once: that group copies it on"


def test_while_the_next_group_waits_for_capacity_a_node_holding_the_step_copies_it_on_once():
    nodes, copies = [node("a"), node("b")], CopiesOn()
    policy, announced = _policy(nodes, copies, min_workers=3)
    _handed_off(policy, 40, ("a", "b"))
    assert copies.calls == []
    for _ in range(3):
        assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)
    assert copies.calls == [("a", 40)], "one copy-on, not one per wait"
    copies.futures[0].set_result(True)
    policy.make_decision_for_non_running_worker_group()
    nodes.append(node("c"))
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)
    assert copies.calls == [("a", 40)] and announced[-1].copying_on == 40


def test_after_a_failed_copy_on_the_next_holder_copies_and_dead_or_draining_holders_never():
    nodes = [node("a", draining=True), node("b"), node("c", alive=False), node("d")]
    copies = CopiesOn()
    policy, announced = _policy(nodes, copies, min_workers=3)
    _handed_off(policy, 50, ("a", "b", "c", "d"))
    policy.make_decision_for_non_running_worker_group()
    assert copies.calls == [("b", 50)], "Ray places no task on a draining node, and none on a dead one"
    copies.futures[0].set_exception(RuntimeError("node b died"))
    policy.make_decision_for_non_running_worker_group()
    assert copies.calls == [("b", 50), ("d", 50)]
    copies.futures[1].set_result(False)  # d's copy did not verify
    policy.make_decision_for_non_running_worker_group()
    assert copies.calls == [("b", 50), ("d", 50)], "no holder left to try"
    nodes.append(node("e"))
    policy.make_decision_for_non_running_worker_group()
    assert announced[-1].copying_on is None, "no copy-on stands: the group copies the step on itself"


def test_a_step_on_the_shared_tiers_is_never_copied_and_a_running_group_takes_the_step_over():
    nodes, copies = [node("a")], CopiesOn()
    policy, _ = _policy(nodes, copies)
    _handed_off(policy, 20, ())  # a handoff where no node stays commits on the shared tiers
    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)
    _handed_off(policy, 30, ("a", "b"))
    _running(policy)  # a group started on a and b and runs: it restores and copies the step on itself
    policy.make_decision_for_non_running_worker_group()
    assert copies.calls == []
