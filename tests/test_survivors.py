"""The controller's wait for the survivors' commits after a lost worker (elastic/survivors.py) and the
survivors' watch (loop/survivor_commit.py), on a fake clock; the real node table and marks in the
GCS are driven end to end by tests/test_chaos_e2e.py, the commit itself by tests/test_survivor_commit.py."""

from __future__ import annotations

import threading
import time
from typing import Dict, List

import pytest
import torch
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.config import FailureConfig
from ray.train.v2.api.exceptions import WorkerGroupError

from raytrain_spot.elastic.policy import SpotFailurePolicy
from raytrain_spot.config.schema import CheckpointingConfig, Config, ElasticConfig
from raytrain_spot.elastic.survivors import FIRST_MARK_S, SurvivorWait, survivor_commit_s
from raytrain_spot.loop.handoff import WorkerGroupHandoff
from raytrain_spot.loop.survivor_commit import StepGuard, SurvivorWatch


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class ScriptedMarks:
    """The GCS's marks as a script: ``at(3.0, {1: "committing"})`` from second 3 on."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._script: List[tuple] = [(0.0, {})]
        self.cleared_at = None

    def at(self, second: float, marks: Dict[int, str]) -> "ScriptedMarks":
        self._script.append((second, marks))
        return self

    def read(self) -> Dict[int, str]:
        return dict([marks for second, marks in self._script if second <= self._clock.now][-1])

    def clear(self) -> None:
        self.cleared_at = self._clock.now


def waited(marks: ScriptedMarks, clock: Clock, deadline_s: float = 30.0, writer: int = 0):
    return SurvivorWait(marks, deadline_s, clock=clock, sleep=clock.sleep).wait(writer=writer)


def test_the_wait_ends_when_every_survivor_that_began_has_committed():
    clock = Clock()
    marks = ScriptedMarks(clock).at(0.6, {1: "committing"}).at(0.7, {1: "committing", 2: "committing"}) \
        .at(4.0, {1: "committed:41", 2: "committing"}).at(5.5, {1: "committed:41", 2: "committed:42"})
    outcome = waited(marks, clock, writer=1)
    assert 5.5 <= outcome.waited_s < 5.7 and outcome.committed_steps == [41, 42]
    assert marks.cleared_at == clock.now, "the next group's failure must not read these marks"


def test_no_word_from_the_writer_costs_at_most_the_first_mark_wait():
    clock = Clock()
    outcome = waited(ScriptedMarks(clock), clock)
    assert FIRST_MARK_S <= outcome.waited_s < FIRST_MARK_S + 0.2
    assert outcome.committed_steps == [] and "no word from the writer" in outcome.reason


def test_a_commit_that_outlasts_the_deadline_is_given_up():
    clock = Clock()
    outcome = waited(ScriptedMarks(clock).at(0.5, {0: "committing"}), clock, deadline_s=12.0)
    assert 12.0 <= outcome.waited_s < 12.2 and "deadline" in outcome.reason
    assert outcome.marks == {0: "committing"} and outcome.committed_steps == []


def test_a_failed_survivor_ends_the_wait_with_nothing_committed():
    clock = Clock()
    outcome = waited(ScriptedMarks(clock).at(0.5, {0: "committing"}).at(1.5, {0: "failed"}), clock)
    assert outcome.waited_s < 1.7 and outcome.committed_steps == []


def test_a_survivor_that_raised_after_its_commit_does_not_end_the_wait_for_the_writer():
    # Rank 2 kept only its node's copy and raised at once; rank 1, the writer, is still committing.
    clock = Clock()
    marks = ScriptedMarks(clock).at(0.0, {2: "committed:7"}).at(0.5, {2: "committed:7", 1: "committing"}) \
        .at(2.0, {2: "committed:7", 1: "committed:7"})
    outcome = waited(marks, clock, writer=1)
    assert 2.0 <= outcome.waited_s < 2.2 and outcome.committed_steps == [7, 7]


class RecordedWait:
    def __init__(self):
        self.writers = []

    def wait(self, writer):
        self.writers.append(writer)


def test_the_failure_policy_waits_for_the_lowest_rank_the_failure_did_not_take():
    wait = RecordedWait()
    policy = SpotFailurePolicy(FailureConfig(max_failures=-1), survivors=wait)
    lost = lambda *ranks: {rank: WorkerHealthCheckFailedError("node died", failure=None) for rank in ranks}  # noqa: E731
    assert policy.make_decision(WorkerGroupError("x", worker_failures=lost(2))) == FailureDecision.RETRY
    policy.make_decision(WorkerGroupError("x", worker_failures={**lost(0, 1), 2: RuntimeError("Connection reset")}))
    policy.make_decision(WorkerGroupError("x", worker_failures={0: RuntimeError("boom")}))
    policy.make_decision(WorkerGroupError("x", worker_failures={0: WorkerGroupHandoff("preemption", 3)}))
    assert wait.writers == [0, 2, 0], "a handoff has nothing to wait for"


def test_the_steps_count_as_stopped_after_five_typical_steps_and_at_least_two_seconds():
    clock = Clock()
    guard = StepGuard(torch.device("cpu"), clock=clock)
    for _ in range(5):
        clock.sleep(0.1)
        with guard.moving():
            pass
    clock.sleep(1.9)
    assert not guard.stalled()
    clock.sleep(0.1)
    assert guard.stalled()
    guard = StepGuard(torch.device("cpu"), clock=clock)
    for _ in range(5):
        with guard.moving():
            clock.sleep(1.0)
    clock.sleep(4.9)
    assert not guard.stalled(), "5 steps of 1 s: a sixth second is still a step"
    clock.sleep(0.1)
    assert guard.stalled()


def test_the_watch_commits_once_a_group_node_is_dead_and_the_steps_have_stopped():
    dead, stalled, commits = set(), threading.Event(), []
    nodes = ["a", "b", "c"]
    with SurvivorWatch(nodes, 1, lambda node_ids: dead & set(node_ids), commits.append, stalled.is_set,
                       interval_s=0.01, settle_s=1.0):  # wide: a loaded machine's late wake-ups stay inside it
        dead.add("b")  # this rank's own node: its raylet stopped while it trains on
        time.sleep(0.1)
        dead.add("x")  # not the group's
        stalled.set()
        time.sleep(0.1)
        assert commits == []
        dead.discard("b")
        dead.add("c")
        stalled.clear()
        time.sleep(0.1)
        assert commits == [], "a node declared dead while the group trains on: nothing to commit yet"
        stalled.set()
        time.sleep(0.05)
        dead.add("a")  # declared dead a moment later: lost with "c"
        time.sleep(0.1)
        assert commits == [], "the set of dead nodes has not settled yet"
        deadline = time.time() + 5
        while not commits and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    assert commits == [{"a", "c"}], "once, with every node lost together"


def test_a_failed_collective_commits_once_the_nodes_lost_with_the_first_are_declared_too():
    # The simulator reaps a node as soon as Ray declares it dead: the survivors' collective fails at
    # once, while the node lost with it is still a health-check period from its declaration. Counted
    # alive, rank 0 would be the writer of the shared tiers in rank 1's eyes, and nobody would write them.
    dead, commits = {"c"}, []
    declare_a_moment_later = threading.Timer(0.3, lambda: dead.add("a"))
    declare_a_moment_later.start()
    with pytest.raises(RuntimeError):
        with SurvivorWatch(["a", "b", "c"], 1, lambda node_ids: dead & set(node_ids), commits.append,
                           lambda: False, interval_s=0.05, settle_s=0.5):
            raise RuntimeError("Connection closed by peer")
    assert commits == [{"a", "c"}]


def test_sharded_checkpoints_have_no_survivor_commit_their_saves_are_collectives():
    assert survivor_commit_s(Config(elastic=ElasticConfig(survivor_commit_s=12.0))) == 12.0
    assert survivor_commit_s(Config(elastic=ElasticConfig(survivor_commit_s=12.0),
                                    checkpoint=CheckpointingConfig(sharded=True))) == 0.0
