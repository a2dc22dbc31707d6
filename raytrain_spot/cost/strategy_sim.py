"""A discrete-event simulation of one job on one cluster shape under a preemption process.

- Elastic data parallelism with a constant global batch: a group of g of the G nodes makes
  progress at g/G of full speed.
- Every ``interval`` seconds of training the loop stalls ``checkpoint_s`` to save.
- A lost group member throws away the progress since the last completed checkpoint, unless the
  just-in-time checkpoint on its notice commits before the drain deadline; either way the group
  then re-forms for a recovery + ``restore_s``; a loss during that time starts it again.
- A returning node joins by a regrow: a checkpoint, then a restart (no work is lost).
- Below ``min_nodes`` the job waits for capacity. Spot nodes are billed while alive, on-demand
  nodes for the whole run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

from raytrain_spot.cost.pricing import PriceCatalog
from raytrain_spot.cost.spot_capacity import CapacityProcess, ExponentialLosses, Preemptions, TraceReplay
from raytrain_spot.cost.strategy_model import HOUR, ClusterShape, Job, jit_complete_fraction

TRAIN, SAVE, RECOVER, WAIT = "train", "save", "recover", "wait"


@dataclass
class RunOutcome:
    """One simulated run."""

    wall_s: float
    """Time from launch to the last step (or to the horizon when ``finished`` is False)."""
    spot_node_s: float
    """Spot node-seconds billed."""
    preemptions: int
    """Spot nodes lost."""
    finished: bool
    """False when the run hit the simulation horizon first."""
    group_losses: int = 0
    """Losses of a training group member (a loss while the group re-forms or waits loses no work)."""
    jit_saves: int = 0
    """Of those, the ones whose just-in-time checkpoint committed before the drain deadline."""


@dataclass
class _Run:
    job: Job
    shape: ClusterShape
    interval_s: float
    t: float = 0.0
    progress: float = 0.0
    saved: float = 0.0
    since_save: float = 0.0
    alive: int = 0
    group_spot: int = 0
    phase: str = WAIT
    phase_end: float = math.inf
    regrow_after_save: bool = False
    spot_node_s: float = 0.0
    preemptions: int = 0
    group_losses: int = 0
    jit_saves: int = 0
    recovering_s: float = 0.0

    def rate(self) -> float:
        return (self.shape.on_demand_nodes + self.group_spot) / self.shape.nodes

    def advance(self, to: float) -> None:
        elapsed = to - self.t
        if self.phase == TRAIN:
            self.progress += elapsed * self.rate()
            self.since_save += elapsed
        self.spot_node_s += self.alive * elapsed
        self.t = to

    def next_internal(self) -> Tuple[float, str]:
        if self.phase == TRAIN:
            done_at = self.t + (self.job.work_s - self.progress) / self.rate()
            save_at = self.t + max(0.0, self.interval_s - self.since_save)
            return (done_at, "done") if done_at <= save_at else (save_at, "save")
        return self.phase_end, "phase_end"

    def restart(self, recovery_s: float, extra_s: float = 0.0) -> None:
        self.phase, self.group_spot, self.regrow_after_save = RECOVER, 0, False
        self.recovering_s = recovery_s
        self.phase_end = self.t + extra_s + recovery_s + self.job.restore_s

    def can_train(self) -> bool:
        return self.shape.on_demand_nodes + self.alive >= self.job.min_nodes

    def end_phase(self) -> None:
        if self.phase == SAVE:
            self.saved, self.since_save = self.progress, 0.0
            if self.regrow_after_save:
                self.restart(self.job.recovery_s)
            else:
                self.phase, self.phase_end = TRAIN, math.inf
        elif self.phase == RECOVER:
            if self.can_train():
                self.phase, self.phase_end, self.group_spot, self.since_save = TRAIN, math.inf, self.alive, 0.0
            else:
                self.phase, self.phase_end = WAIT, math.inf

    def start_save(self, regrow: bool) -> None:
        self.phase, self.phase_end = SAVE, self.t + self.job.checkpoint_s
        self.regrow_after_save = regrow

    def lose_node(self, rng: random.Random) -> None:
        in_group = self.phase in (TRAIN, SAVE) and rng.random() < self.group_spot / self.alive
        self.alive -= 1
        self.preemptions += 1
        if in_group:
            self.group_losses += 1
            covered = jit_complete_fraction(self.job, self.rate())
            if covered >= 1.0 or (covered > 0.0 and rng.random() < covered):
                self.jit_saves += 1  # the group hands off at the notice on a committed checkpoint
                self.saved = self.progress
                self.restart(self.job.recovery_s, extra_s=self.job.jit_save_s)
            else:
                # Back to the last checkpoint; a save tried on the notice held the group until the node died.
                self.progress = self.saved
                self.restart(self.job.kill_restart_s, extra_s=self.job.notice_s if self.job.jit_checkpoint else 0.0)
        elif self.phase == RECOVER:
            self.restart(self.recovering_s)  # the group being formed lost a member
        else:
            self.group_spot = min(self.group_spot, self.alive)
            if self.phase == SAVE:
                self.regrow_after_save = self.alive > self.group_spot  # the newcomer may be the one lost

    def gain_node(self) -> None:
        self.alive += 1
        if self.phase == TRAIN:
            if self.job.regrow_by_handoff:
                self.start_save(regrow=True)
            else:  # Ray Train's own regrow: restart the group from its last checkpoint
                self.progress = self.saved
                self.restart(self.job.recovery_s)
        elif self.phase == SAVE:
            self.regrow_after_save = True
        elif self.phase == WAIT and self.can_train():
            self.restart(self.job.recovery_s)


def simulate_run(job: Job, shape: ClusterShape, interval_s: float, capacity: CapacityProcess, rng: random.Random,
                 horizon_s: float) -> RunOutcome:
    """One run of ``job`` on ``shape`` until its last step, or until ``horizon_s``."""
    run = _Run(job, shape, interval_s, alive=capacity.initial_alive(shape.spot_nodes))
    run.phase = RECOVER
    run.end_phase()
    while run.t < horizon_s:
        internal_at, what = run.next_internal()
        change = capacity.next_change(run.t, run.alive) if shape.spot_nodes else None
        if change is not None and change.t < internal_at:
            run.advance(min(change.t, horizon_s))
            if run.t >= horizon_s:
                break
            capacity.apply(change)
            for _ in range(abs(change.nodes)):
                if change.nodes < 0:
                    run.lose_node(rng)
                else:
                    run.gain_node()
            continue
        run.advance(min(internal_at, horizon_s))
        if run.t >= horizon_s:
            break
        if what == "done":
            return RunOutcome(run.t, run.spot_node_s, run.preemptions, True, run.group_losses, run.jit_saves)
        if what == "save":
            run.start_save(regrow=False)
        else:
            run.end_phase()
    return RunOutcome(run.t, run.spot_node_s, run.preemptions, False, run.group_losses, run.jit_saves)


def simulate_shape(job: Job, shape: ClusterShape, interval_s: float, preemptions: Preemptions,
                   replications: int, seed: int = 0, index: int = 0, horizon_s: Optional[float] = None,
                   catalog: Optional[PriceCatalog] = None) -> List[RunOutcome]:
    """``replications`` runs of one shape (one when it has no Spot nodes); a trace is started at evenly
    spaced offsets, and the Spot nodes follow different streams of it in each run."""
    horizon_s = horizon_s if horizon_s is not None else 20.0 * job.work_s
    mtbi = None
    if preemptions.trace is None:
        mtbi = preemptions.mtbi_s or catalog.mtbi_hours(shape.accelerator) * HOUR
    outcomes = []
    runs = replications if shape.spot_nodes else 1
    for replication in range(runs):
        rng = random.Random(f"{seed}/{index}/{replication}")
        if preemptions.trace is None:
            capacity: CapacityProcess = ExponentialLosses(mtbi, preemptions.replacement_s, rng)
        else:
            counts, tick_s = preemptions.trace
            capacity = TraceReplay(counts, tick_s, shape.spot_nodes, offset_s=len(counts) * tick_s * replication / runs,
                                   rng=random.Random(f"{seed}/{index}/{replication}/streams"),
                                   fleet=preemptions.trace_fleet)
        outcomes.append(simulate_run(job, shape, interval_s, capacity, rng, horizon_s))
    return outcomes
