"""The notice hold: whether a group trains on after a step although nodes of it have a notice.

Two notices are held, the group training on, always within the drain deadline. One that leaves
nowhere to go (fewer than ``min_workers`` workers fit on nodes without a notice): handing off at
once would only wait for capacity, so the group trains on its noticed nodes and hands off just
before their drain deadline, or as soon as capacity appears elsewhere (``tuning.hold_on_notice``).
And one that leaves somewhere to go while the nodes that stay have no warm standby for each rank
they keep: the group trains on while they start and warm them (elastic/standby.py's
``NoticeStandbys``, ``elastic.notice_standby_wait_s``), since a restart in cold processes waits seconds
for their imports with nobody training.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from raytrain_spot.config.schema import Config
from raytrain_spot.elastic.signals import ClusterSignals, StandbyStarter
from raytrain_spot.observe import records

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoticeHold:
    hold: bool
    reason: str
    usable_workers: Optional[int] = None
    deadline_in_s: Optional[float] = None
    needed_s: Optional[float] = None
    """A step, the checkpoint's commit and the margin: what the handoff needs before the deadline."""


@dataclass(frozen=True)
class StandbyProgress:
    """The standbys a notice warm-up waits for on the nodes that stay."""

    missing: int
    """Standbys not warm yet."""
    elapsed_s: float
    """Since the warm-up began (the notice, as rank 0 heard it)."""
    limit_s: float
    """``elastic.notice_standby_wait_s``."""


def decide_notice_hold(usable_workers: Optional[int], min_workers: int, deadline_in_s: Optional[float],
                       step_s: float, commit_s: Optional[float], margin_s: float,
                       warmup: Optional[StandbyProgress] = None) -> NoticeHold:
    """Whether to train on after this step although nodes of the group have a notice.

    Holding pays when the restarted group would have nowhere to train (``usable_workers`` below
    ``min_workers``): then every step before the deadline is a step the handoff at the notice would
    not train. It pays too while the nodes that stay warm the standbys the restart will start in
    (``warmup``, None where there is none): a restart in cold processes waits for their imports,
    training nothing, and a group training on while they import trains, if slower. Either is safe
    only while one more step and the just-in-time checkpoint's commit still end ``margin_s`` before
    the drain deadline; without a measured commit or a known deadline there is no such guarantee,
    and the group hands off at once.
    """
    if usable_workers is None:
        return NoticeHold(False, "capacity outside the noticed nodes is unknown")
    if usable_workers >= min_workers:
        where = f"{usable_workers} workers fit on nodes without a notice"
        if warmup is None:
            return NoticeHold(False, where, usable_workers)
        if warmup.missing == 0:
            return NoticeHold(False, f"{where}, their standbys warm {warmup.elapsed_s:.1f} s after the notice",
                              usable_workers)
        if warmup.elapsed_s >= warmup.limit_s:
            return NoticeHold(False, f"{where}; {warmup.missing} of their standbys still importing after "
                              f"{warmup.elapsed_s:.1f} s (elastic.notice_standby_wait_s={warmup.limit_s:g})", usable_workers)
        purpose = f"{where}; training on while {warmup.missing} standbys there import the stack"
    else:
        purpose = (f"{usable_workers} workers fit without the noticed nodes (fewer than min_workers={min_workers}): "
                   "training on")
    if deadline_in_s is None:
        return NoticeHold(False, "the noticed nodes have no drain deadline", usable_workers)
    if commit_s is None:
        return NoticeHold(False, "no checkpoint commit measured yet in this run", usable_workers, deadline_in_s)
    needed_s = step_s + commit_s + margin_s
    numbers = dict(usable_workers=usable_workers, deadline_in_s=deadline_in_s, needed_s=needed_s)
    if deadline_in_s <= needed_s:
        return NoticeHold(False, f"the drain deadline is {deadline_in_s:.1f} s away: a step, the commit and the "
                          f"margin take {needed_s:.1f} s", **numbers)
    return NoticeHold(True, f"{purpose}, {deadline_in_s:.1f} s to the drain deadline", **numbers)


class NoticeHoldPolicy:
    """Rank 0's notice holds during a group; each change of decision is logged and emitted.
    ``warmup`` (None: no notice warm-up) warms the nodes that stay, once per group."""

    def __init__(self, cfg: Config, emit: Callable[[records.EventRecord], None],
                 warmup: Optional[StandbyStarter] = None, clock: Callable[[], float] = time.time):
        self._cfg = cfg
        self._emit = emit
        self._warmup = warmup if cfg.elastic.notice_standby_wait_s > 0 else None
        self._clock = clock
        self._last: Optional[bool] = None
        self._warmup_started_at: Optional[float] = None
        self.began = False
        """Whether the last decision began a hold: the loop checkpoints that step, so a node lost without
        notice while the group trains on costs at most the hold's steps."""

    def decide(self, leaving_ranks: Sequence[int], node_ids: Sequence[str], signals: ClusterSignals,
               step: int, step_s: float, commit_s: float) -> Optional[NoticeHold]:
        """Rank 0's hold after ``step``, or None where no rank is known to be leaving or none applies."""
        self.began = False
        if not leaving_ranks:
            return None
        leaving_nodes = {node_ids[rank] for rank in leaving_ranks}
        usable = signals.usable_workers(step, leaving_nodes)
        somewhere_to_go = usable is not None and usable >= self._cfg.trainer.min_workers
        if not somewhere_to_go and not self._cfg.tuning.hold_on_notice:
            return None
        warmup = self._warmup_progress(leaving_ranks, node_ids) if somewhere_to_go else None
        # The deadline is read only when it matters: with somewhere to go and warm standbys the group hands off.
        deadline_s = (signals.drain_deadline_s(leaving_nodes)
                      if usable is not None and (not somewhere_to_go or warmup is not None and warmup.missing) else None)
        decision = decide_notice_hold(usable, self._cfg.trainer.min_workers,
                                      None if deadline_s is None else deadline_s - self._clock(), step_s,
                                      commit_s or None, self._cfg.tuning.hold_margin_s, warmup)
        self.began = decision.hold and not self._last
        if decision.hold != self._last:
            self._last = decision.hold
            logger.info("Notice hold at step %d: %s", step, decision.reason)
            self._emit(records.NoticeHold(step=step, hold=decision.hold, reason=decision.reason,
                                          usable_workers=decision.usable_workers,
                                          deadline_in_s=decision.deadline_in_s, needed_s=decision.needed_s,
                                          standbys_missing=warmup.missing if warmup else None))
        return decision

    def _warmup_progress(self, leaving_ranks: Sequence[int], node_ids: Sequence[str]) -> Optional[StandbyProgress]:
        if self._warmup is None:
            return None
        staying = Counter(node_id for rank, node_id in enumerate(node_ids) if rank not in leaving_ranks)
        if self._warmup_started_at is None:
            self._warmup_started_at = self._clock()
            self._warmup.start(staying)
        return StandbyProgress(self._warmup.missing(staying), self._clock() - self._warmup_started_at,
                              self._cfg.elastic.notice_standby_wait_s)
