"""The step's one decision: ``decide`` turns an agreement into Finish, HandOff, Hold or Continue,
the same on every rank, without a cluster (the policy's signals are injected)."""

from __future__ import annotations

from typing import Collection, Optional, Set

from raytrain_spot.config.schema import Config
from raytrain_spot.loop.agreement import StepAgreement
from raytrain_spot.loop.decision import (MAX_STEPS, PERIODIC, STOP, Continue, Finish, HandOff, HandoffReason, Hold,
                                         SpotPolicy, decide)

NODES = ["node-a", "node-b", "node-c"]


class Silent:
    def leaving_nodes(self, step: int) -> Set[str]:
        return set()

    def extra_capacity(self, step: int):
        return None

    def usable_workers(self, step: int, leaving: Collection[str]) -> Optional[int]:
        return None

    def drain_deadline_s(self, nodes: Collection[str]) -> Optional[float]:
        return None


def policy() -> SpotPolicy:
    return SpotPolicy(Config(), Silent(), NODES[:2], emit=lambda *a, **k: None)


def agreement(leaving=(), holding_for=0, grow_to=0, save_due=False, stop=False):
    return StepAgreement(loss_sum=0.0, leaving_ranks=list(leaving), grow_to=grow_to, save_due=save_due,
                         committed_step=0, step_s=0.1, holding_for=holding_for, stop=stop)


def test_the_run_ends_at_max_steps_before_anything_else_and_at_a_stop_before_a_handoff():
    assert decide(agreement(leaving=[1], stop=True), 10, 10, 2, policy()) == Finish(MAX_STEPS)
    assert decide(agreement(leaving=[1], stop=True), 7, 10, 2, policy()) == Finish(STOP)


def test_a_hold_defers_the_handoff_only_if_rank_0_knew_of_every_leaving_rank():
    assert decide(agreement([0, 1], holding_for=2), 7, 10, 2, policy()) == Hold((0, 1))
    late = decide(agreement([0, 1], holding_for=1), 7, 10, 2, policy())
    assert isinstance(late, HandOff) and late.reason is HandoffReason.PREEMPTION and late.leaving_ranks == (0, 1), \
        "a rank rank 0 had not heard of may have an earlier deadline"


def test_a_notice_wins_over_a_regrow_and_the_writer_is_the_lowest_rank_that_stays():
    handoff = decide(agreement([0], grow_to=3), 7, 10, 2, policy())
    assert (handoff.reason, handoff.writer, handoff.step) == (HandoffReason.PREEMPTION, 1, 7)
    regrow = decide(agreement(grow_to=3), 7, 10, 2, policy())
    assert (regrow.reason, regrow.grow_to, regrow.writer) == (HandoffReason.REGROW, 3, 0)
    assert decide(agreement(grow_to=2), 7, 10, 2, policy()) == Continue(), "no larger size: no regrow"


def test_a_due_checkpoint_rides_on_continue_and_hold():
    assert decide(agreement(save_due=True), 7, 10, 2, policy()) == Continue(PERIODIC)
    assert decide(agreement([1], holding_for=1, save_due=True), 7, 10, 2, policy()).checkpoint == PERIODIC

