"""Handoffs: the group ends at an agreed step with a just-in-time checkpoint, and Ray restarts it.

One mechanism for both reasons to restart a running group: a preemption notice (restart
without the leaving nodes, before they die) and regrow capacity (restart larger). All ranks
agreed on the same ``Handoff`` at the same step (train/agreement.py); the writer commits the
step on every tier, every rank joins the report, then every rank raises ``WorkerGroupHandoff``,
which the Spot failure policy retries without spending the failure budget. No step is redone.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping, NoReturn, Optional, Sequence, Tuple

from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest
from raytrain_spot.checkpoint.state import LoopState, Stateful
from raytrain_spot.observe.events import EventLog
from raytrain_spot.train.agreement import StepAgreement

logger = logging.getLogger(__name__)


class HandoffReason(str, enum.Enum):
    PREEMPTION = "preemption"
    """Some ranks' nodes have a notice: restart without them."""
    REGROW = "regrow"
    """More workers fit than the group has: restart larger."""


@dataclass(frozen=True)
class Handoff:
    reason: HandoffReason
    step: int
    world_size: int
    writer: int
    """The rank that writes the just-in-time checkpoint: the lowest rank that stays."""
    leaving_ranks: Tuple[int, ...] = ()
    grow_to: int = 0


class WorkerGroupHandoff(Exception):
    """Raised by every rank after a just-in-time checkpoint, to have Ray restart the group now."""

    def __init__(self, reason: str, step: int):
        super().__init__(f"handoff at step {step}: {reason}")
        self.reason = reason
        self.step = step

    def __reduce__(self):
        return (WorkerGroupHandoff, (self.reason, self.step))


def handoff_after(agreed: StepAgreement, step: int, world_size: int) -> Optional[Handoff]:
    """The handoff every rank takes after ``step``, if any. A notice wins over a regrow: the group
    must first lose the leaving nodes, and the restarted group is sized from live capacity anyway."""
    if agreed.leaving_ranks:
        survivors = [r for r in range(world_size) if r not in agreed.leaving_ranks]
        return Handoff(HandoffReason.PREEMPTION, step, world_size, writer=survivors[0] if survivors else 0,
                       leaving_ranks=tuple(agreed.leaving_ranks))
    if agreed.grow_to > world_size:
        return Handoff(HandoffReason.REGROW, step, world_size, writer=0, grow_to=agreed.grow_to)
    return None


def hand_off(handoff: Handoff, checkpoints: CheckpointManager, parts: Mapping[str, Stateful], loop: LoopState,
             rank: int, node_ids: Sequence[str], events: EventLog, report: Callable[[int], None],
             drain_deadline_s: Callable[[set], Optional[float]]) -> NoReturn:
    """Checkpoint ``handoff.step`` from the writer, report it, and end this group."""
    leaving_nodes = {node_ids[r] for r in handoff.leaving_ranks}
    deadline_s = None
    if rank == handoff.writer:
        details = (dict(preempted_ranks=list(handoff.leaving_ranks), nodes=sorted(leaving_nodes))
                   if handoff.reason is HandoffReason.PREEMPTION else dict(grow_to=handoff.grow_to))
        events.emit("handoff", reason=handoff.reason.value, step=handoff.step, world_size=handoff.world_size,
                    **details)
        deadline_s = drain_deadline_s(leaving_nodes) if leaving_nodes else None
    checkpoint_and_report(checkpoints, parts, SaveRequest(loop, handoff.world_size, "jit", reason=handoff.reason.value),
                          rank, handoff.writer, report)
    if deadline_s is not None and (late_by_s := time.time() - deadline_s) > 0:
        logger.error("The JIT checkpoint of step %d committed %.1f s after the drain deadline", handoff.step,
                     late_by_s)
        events.emit("jit_late", step=handoff.step, late_by_s=late_by_s, deadline=deadline_s)
    raise WorkerGroupHandoff(handoff.reason.value, handoff.step)


def checkpoint_and_report(checkpoints: CheckpointManager, parts: Mapping[str, Stateful], request: SaveRequest,
                          rank: int, writer: int, report: Callable[[int], None]) -> None:
    """Save this step on every tier now (the group is about to end or restart), then report it."""
    if checkpoints.last_save_step != request.loop.step:
        checkpoints.save(parts, request, writer=rank == writer, wait=True)
    checkpoints.wait()
    report(request.loop.step)
