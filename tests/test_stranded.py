"""A handoff's step held by node copies alone is copied on to the shared tiers while the next group waits
for capacity (elastic/stranded.py), decided without a cluster."""

import threading
import time
from concurrent.futures import Future

from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState
from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision
from ray.train.v2.api.config import ScalingConfig

from raytrain_spot.elastic.capacity import LiveCapacity
from raytrain_spot.elastic.policy import SpotScalingPolicy, WorkerGroupHandoff
from raytrain_spot.elastic.stranded import StrandedStep
from tests.test_elastic import CPU1, _group_error, node


class CopiesOn:
    """``copy_on`` that records each call and hands out futures the test completes."""

    def __init__(self):
        self.calls, self.futures = [], []

    def __call__(self, node_id, step):
        self.calls.append((node_id, step))
        self.futures.append(Future())
        return self.futures[-1]


def _policy(nodes, copies, min_workers=2, wait_s=30.0):
    config = ScalingConfig(num_workers=(min_workers, 3), resources_per_worker=CPU1)
    policy = SpotScalingPolicy(config, capacity=LiveCapacity(CPU1, 3, nodes=lambda: nodes, max_age_s=0),
                               sleep=lambda s: None, remove_orphans=list, stranded=StrandedStep(copies, wait_s))
    policy._maybe_send_resource_request = lambda: None
    return policy


def _handed_off(policy, step, node_copies):
    failures = [WorkerGroupHandoff("regrow", step, node_copies) for _ in range(2)]
    policy.after_controller_state_update(RunningState(), RestartingState(_group_error(*failures)))


def test_while_the_next_group_waits_for_capacity_a_node_holding_the_step_copies_it_on_once():
    nodes, copies = [node("a")], CopiesOn()
    policy = _policy(nodes, copies)
    _handed_off(policy, 116, ("a",))
    for _ in range(3):
        assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)
    assert copies.calls == [("a", 116)], "one copy-on, not one per wait"
    copies.futures[0].set_result(True)
    policy.make_decision_for_non_running_worker_group()
    assert copies.calls == [("a", 116)], "a copy-on that committed is not repeated"


def test_the_next_group_starts_only_once_the_copy_on_in_flight_is_done():
    nodes, copies = [node("a")], CopiesOn()
    policy = _policy(nodes, copies)
    _handed_off(policy, 116, ("a",))
    policy.make_decision_for_non_running_worker_group()
    nodes.append(node("b"))
    done_at = []

    def finish():
        time.sleep(0.3)
        done_at.append(time.monotonic())
        copies.futures[0].set_result(True)

    threading.Thread(target=finish).start()
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and done_at and time.monotonic() >= done_at[0], \
        "the group's own copy-on would race the one in flight on the head"


def test_a_group_that_starts_at_once_copies_nothing_and_a_step_on_the_shared_tiers_is_never_copied():
    copies = CopiesOn()
    policy = _policy([node("a"), node("b")], copies)
    _handed_off(policy, 10, ("a", "b"))
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)
    waiting = _policy([node("a")], copies)
    _handed_off(waiting, 20, ())  # a handoff where no node stays commits on the shared tiers
    assert isinstance(waiting.make_decision_for_non_running_worker_group(), NoopDecision)
    assert copies.calls == []


def test_after_a_failed_copy_on_the_next_holder_copies_dead_nodes_never_and_a_draining_one_last():
    nodes = [node("a", draining=True), node("b"), node("c", alive=False)]
    copies = CopiesOn()
    policy = _policy(nodes, copies, min_workers=3)
    _handed_off(policy, 50, ("a", "b", "c"))
    policy.make_decision_for_non_running_worker_group()
    assert copies.calls == [("b", 50)], "a draining node dies first: the alive, non-draining holder copies"
    copies.futures[0].set_exception(RuntimeError("node b died"))
    policy.make_decision_for_non_running_worker_group()
    assert copies.calls == [("b", 50), ("a", 50)]
    copies.futures[1].set_result(False)  # a's copy did not verify
    policy.make_decision_for_non_running_worker_group()
    assert copies.calls == [("b", 50), ("a", 50)], "no holder left to try"


def test_a_copy_on_that_hangs_holds_the_next_group_back_only_so_long():
    nodes, copies = [node("a")], CopiesOn()
    policy = _policy(nodes, copies, wait_s=0.2)
    _handed_off(policy, 7, ("a",))
    policy.make_decision_for_non_running_worker_group()
    nodes.append(node("b"))
    started = time.monotonic()
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)
    assert 0.2 <= time.monotonic() - started < 5
    _handed_off(policy, 9, ())
    nodes.pop()
    policy.make_decision_for_non_running_worker_group()
    assert copies.calls == [("a", 7)], "the started group took the step over"
