"""Handoffs: the group ends at an agreed step with a just-in-time checkpoint, and Ray restarts it.

One mechanism for both reasons to restart a running group (loop/decision.py's ``HandOff``): a
preemption notice (restart without the leaving nodes, before they die) and regrow capacity (restart
larger). Every rank decided the same handoff at the same step; the writer commits the step on
every tier, every rank joins the report, then every rank raises ``WorkerGroupHandoff``, which the
Spot failure policy (elastic/policy.py) retries without spending the failure budget. No step is redone.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping, NoReturn, Optional, Sequence

from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest
from raytrain_spot.checkpoint.state import LoopState, Stateful
from raytrain_spot.elastic.policy import WorkerGroupHandoff
from raytrain_spot.loop.decision import HandOff, HandoffReason
from raytrain_spot.observe.events import EventLog
from raytrain_spot.observe.records import Handoff, JitLate

logger = logging.getLogger(__name__)


def hand_off(handoff: HandOff, checkpoints: CheckpointManager, parts: Mapping[str, Stateful], loop: LoopState,
             rank: int, node_ids: Sequence[str], events: EventLog, report: Callable[[int], None],
             drain_deadline_s: Callable[[set], Optional[float]]) -> NoReturn:
    """Checkpoint ``handoff.step`` from the writer, report it, and end this group."""
    leaving_nodes = {node_ids[r] for r in handoff.leaving_ranks}
    deadline_s = None
    if rank == handoff.writer:
        details = (dict(preempted_ranks=list(handoff.leaving_ranks), nodes=sorted(leaving_nodes))
                   if handoff.reason is HandoffReason.PREEMPTION else dict(grow_to=handoff.grow_to))
        events.emit(Handoff(reason=handoff.reason.value, step=handoff.step, world_size=handoff.world_size,
                            **details))
        deadline_s = drain_deadline_s(leaving_nodes) if leaving_nodes else None
    # Nodes that stay keep the step in memory-speed copies of their own, which the next group restores
    # and copies on to the shared tiers: the handoff waits for those alone, however large the state.
    staying = set(node_ids) - leaving_nodes
    shared = not (staying and checkpoints.keeps_node_copies)
    if shared or node_ids[rank] in staying:
        checkpoint_and_report(checkpoints, parts, SaveRequest(loop, handoff.world_size, "jit",
                                                              reason=handoff.reason.value, shared=shared),
                              rank, handoff.writer, report)
    else:  # a copy on a node about to die, or a save it has in flight, would only slow the copies that stay
        checkpoints.cancel()
        report(handoff.step)
    if deadline_s is not None and (late_by_s := time.time() - deadline_s) > 0:
        logger.error("The JIT checkpoint of step %d committed %.1f s after the drain deadline", handoff.step,
                     late_by_s)
        events.emit(JitLate(step=handoff.step, late_by_s=late_by_s, deadline=deadline_s))
    # Held by the staying nodes' copies alone until the next group copies it on: the controller copies it on
    # itself where one node holds it or that group waits for capacity (elastic/stranded.py).
    raise WorkerGroupHandoff(handoff.reason.value, handoff.step, () if shared else tuple(sorted(staying)))


def checkpoint_and_report(checkpoints: CheckpointManager, parts: Mapping[str, Stateful], request: SaveRequest,
                          rank: int, writer: int, report: Callable[[int], None]) -> None:
    """Save this step on every tier now (the group is about to end or restart), then report it."""
    if checkpoints.last_save_step != request.loop.step:
        checkpoints.save(parts, request, writer=rank == writer, wait=True)
    checkpoints.wait()
    report(request.loop.step)
