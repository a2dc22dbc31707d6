"""How often to checkpoint: Young/Daly from measured costs and the observed interruption rate.

Young (1974): the interval between checkpoints that minimizes expected lost time is
``tau = sqrt(2 * C * M)`` for checkpoint cost C and mean time between interruptions M.
Daly (2006) adds higher-order terms for when C is not small against M::

    tau = sqrt(2CM) * (1 + sqrt(C / 2M) / 3 + (C / 2M) / 9) - C    (C < 2M), else tau = M

C is what a checkpoint costs training: the measured stall (the async snapshot), not the
background write. The write bounds the interval from below instead: a save cannot start
before the previous one has committed. M is the job's: any node's loss interrupts it, so a
per-node prior is divided by the world size, then updated with what the run observed
(a Gamma prior on the interruption rate worth ``prior_weight`` interruptions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


def young_interval(checkpoint_s: float, mtbi_s: float) -> float:
    """Young (1974): the compute time between checkpoints that minimises expected waste, sqrt(2 C M)."""
    return math.sqrt(2.0 * checkpoint_s * mtbi_s)


def daly_interval(checkpoint_s: float, mtbi_s: float) -> float:
    """Daly (2006) higher-order estimate; it matters once C is not small against M, and caps at M."""
    if checkpoint_s >= 2.0 * mtbi_s:
        return mtbi_s
    ratio = checkpoint_s / (2.0 * mtbi_s)
    return young_interval(checkpoint_s, mtbi_s) * (1.0 + math.sqrt(ratio) / 3.0 + ratio / 9.0) - checkpoint_s


def job_mtbi_s(node_mtbi_prior_s: float, world_size: int, interruptions: int, observed_s: float,
               prior_weight: float = 1.0) -> float:
    """Posterior mean time between interruptions of the whole job."""
    prior_mtbi = node_mtbi_prior_s / max(world_size, 1)
    return (prior_weight * prior_mtbi + observed_s) / (prior_weight + interruptions)


@dataclass(frozen=True)
class IntervalDecision:
    interval_steps: int
    interval_s: float
    young_daly_s: float
    stall_s: float
    commit_s: float
    mtbi_s: float
    interruptions: int
    observed_s: float
    step_time_s: float

    def explain(self) -> str:
        return (f"checkpoint every {self.interval_steps} steps ({self.interval_s:.1f} s): Young/Daly "
                f"{self.young_daly_s:.1f} s from stall C={self.stall_s * 1000:.1f} ms and job MTBI M={self.mtbi_s:.0f} s "
                f"({self.interruptions} interruptions in {self.observed_s:.0f} s observed), floor = commit "
                f"{self.commit_s:.2f} s, step {self.step_time_s * 1000:.0f} ms")


@dataclass(frozen=True)
class IntervalAdvisor:
    node_mtbi_prior_s: float
    min_interval_s: float
    max_interval_s: float
    prior_weight: float = 1.0

    def decide(self, stall_s: float, commit_s: float, interruptions: int, observed_s: float, world_size: int,
               step_time_s: float) -> IntervalDecision:
        mtbi = job_mtbi_s(self.node_mtbi_prior_s, world_size, interruptions, observed_s, self.prior_weight)
        young_daly = daly_interval(stall_s, mtbi)
        interval = min(max(young_daly, commit_s, self.min_interval_s), self.max_interval_s)
        steps = max(1, round(interval / max(step_time_s, 1e-6)))
        return IntervalDecision(steps, interval, young_daly, stall_s, commit_s, mtbi, interruptions, observed_s,
                                step_time_s)


class CheckpointCadence:
    """The periodic checkpoint interval in steps: the configured one, or else the advisor's.

    The advisor re-decides on every step from the last few checkpoints' costs; a decision is
    adopted (and returned, to be logged) only when it moves the interval by more than
    ``ADOPT_CHANGE``, so noise in the measured stall does not reschedule saves every step.
    """

    ADOPT_CHANGE = 0.2
    RECENT = 5  # checkpoints whose costs are averaged

    def __init__(self, configured_steps: Optional[int], advisor: IntervalAdvisor):
        self.interval_steps = configured_steps
        self._advisor = advisor if configured_steps is None else None
        self._adopted: Optional[IntervalDecision] = None

    def update(self, stall_s: Sequence[float], commit_s: Sequence[float], interruptions: int, observed_s: float,
               world_size: int, steps: int) -> Optional[IntervalDecision]:
        """Re-decide from the run so far; return the decision when it is adopted."""
        if self._advisor is None or not stall_s:
            return None
        recent_stall = stall_s[-self.RECENT:]
        decision = self._advisor.decide(stall_s=sum(recent_stall) / len(recent_stall),
                                        commit_s=max(commit_s[-self.RECENT:], default=0.0),
                                        interruptions=interruptions, observed_s=observed_s, world_size=world_size,
                                        step_time_s=observed_s / max(steps, 1))
        if self._adopted is not None and \
                abs(decision.interval_steps - self._adopted.interval_steps) <= self.ADOPT_CHANGE * self._adopted.interval_steps:
            return None
        self._adopted, self.interval_steps = decision, decision.interval_steps
        return decision
