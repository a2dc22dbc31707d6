"""When a regrow pays: a decision from this run's own measurements, not a fixed settle time.

A regrow restarts the group (``restart_s`` of no training, measured at this run's handoffs)
to train faster (``rate(target) - rate(now)`` samples/s, measured per world size in this run).
If the new capacity is preempted before the run ends, its notice costs a second restart. So
the regrow costs

    C = restart_s * rate(now) + P(the capacity dies before the run ends) * restart_s * rate(target)

samples, and gains ``gain = rate(target) - rate(now)`` samples per second the capacity lives.
It pays once the capacity lives ``break_even_s = C / gain`` seconds. Its lifetime is unknown:
this is ski rental. Waiting until the capacity has been up for ``break_even_s`` and only then
regrowing never costs more than twice what the best choice in hindsight costs, whatever the
lifetime (had it died earlier, not regrowing was right and waiting cost less than C; had it
lived, waiting cost C on top of the C the best choice paid). When this run's node lifetimes
(the checkpoint advisor's posterior, with its prior) say the capacity outlives
``LONG_LIFE_FACTOR * break_even_s`` on average, waiting is the larger loss, and the regrow
comes after ``settle_s`` alone: its expected regret is then under ``1 - exp(-1/LONG_LIFE_FACTOR)``
(22%) of one restart. A regrow that cannot pay before the run ends never happens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from raytrain_spot.checkpoint.advisor import job_mtbi_s
from raytrain_spot.checkpoint.state import LoopState
from raytrain_spot.config.schema import Config
from raytrain_spot.elastic.signals import ExtraCapacity
from raytrain_spot.observe import records

logger = logging.getLogger(__name__)

LONG_LIFE_FACTOR = 4.0
"""Expected lifetime over break-even above which the regrow does not wait for the break-even."""
SIGNIFICANT_GAIN = 0.05
"""A measured gain smaller than this share of the current rate is not one: step times on shared
or busy hosts vary by more than that, and a rule asked every step would otherwise act on noise."""


@dataclass(frozen=True)
class RegrowEvidence:
    """What the rule knows at one moment, all of it measured in this run (or a stated prior)."""

    world_size: int
    target: int
    """Workers that fit on alive, non-draining nodes now."""
    rates: Dict[int, float]
    """Samples/s this run achieved at each world size (at least the current one)."""
    restart_s: float
    """Seconds a group restart costs (this run's handoffs, or the prior)."""
    node_life_s: float
    """Expected lifetime of a Spot node (this run's interruptions, with the prior)."""
    remaining_s: float
    """Seconds of training left at the current rate."""
    capacity_age_s: float
    """How long the extra capacity has been there."""
    settle_s: float
    """Minimum age, so that a node that joins and vanishes at once costs nothing."""


@dataclass(frozen=True)
class RegrowDecision:
    grow: bool
    kind: str
    """Which rule decided (``no_room``, ``no_gain``, ``run_ends``, ``waiting``, ``regrow``): the policy
    reports a hold again only when this changes, not each time its numbers move."""
    reason: str
    gain: float = 0.0
    """Samples/s more at the target size."""
    cost: float = 0.0
    """Samples the regrow is expected to cost (its restart, and the shrink when the capacity goes)."""
    break_even_s: float = math.inf
    wait_s: float = math.inf
    """Age the capacity must reach before the regrow."""
    target_rate: float = 0.0
    target_rate_measured: bool = False

    def explain(self) -> str:
        measured = "measured" if self.target_rate_measured else "extrapolated from the current size"
        return (f"{'regrow' if self.grow else 'hold'}: {self.reason} (gain {self.gain:.1f} samples/s, target rate "
                f"{self.target_rate:.1f} {measured}; cost {self.cost:.0f} samples; break-even "
                f"{self.break_even_s:.1f} s; wait {self.wait_s:.1f} s)")


def target_rate(rates: Dict[int, float], world_size: int, target: int) -> tuple[float, bool]:
    """(samples/s at ``target``, whether it was measured): measured if this run trained at that size,
    else scaled from the nearest measured size below it, linearly (DDP at best: an optimistic guess
    that the first regrow then measures)."""
    if target in rates:
        return rates[target], True
    below = max((size for size in rates if size < target), default=world_size)
    return rates[below] * target / below, False


def decide_regrow(evidence: RegrowEvidence) -> RegrowDecision:
    e = evidence
    if e.target <= e.world_size:
        return RegrowDecision(False, "no_room", f"no more workers fit ({e.target} for a group of {e.world_size})")
    now_rate = e.rates[e.world_size]
    rate, measured = target_rate(e.rates, e.world_size, e.target)
    gain = rate - now_rate
    if gain < SIGNIFICANT_GAIN * now_rate:
        return RegrowDecision(False, "no_gain", f"{e.target} workers trained no faster than {e.world_size} in this "
                              f"run ({gain / now_rate:+.0%}, under the {SIGNIFICANT_GAIN:.0%} a gain must show)",
                              gain, target_rate=rate, target_rate_measured=measured)
    shrink_probability = 1.0 - math.exp(-e.remaining_s / max(e.node_life_s, 1e-9))
    cost = e.restart_s * now_rate + shrink_probability * e.restart_s * rate
    break_even_s = cost / gain
    numbers = dict(gain=gain, cost=cost, break_even_s=break_even_s, target_rate=rate, target_rate_measured=measured)
    if e.remaining_s - e.restart_s < break_even_s:
        return RegrowDecision(False, "run_ends", f"the run ends in {e.remaining_s:.0f} s, before a regrow pays",
                              wait_s=math.inf, **numbers)
    long_lived = e.node_life_s >= LONG_LIFE_FACTOR * break_even_s
    wait_s = e.settle_s if long_lived else max(break_even_s, e.settle_s)
    why = (f"nodes live {e.node_life_s:.0f} s on average, over {LONG_LIFE_FACTOR:g}x the break-even"
           if long_lived else f"node lifetime {e.node_life_s:.0f} s is uncertain against the break-even: ski rental")
    if e.capacity_age_s < wait_s:
        return RegrowDecision(False, "waiting", f"waiting: capacity up {e.capacity_age_s:.1f} s; {why}", wait_s=wait_s,
                              **numbers)
    return RegrowDecision(True, "regrow", f"capacity up {e.capacity_age_s:.1f} s; {why}", wait_s=wait_s, **numbers)


class RegrowPolicy:
    """Rank 0's regrow decisions during a group, from the loop state's measurements; each new
    decision (a regrow, or a hold by another rule than the last) is logged and emitted."""

    def __init__(self, cfg: Config, emit: Callable[[records.EventRecord], None]):
        self._cfg = cfg
        self._emit = emit
        self._last_kind: Optional[str] = None

    def grow_to(self, extra: Optional[ExtraCapacity], loop: LoopState, world_size: int) -> int:
        """The size to regrow to after this step, or 0."""
        if extra is None:
            self._last_kind = None
            return 0
        if self._cfg.elastic.regrow == "after_settle":
            return extra.workers if extra.age_s >= self._cfg.tuning.regrow_settle_s else 0
        if world_size not in loop.samples_per_s:
            return 0  # this size's rate is not measured yet (the group's first steps)
        rate = loop.samples_per_s[world_size]
        decision = decide_regrow(RegrowEvidence(
            world_size, extra.workers, loop.samples_per_s,
            restart_s=loop.restart_s if loop.restarts_measured else self._cfg.tuning.restart_prior_s,
            node_life_s=job_mtbi_s(self._cfg.checkpoint.mtbi_prior_s, world_size, loop.interruptions,
                                   loop.train_time_s) * world_size,
            remaining_s=(self._cfg.trainer.max_steps - loop.step) * self._cfg.trainer.global_batch_size / rate,
            capacity_age_s=extra.age_s, settle_s=self._cfg.tuning.regrow_settle_s))
        if decision.grow or decision.kind != self._last_kind:
            self._last_kind = decision.kind
            logger.info("Regrow rule at step %d: %s", loop.step, decision.explain())
            self._emit(records.RegrowDecision(step=loop.step, world_size=world_size, target=extra.workers,
                                              grow=decision.grow, reason=decision.reason, gain=decision.gain,
                                              cost=decision.cost, break_even_s=decision.break_even_s,
                                              wait_s=decision.wait_s))
        return extra.workers if decision.grow else 0


def measured_rate(rates: Dict[int, float], measured_s: Dict[int, float], world_size: int, samples: int,
                  seconds: float) -> tuple[Dict[int, float], Dict[int, float]]:
    """``rates`` and the step seconds behind them with one more step at ``world_size``: each rate is
    the samples over the seconds of every measured step at its size, so one unusually slow or fast
    step moves it by its share of the time only."""
    before_s = measured_s.get(world_size, 0.0)
    total_s = before_s + seconds
    rate = (rates.get(world_size, 0.0) * before_s + samples) / total_s
    return {**rates, world_size: rate}, {**measured_s, world_size: total_s}
