"""The notice hold's decision, the handoff rule that honours it and the watcher's view it reads,
without a cluster (the loop acting on it: tests/test_loop.py)."""

from raytrain_spot.elastic.capacity import CapacityWatcher, LiveCapacity, NodeView
from raytrain_spot.preemption.hold import StandbyProgress, decide_notice_hold

CPU1 = {"CPU": 1.0}


def hold(usable=0, min_workers=1, deadline_in_s=20.0, step_s=0.5, commit_s=1.0, margin_s=1.0, warmup=None):
    return decide_notice_hold(usable, min_workers, deadline_in_s, step_s, commit_s, margin_s, warmup)


def test_with_nowhere_to_go_the_group_trains_on_while_a_step_and_the_commit_fit_before_the_deadline():
    decision = hold(deadline_in_s=20.0)
    assert decision.hold and decision.needed_s == 2.5 and "20.0 s to the drain deadline" in decision.reason
    assert hold(deadline_in_s=2.6).hold and not hold(deadline_in_s=2.5).hold


def test_the_release_near_the_deadline_says_why_with_its_numbers():
    decision = hold(deadline_in_s=2.0)
    assert not decision.hold and (decision.deadline_in_s, decision.needed_s) == (2.0, 2.5)
    assert "2.0 s away" in decision.reason and "take 2.5 s" in decision.reason


def test_somewhere_to_go_hands_off_at_once():
    assert not hold(usable=1).hold
    assert hold(usable=1, min_workers=2).hold, "one worker elsewhere is not enough for min_workers=2"


def warming(missing=2, elapsed_s=3.0, limit_s=10.0):
    return StandbyProgress(missing=missing, elapsed_s=elapsed_s, limit_s=limit_s)


def test_somewhere_to_go_trains_on_while_the_nodes_that_stay_warm_their_standbys():
    decision = hold(usable=2, warmup=warming())
    assert decision.hold
    assert "while 2 standbys there import" in decision.reason and "20.0 s to the drain deadline" in decision.reason
    nowhere = hold(usable=0, warmup=None)
    assert nowhere.hold and "fewer than min_workers=1" in nowhere.reason


def test_the_warmup_hold_ends_when_they_are_warm_at_its_limit_or_near_the_deadline():
    warm = hold(usable=2, warmup=warming(missing=0, elapsed_s=4.2))
    assert not warm.hold and "standbys warm 4.2 s after the notice" in warm.reason
    late = hold(usable=2, warmup=warming(missing=1, elapsed_s=10.0, limit_s=10.0))
    assert not late.hold and "1 of their standbys still importing after 10.0 s (elastic.notice_standby_wait_s=10)" \
        in late.reason
    near = hold(usable=2, warmup=warming(), deadline_in_s=2.0)
    assert not near.hold and near.needed_s == 2.5, "the deadline bounds a warm-up as it bounds any hold"
    assert not hold(usable=2, warmup=warming(), deadline_in_s=None).hold
    assert not hold(usable=2, warmup=warming(), commit_s=None).hold


def test_without_a_deadline_a_measured_commit_or_a_view_of_the_cluster_there_is_no_hold():
    assert "no drain deadline" in hold(deadline_in_s=None).reason and not hold(deadline_in_s=None).hold
    assert "no checkpoint commit measured" in hold(commit_s=None).reason and not hold(commit_s=None).hold
    assert "unknown" in hold(usable=None).reason and not hold(usable=None).hold


def test_the_watcher_counts_workers_without_the_noticed_nodes_and_knows_their_deadlines():
    view = [NodeView("a", True, False, CPU1), NodeView("b", True, True, CPU1, drain_deadline_ms=1_790_000_010_000),
            NodeView("c", True, False, CPU1), NodeView("d", True, True, CPU1, drain_deadline_ms=1_790_000_005_000)]
    watcher = CapacityWatcher(LiveCapacity(CPU1, 3, nodes=lambda: view, max_age_s=0), ["a", "b"], interval_s=1)
    assert watcher.workers_without({"a"}) is None and watcher.drain_deadline_s({"b"}) is None, "before a check"
    watcher.check()
    assert watcher.workers_without({"a"}) == 1, "c alone: b and d are draining"
    assert watcher.workers_without({"a", "c"}) == 0
    assert watcher.drain_deadline_s({"b", "d"}) == 1_790_000_005.0
    assert watcher.drain_deadline_s({"a", "b"}) is None, "a has no drain (yet): its deadline is not known"


def test_the_watcher_knows_where_a_restarted_group_places_what_its_survivors_cannot_hold():
    view = [NodeView("a", True, False, CPU1), NodeView("b", True, True, CPU1), NodeView("c", True, False, CPU1),
            NodeView("d", True, True, CPU1), NodeView("e", True, False, {"CPU": 2.0}), NodeView("f", False, False, CPU1)]
    watcher = CapacityWatcher(LiveCapacity(CPU1, 8, nodes=lambda: view, max_age_s=0), ["a", "b"], interval_s=1)
    assert watcher.room_outside_group(2) == {}, "before a check"
    watcher.check()
    assert watcher.room_outside_group(8) == {"c": 1, "e": 2}, "not the group's, a draining or a dead node"
    assert watcher.room_outside_group(2) == {"c": 1, "e": 1}, "no more than the restarted group takes"
    assert watcher.room_outside_group(0) == {}
