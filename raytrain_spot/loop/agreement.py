"""What every rank must agree on after each step, in the one all-reduce the step makes.

Each rank contributes a ``RankView``; the sum over ranks decodes into one ``StepAgreement``
that every rank acts on at the same step. The sum works because every slot has either one
writer (rank 0's decisions: the policy's proposal, the checkpoint, stop, committed step, and its clock)
or means "any rank says so" (a rank's notice flag, set by whichever ranks know of it; read as
> 0). The loss is the one true sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from raytrain_spot.distributed.collectives import RankGroup

_LOSS, _GROW_TO, _SAVE, _HOLDING_FOR, _STOP, _COMMITTED, _COMMIT_S, _STEP_S, _AT, _LEAVING = range(10)


@dataclass(frozen=True)
class Proposal:
    """Rank 0's part of the agreement from the group's policy (loop/decision.py)."""

    grow_to: int = 0
    """Restart at this larger size after this step (0: no regrow)."""
    holding_for: int = 0
    """Train on for now although this many ranks are leaving (preemption/hold.py's notice hold;
    0: no hold). A count, not a flag: the hold stands only if rank 0 knew of every leaving rank."""
    checkpoint: bool = False
    """Checkpoint this step whatever the cadence says (a notice hold begins with one)."""


@dataclass(frozen=True)
class RankView:
    """One rank's contribution. The decisions are rank 0's: other ranks' values are ignored."""

    loss_sum: float
    """Sum of this rank's per-sample losses this step."""
    leaving_ranks: Sequence[int] = ()
    """Ranks this rank knows to be on a node with a preemption notice."""
    proposal: Proposal = Proposal()
    """Rank 0: the policy's proposal."""
    save_due: bool = False
    """Rank 0: take a checkpoint of this step (the cadence's, or the proposal's)."""
    stop: bool = False
    """Rank 0: the driver asked the run to stop (loop/stop.py): checkpoint this step and end."""
    committed_step: int = 0
    """Rank 0: newest step committed to a shared tier."""
    commit_s: float = 0.0
    """Rank 0: what its checkpoint commits take lately (seconds), for every rank's loop state."""
    step_s: float = 0.0
    """Rank 0: wall time of this step. Every rank counts rank 0's, so every rank's loop state, and
    so every node's copy of a checkpoint, is the same."""
    at: float = 0.0
    """Rank 0: its clock (unix seconds) when it made this view; for the same reason."""


@dataclass(frozen=True)
class StepAgreement:
    """What all ranks act on after the step."""

    loss_sum: float
    """Sum of per-sample losses over the global batch."""
    leaving_ranks: List[int]
    """Ranks on nodes with a notice, as known to any rank: hand off without them."""
    grow_to: int
    save_due: bool
    committed_step: int
    step_s: float
    at: float = 0.0
    holding_for: int = 0
    commit_s: float = 0.0
    stop: bool = False


def start_agreement(view: RankView, group: RankGroup) -> "PendingAgreement":
    """Collective: every rank calls it once per step with its own view; the all-reduce runs while
    the caller goes on (the loop loads its next batch), ``result()`` waits for it."""
    slots = [0.0] * (_LEAVING + group.world_size)
    slots[_LOSS] = view.loss_sum
    for rank in view.leaving_ranks:
        slots[_LEAVING + rank] = 1.0
    if group.rank == 0:
        slots[_GROW_TO] = float(view.proposal.grow_to)
        slots[_SAVE] = float(view.save_due or view.proposal.checkpoint)
        slots[_HOLDING_FOR] = float(view.proposal.holding_for)
        slots[_STOP] = float(view.stop)
        slots[_COMMITTED] = float(view.committed_step)
        slots[_COMMIT_S] = view.commit_s
        slots[_STEP_S] = view.step_s
        slots[_AT] = view.at
    # float64: step numbers stay exact far beyond any run's length.
    summed = torch.tensor(slots, dtype=torch.float64, device=group.device)
    return PendingAgreement(summed, group.start_all_reduce_sum(summed), group.world_size)


class PendingAgreement:
    """A step's agreement whose all-reduce is in flight."""

    def __init__(self, summed: torch.Tensor, work, world_size: int):
        self._summed, self._work, self._world_size = summed, work, world_size

    def result(self) -> StepAgreement:
        self._work.wait()
        summed = self._summed.tolist()
        return StepAgreement(loss_sum=summed[_LOSS],
                             leaving_ranks=[r for r in range(self._world_size) if summed[_LEAVING + r] > 0],
                             grow_to=int(summed[_GROW_TO]), save_due=summed[_SAVE] > 0,
                             committed_step=int(summed[_COMMITTED]), step_s=summed[_STEP_S], at=summed[_AT],
                             holding_for=int(summed[_HOLDING_FOR]), commit_s=summed[_COMMIT_S],
                             stop=summed[_STOP] > 0)


def agree(view: RankView, group: RankGroup) -> StepAgreement:
    """Collective: ``start_agreement`` and wait for it."""
    return start_agreement(view, group).result()
