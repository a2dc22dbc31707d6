"""The controller's wait for the survivors' commits after a lost worker (elastic/survivors.py), on a
fake clock; the real marks in the GCS are driven end to end by tests/test_chaos_e2e.py."""

from __future__ import annotations

from typing import Dict, List

from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.config import FailureConfig
from ray.train.v2.api.exceptions import WorkerGroupError

from raytrain_spot.elastic.policy import SpotFailurePolicy
from raytrain_spot.elastic.survivors import FIRST_MARK_S, SurvivorWait
from raytrain_spot.loop.handoff import WorkerGroupHandoff


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
        return dict(max((entry for entry in self._script if entry[0] <= self._clock.now), key=lambda e: e[0])[1])

    def clear(self) -> None:
        self.cleared_at = self._clock.now


def waited(marks: ScriptedMarks, clock: Clock, deadline_s: float = 30.0):
    return SurvivorWait(marks, deadline_s, clock=clock, sleep=clock.sleep).wait()


def test_the_wait_ends_when_every_survivor_that_began_has_committed():
    clock = Clock()
    marks = ScriptedMarks(clock).at(0.6, {1: "committing"}).at(0.7, {1: "committing", 2: "committing"}) \
        .at(4.0, {1: "committed:41", 2: "committing"}).at(5.5, {1: "committed:41", 2: "committed:42"})
    outcome = waited(marks, clock)
    assert 5.5 <= outcome.waited_s < 5.7 and outcome.committed_steps == [41, 42]
    assert marks.cleared_at == clock.now, "the next group's failure must not read these marks"


def test_no_survivor_beginning_costs_the_first_mark_wait_only():
    clock = Clock()
    outcome = waited(ScriptedMarks(clock), clock)
    assert FIRST_MARK_S <= outcome.waited_s < FIRST_MARK_S + 0.2
    assert outcome.committed_steps == [] and "no survivor began" in outcome.reason


def test_a_commit_that_outlasts_the_deadline_is_given_up():
    clock = Clock()
    outcome = waited(ScriptedMarks(clock).at(0.5, {0: "committing"}), clock, deadline_s=12.0)
    assert 12.0 <= outcome.waited_s < 12.2 and "deadline" in outcome.reason
    assert outcome.marks == {0: "committing"} and outcome.committed_steps == []


def test_a_failed_survivor_ends_the_wait_with_nothing_committed():
    clock = Clock()
    outcome = waited(ScriptedMarks(clock).at(0.5, {0: "committing"}).at(1.5, {0: "failed"}), clock)
    assert outcome.waited_s < 1.7 and outcome.committed_steps == []


class CountingWait:
    def __init__(self):
        self.calls = 0

    def wait(self):
        self.calls += 1


def test_the_failure_policy_waits_for_survivors_only_when_a_worker_was_lost():
    wait = CountingWait()
    policy = SpotFailurePolicy(FailureConfig(max_failures=-1), survivors=wait)
    lost = WorkerGroupError("x", worker_failures={2: WorkerHealthCheckFailedError("node died", failure=None)})
    assert policy.make_decision(lost) == FailureDecision.RETRY and wait.calls == 1
    policy.make_decision(WorkerGroupError("x", worker_failures={0: RuntimeError("boom")}))
    policy.make_decision(WorkerGroupError("x", worker_failures={0: WorkerGroupHandoff("preemption", 3)}))
    assert wait.calls == 1, "a bug or a handoff has no survivors to wait for"
