"""The one decision a worker group takes after each step, typed, with its reason.

After every step each rank contributes what it knows and every rank gets the same
``StepAgreement`` (loop/agreement.py); ``decide`` turns it into one ``Decision`` that the loop
applies, the same on every rank:

* ``Finish``: the run's last step, or the driver asked the run to stop: a final checkpoint, the end.
* ``HandOff``: nodes of the group have a notice (restart without their ranks) or more workers fit
  (restart larger): a just-in-time checkpoint, then Ray restarts the group (loop/handoff.py).
* ``Hold``: nodes have a notice, yet the group trains on for now (preemption/hold.py says why).
* ``Continue``: train on, checkpointing this step or not.

What each rank puts into the agreement and how the agreement becomes a decision is a
``GroupPolicy``'s: the product's ``SpotPolicy`` here; the benchmark's baselines
(bench/baselines.py) implement the same interface.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Collection, List, Optional, Protocol, Sequence, Tuple, Union

from raytrain_spot.checkpoint.state import LoopState
from raytrain_spot.config.schema import Config
from raytrain_spot.elastic.regrow import RegrowPolicy
from raytrain_spot.elastic.signals import ClusterSignals, StandbyStarter
from raytrain_spot.loop.agreement import Proposal, StepAgreement
from raytrain_spot.preemption.hold import NoticeHoldPolicy

PERIODIC = "periodic"
"""A checkpoint taken in the background while training goes on."""
JIT = "jit"
"""A just-in-time checkpoint: committed on every tier and reported before the next step."""


class HandoffReason(str, enum.Enum):
    PREEMPTION = "preemption"
    """Some ranks' nodes have a notice: restart without them."""
    REGROW = "regrow"
    """More workers fit than the group has: restart larger."""


@dataclass(frozen=True)
class Continue:
    """Train on."""

    checkpoint: Optional[str] = None
    """``PERIODIC`` or ``JIT``: checkpoint this step first; None: no checkpoint."""
    reason: str = ""


@dataclass(frozen=True)
class Hold:
    """Nodes of the group have a notice, but the group trains on for now (preemption/hold.py)."""

    leaving_ranks: Tuple[int, ...]
    checkpoint: Optional[str] = None
    """A hold begins with a checkpoint, so a node lost without notice while it lasts costs its steps only."""


@dataclass(frozen=True)
class HandOff:
    """End this group at ``step`` with a just-in-time checkpoint; Ray restarts it."""

    reason: HandoffReason
    step: int
    world_size: int
    writer: int
    """The rank that writes the just-in-time checkpoint: the lowest rank that stays."""
    leaving_ranks: Tuple[int, ...] = ()
    grow_to: int = 0


@dataclass(frozen=True)
class Finish:
    """The run ends at this step, with its final checkpoint."""

    reason: str
    """``max_steps`` or ``stop`` (the driver asked: loop/stop.py)."""


Decision = Union[Continue, Hold, HandOff, Finish]
MAX_STEPS = "max_steps"
STOP = "stop"


class GroupPolicy(Protocol):
    """How a group hears of the cluster and what it does about it, one question per step each."""

    def leaving_ranks(self, step: int) -> List[int]:
        """Every rank: ranks this rank knows to be on nodes with a notice after ``step``."""

    def propose(self, leaving_ranks: Sequence[int], step: int, step_s: float, commit_s: float, loop: LoopState,
                world_size: int) -> Proposal:
        """Rank 0: its part of the agreement (a regrow, a notice hold)."""

    def decide(self, agreed: StepAgreement, step: int, world_size: int) -> Decision:
        """Every rank, from the agreement alone, so every rank decides the same."""


def decide(agreed: StepAgreement, step: int, max_steps: int, world_size: int, policy: GroupPolicy) -> Decision:
    """The decision after ``step``: the run's end first, then the policy's."""
    if step == max_steps:
        return Finish(MAX_STEPS)
    if agreed.stop:
        return Finish(STOP)
    return policy.decide(agreed, step, world_size)


class SpotPolicy:
    """The product's policy: hand off at a notice (held while it pays, preemption/hold.py) and
    grow back when it pays (elastic/regrow.py), from what Ray says of the cluster."""

    def __init__(self, cfg: Config, signals: ClusterSignals, node_ids: Sequence[str], emit: Callable[..., None],
                 warmup: Optional[StandbyStarter] = None):
        self._signals = signals
        self._node_ids = list(node_ids)
        self._regrow = RegrowPolicy(cfg, emit)
        self._holds = NoticeHoldPolicy(cfg, emit, warmup)

    def leaving_ranks(self, step: int) -> List[int]:
        return ranks_on(self._node_ids, self._signals.leaving_nodes(step))

    def propose(self, leaving_ranks: Sequence[int], step: int, step_s: float, commit_s: float, loop: LoopState,
                world_size: int) -> Proposal:
        hold = self._holds.decide(leaving_ranks, self._node_ids, self._signals, step, step_s, commit_s)
        held = hold is not None and hold.hold
        return Proposal(grow_to=self._regrow.grow_to(self._signals.extra_capacity(step), loop, world_size),
                        holding_for=len(leaving_ranks) if held else 0, checkpoint=self._holds.began)

    def decide(self, agreed: StepAgreement, step: int, world_size: int) -> Decision:
        checkpoint = PERIODIC if agreed.save_due else None
        leaving = tuple(agreed.leaving_ranks)
        if leaving and agreed.holding_for == len(leaving):  # rank 0 knew of every leaving rank when it held
            return Hold(leaving, checkpoint)
        if leaving:  # a notice wins over a regrow: the restarted group is sized from live capacity anyway
            survivors = [r for r in range(world_size) if r not in leaving]
            return HandOff(HandoffReason.PREEMPTION, step, world_size, writer=survivors[0] if survivors else 0,
                           leaving_ranks=leaving)
        if agreed.grow_to > world_size:
            return HandOff(HandoffReason.REGROW, step, world_size, writer=0, grow_to=agreed.grow_to)
        return Continue(checkpoint)


def ranks_on(node_ids: Sequence[str], nodes: Collection[str]) -> List[int]:
    return [r for r, node_id in enumerate(node_ids) if node_id in nodes]
