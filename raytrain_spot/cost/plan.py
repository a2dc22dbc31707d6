"""Plan a Spot training job before paying for it: ``python -m raytrain_spot.cost.plan --help``.

A discrete-event simulation of one job (steps, step time, checkpoint, restore and recovery
costs) under a preemption process - exponential lifetimes per Spot VM (MTBI by GPU type from
the price catalog) or a capacity trace replayed from ``shared/traces`` - for all-on-demand,
all-Spot and hybrid (k on-demand + n Spot) clusters in candidate regions. It prints expected
wall time, goodput, cost and cost per step per configuration, and recommends the cheapest one
that meets the deadline, with its checkpoint interval (Young/Daly).

The model (``docs/goodput-and-cost.md`` has the details):

- Elastic data parallelism with a constant global batch: a group of g of the G nodes makes
  progress at g/G of full speed.
- Every ``interval`` seconds of training the loop stalls ``checkpoint_s`` to save.
- A lost group member throws away the progress since the last completed checkpoint, unless the
  just-in-time checkpoint on its notice commits before the drain deadline; either way the group
  then re-forms for a recovery + ``restore_s``; a loss during that time starts it again.
- A returning node joins by a regrow: a checkpoint, then a restart (no work is lost).
- Below ``min_nodes`` the job waits for capacity. Spot nodes are billed while alive, on-demand
  nodes for the whole run.

The defaults describe raytrain-spot (notice-time checkpoints, its checkpoint advisor, elastic down
to one node, its measured restart); ``plain_ray_train`` gives the row beside it: Ray Train 2.60
without notice handling, periodic checkpoints only, its measured restart. ``--from-run RUN_DIR``
takes the job's figures from a run's ``ledger.json`` and ``events.jsonl`` instead.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import statistics
import sys
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Deque, Dict, List, Optional, Protocol, Sequence, Tuple

from raytrain_spot.checkpoint.advisor import daly_interval, young_interval
from raytrain_spot.cost.pricing import PriceCatalog, PriceNotFound

HOUR = 3600.0
PRODUCT, PLAIN = "raytrain-spot", "plain-ray-train"

# What raytrain-spot does and what was measured for it (docs/benchmarks.md); the CLI's defaults.
PRODUCT_CHECKPOINT_S = 1.0
"""Stall of an async snapshot (measured 0.19 s for 1 GB on 2 CPU cores; 0.08 s for 4 GiB on an H100 host)."""
PRODUCT_JIT_S = 10.0
"""Notice to a committed just-in-time checkpoint on the head tier, from a step boundary (assumed:
under 1 s to see the notice, then the snapshot and its write to the head; 6.4 s for 1 GB measured)."""
PRODUCT_RECOVERY_S = 6.0
"""Handoff at the notice to training at the new size, less the restore: median 6.1 s measured."""
PRODUCT_KILL_RECOVERY_S = 15.0
"""A loss without a usable notice: 4 s failure settle + ~3 s dead-node detection + a restart (estimate)."""
PRODUCT_INTERVAL_BOUNDS_S = (10.0, 1800.0)
"""The checkpoint advisor clamps Young/Daly into checkpoint.min_interval_s..max_interval_s."""
GCE_NOTICE_S = 30.0
DRAIN_MARGIN_S = 5.0
"""The watcher drains the node this long before the hard stop (``--margin-s``)."""
PLAIN_RECOVERY_S = 76.0
"""Plain elastic Ray Train 2.60, kill to training again: median 75.6 s in the GCE-like benchmark
(it retries the old size, then waits out RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S); 27-47 s elsewhere."""
PLAIN_REGROW_S = 32.0
"""Plain Ray Train's regrow, a full restart (20-44 s measured)."""


# What is simulated --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """The training job, measured at full cluster size."""

    steps: int
    """Optimizer steps to finish."""
    step_time_s: float
    """Wall time of one step on the full cluster."""
    checkpoint_s: float = 0.0
    """Time the training loop stalls per checkpoint (C)."""
    restore_s: float = 0.0
    """Time to load the checkpoint into a re-formed group."""
    recovery_s: float = 0.0
    """A planned restart (a handoff at a notice, a regrow): to a re-formed group, excluding the restore."""
    notice_s: float = GCE_NOTICE_S
    """Warning before a Spot VM stops (GCE: 30 s; 120 s with ``scheduling.preemptionNoticeDuration``)."""
    jit_checkpoint: bool = False
    """Save on the notice: no progress is lost when the save commits before the drain deadline."""
    min_nodes: int = 1
    """Fewest nodes the job trains on; below it, it waits for capacity."""
    jit_s: Optional[float] = None
    """Notice to a committed just-in-time checkpoint when the loop is at a step boundary (seeing the
    notice, the snapshot, the write); None: ``checkpoint_s``."""
    margin_s: float = DRAIN_MARGIN_S
    """The drain deadline comes this long before the hard stop; the save must commit by then."""
    kill_recovery_s: Optional[float] = None
    """A restart after a loss without a usable notice (no notice handling, or the save did not make
    it): to a re-formed group, excluding the restore; None: ``recovery_s``."""
    regrow_by_handoff: bool = True
    """A returning node joins after a checkpoint (raytrain-spot); False: the group is restarted from
    the last periodic checkpoint, as Ray Train's own elastic policy does."""
    interval_bounds_s: Optional[Tuple[float, float]] = None
    """The checkpoint advisor's clamp on Young/Daly (raytrain-spot: 10-1800 s); None: the planner's
    optimum (Daly on the losses that lose work)."""

    def __post_init__(self):
        if self.steps <= 0 or self.step_time_s <= 0:
            raise ValueError("steps and step_time_s must be > 0")
        if min(self.checkpoint_s, self.restore_s, self.recovery_s, self.notice_s, self.margin_s,
               self.jit_save_s, self.kill_restart_s) < 0:
            raise ValueError("checkpoint_s, restore_s, recovery_s, notice_s, margin_s, jit_s and kill_recovery_s "
                             "must be >= 0")
        if self.min_nodes < 1:
            raise ValueError("min_nodes must be >= 1")

    @property
    def work_s(self) -> float:
        return self.steps * self.step_time_s

    @property
    def jit_save_s(self) -> float:
        return self.checkpoint_s if self.jit_s is None else self.jit_s

    @property
    def kill_restart_s(self) -> float:
        return self.recovery_s if self.kill_recovery_s is None else self.kill_recovery_s


def plain_ray_train(job: Job, recovery_s: float = PLAIN_RECOVERY_S, regrow_s: float = PLAIN_REGROW_S,
                    checkpoint_s: Optional[float] = None) -> Job:
    """The same job on plain Ray Train 2.60: no notice handling (a loss is a kill), periodic checkpoints
    at the planner's Daly interval, a full restart from the last one on every loss and every regrow.
    Its elastic ScalingConfig keeps the same minimum."""
    return replace(job, jit_checkpoint=False, jit_s=None, recovery_s=regrow_s, kill_recovery_s=recovery_s,
                   regrow_by_handoff=False, interval_bounds_s=None,
                   checkpoint_s=job.checkpoint_s if checkpoint_s is None else checkpoint_s)


@dataclass(frozen=True)
class ClusterShape:
    """How many nodes of each pricing model, and what is on a node."""

    accelerator: str
    """GPU type, a catalog name or alias (``a100-80gb``)."""
    on_demand_nodes: int
    """Nodes that are never preempted."""
    spot_nodes: int
    """Spot nodes (preemptible, replaced when capacity returns)."""
    gpus_per_node: int = 1
    """GPUs per node."""
    machine: Optional[str] = None
    """Host machine type to add to the GPU price; None prices GPUs only (as the seed guide does)."""

    @property
    def nodes(self) -> int:
        return self.on_demand_nodes + self.spot_nodes

    @property
    def name(self) -> str:
        if not self.spot_nodes:
            return f"{self.on_demand_nodes} on-demand"
        if not self.on_demand_nodes:
            return f"{self.spot_nodes} spot"
        return f"{self.on_demand_nodes} on-demand + {self.spot_nodes} spot"

    def node_usd_per_hour(self, catalog: PriceCatalog, pricing: str, region: str) -> float:
        price = catalog.gpu_price(self.accelerator, pricing, region).usd_per_hour * self.gpus_per_node
        if self.machine:
            price += catalog.machine_price(self.machine, pricing, region).usd_per_hour
        return price

    def usd_per_hour(self, catalog: PriceCatalog, region: str) -> float:
        """Hourly price with every node alive."""
        return (self.on_demand_nodes * self.node_usd_per_hour(catalog, "on_demand", region)
                + self.spot_nodes * self.node_usd_per_hour(catalog, "spot", region))


# Preemption processes -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CapacityChange:
    t: float
    nodes: int
    """Spot nodes lost (negative) or returned (positive)."""


class ExponentialLosses:
    """Each alive Spot VM is lost after an exponential lifetime; a replacement joins after a delay."""

    def __init__(self, mtbi_s: float, replacement_s: float, rng: random.Random):
        self.mtbi_s, self.replacement_s, self.rng = mtbi_s, replacement_s, rng
        self._returns: Deque[float] = deque()

    def initial_alive(self, spot_nodes: int) -> int:
        return spot_nodes

    def next_change(self, now: float, alive: int) -> Optional[CapacityChange]:
        # Lifetimes are memoryless, so sampling afresh at every look is exact.
        loss_at = now + self.rng.expovariate(alive / self.mtbi_s) if alive else math.inf
        if self._returns and self._returns[0] <= loss_at:
            return CapacityChange(self._returns[0], +1)
        return CapacityChange(loss_at, -1) if alive else None

    def apply(self, change: CapacityChange) -> None:
        if change.nodes > 0:
            self._returns.popleft()
        else:
            self._returns.append(change.t + self.replacement_s)


def scaled_trace(counts: Sequence[int], spot_nodes: int, rng: Optional[random.Random] = None,
                 fleet: Optional[int] = None) -> List[int]:
    """The trace's counts on ``spot_nodes`` nodes, by the simulator's rule (``chaos.scale_trace``):
    each node follows one of the trace's node streams, so the loss rate per node is the trace's."""
    fleet = fleet or max(max(counts, default=0), 1)
    if spot_nodes == fleet:
        return [min(c, fleet) for c in counts]
    from raytrain_spot.simulator.chaos import scale_trace  # imports the config schema (torch): only when needed

    return scale_trace(counts, spot_nodes, rng or random.Random(0), fleet)


class TraceReplay:
    """Spot capacity follows a recorded trace, mapped onto the cluster's Spot nodes, looping at its end.

    ``rng`` picks which of the trace's node streams the Spot nodes follow when their numbers differ.
    """

    def __init__(self, counts: Sequence[int], tick_s: float, spot_nodes: int, offset_s: float,
                 rng: Optional[random.Random] = None, fleet: Optional[int] = None):
        self.targets = scaled_trace(counts, spot_nodes, rng, fleet)
        self.tick_s, self.offset_s = tick_s, offset_s
        self.length_s = len(counts) * tick_s
        # Ticks (within one loop of the trace) whose count differs from the tick before.
        self._change_ticks = [i for i in range(len(self.targets)) if self.targets[i] != self.targets[i - 1]]

    def initial_alive(self, spot_nodes: int) -> int:
        return self.target_at(0.0)

    def target_at(self, t: float) -> int:
        return self.targets[int(((t + self.offset_s) % self.length_s) // self.tick_s)]

    def next_change(self, now: float, alive: int) -> Optional[CapacityChange]:
        if not self._change_ticks:
            return None
        loop, within = divmod(now + self.offset_s, self.length_s)
        index = bisect.bisect_left(self._change_ticks, within / self.tick_s)
        for _ in range(len(self._change_ticks) + 1):
            if index == len(self._change_ticks):
                loop, index = loop + 1, 0
            tick = self._change_ticks[index]
            at = loop * self.length_s + tick * self.tick_s - self.offset_s
            if at > now and self.targets[tick] != alive:
                return CapacityChange(at, self.targets[tick] - alive)
            index += 1
        return None

    def apply(self, change: CapacityChange) -> None:
        """The trace decides everything up front."""


def load_trace(path: str) -> Tuple[List[int], float]:
    """Counts and tick of a trace file (``{"metadata": {"gap_seconds": s}, "data": [...]}``)."""
    with open(os.path.expanduser(path)) as f:
        document = json.load(f)
    return [int(c) for c in document["data"]], float(document["metadata"]["gap_seconds"])


# The simulation ------------------------------------------------------------------------------------

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


class CapacityProcess(Protocol):
    """Where Spot capacity comes and goes: ExponentialLosses or TraceReplay."""

    def initial_alive(self, spot_nodes: int) -> int: ...

    def next_change(self, now: float, alive: int) -> Optional[CapacityChange]: ...

    def apply(self, change: CapacityChange) -> None: ...


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


# Planning -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preemptions:
    """The preemption process to plan against."""

    mtbi_s: Optional[float] = None
    """Mean lifetime of one Spot VM; None: the catalog's figure for the GPU type."""
    replacement_s: float = 600.0
    """Delay until a lost Spot VM's replacement joins (exponential mode)."""
    trace: Optional[Tuple[Tuple[int, ...], float]] = None
    """(counts, tick seconds) of a capacity trace to replay instead of exponential lifetimes."""
    trace_fleet: Optional[int] = None
    """The trace's node count; None: its largest count (pass it for a window of a longer trace)."""


@dataclass
class Estimate:
    """Expected outcome of one cluster shape in one region."""

    config: str
    region: str
    on_demand_nodes: int
    spot_nodes: int
    checkpoint_interval_s: Optional[float]
    """Training time between checkpoints used (None: no periodic checkpoints, no preemptions expected)."""
    wall_h: float
    """Mean wall time over the simulated runs."""
    wall_h_p90: float
    goodput: float
    """Job work / mean wall time."""
    cost_usd: float
    """Mean cost."""
    cost_per_step_usd: float
    preemptions: float
    """Mean Spot nodes lost per run."""
    finish_probability: float
    """Share of runs that finished by the deadline (by the horizon without one)."""
    meets_deadline: bool
    strategy: str = PRODUCT
    """``raytrain-spot`` (the job as given) or ``plain-ray-train`` (the baseline row)."""
    jit_complete: Optional[float] = None
    """Share of the group's losses whose just-in-time checkpoint committed in time (None: no notice handling)."""

    @property
    def label(self) -> str:
        return self.config + (" (plain Ray Train)" if self.strategy == PLAIN else "")


@dataclass
class Plan:
    """All estimates, cheapest first, and the recommendation."""

    estimates: List[Estimate]
    recommended: Optional[Estimate]
    reason: str
    mtbi_s: Optional[float]
    """Per-Spot-VM MTBI used (None when a trace was replayed)."""
    young_interval_s: Dict[str, Optional[float]] = field(default_factory=dict)
    """Young's interval per configuration, next to the Daly interval that was used."""

    def plain_for(self, estimate: Estimate) -> Optional[Estimate]:
        """The plain Ray Train row of the same shape and region, if one was simulated."""
        return next((e for e in self.estimates if e.strategy == PLAIN and e.config == estimate.config
                     and e.region == estimate.region), None)


def system_mtbi_s(mtbi_s: float, spot_nodes: int) -> float:
    """Mean time between losses in a group of ``spot_nodes`` independent Spot VMs."""
    return mtbi_s / spot_nodes if spot_nodes else math.inf


def trace_mtbi_s(counts: Sequence[int], tick_s: float, spot_nodes: int = 0) -> float:
    """Per-node MTBI of a capacity trace: node-time alive over node losses. Mapping the trace onto
    any number of nodes (``scaled_trace``) keeps it, so ``spot_nodes`` does not enter."""
    losses = sum(max(0, a - b) for a, b in zip(counts, counts[1:]))
    return sum(counts) * tick_s / losses if losses else math.inf


def jit_complete_fraction(job: Job, group_fraction: float = 1.0) -> float:
    """Share of notices whose just-in-time checkpoint commits by the drain deadline.

    The notice lands at a uniform point of a step; the loop finishes that step (at ``group_fraction``
    of the cluster a step takes ``step_time_s / group_fraction``), then the save takes ``jit_s``; the
    drain deadline is ``notice_s - margin_s`` after the notice.
    """
    if not job.jit_checkpoint:
        return 0.0
    slack = job.notice_s - job.margin_s - job.jit_save_s
    if slack < 0:
        return 0.0
    return min(1.0, slack * max(group_fraction, 1e-12) / job.step_time_s)


def jit_covers_preemptions(job: Job) -> bool:
    """Every notice of the full group gets a committed just-in-time checkpoint."""
    return jit_complete_fraction(job) >= 1.0


def interval_for(job: Job, mtbi_s: float, spot_nodes: int) -> float:
    """Training time between periodic checkpoints.

    With ``interval_bounds_s`` (raytrain-spot), what its checkpoint advisor does: Daly on every
    interruption of the group, clamped into the bounds. Otherwise the planner's optimum: Daly on the
    losses that lose work (those without a committed just-in-time checkpoint); none when there are none.
    """
    system = system_mtbi_s(mtbi_s, spot_nodes)
    if math.isinf(system):
        return math.inf
    if job.interval_bounds_s is not None:
        low, high = job.interval_bounds_s
        return min(max(daly_interval(job.checkpoint_s, system) if job.checkpoint_s > 0 else low, low), high)
    uncovered = 1.0 - jit_complete_fraction(job)
    if uncovered <= 0:
        return math.inf
    if job.checkpoint_s == 0:
        return job.step_time_s  # free checkpoints: every step
    return daly_interval(job.checkpoint_s, system / uncovered)


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


def plan(job: Job, shapes: Sequence[ClusterShape], regions: Sequence[str], catalog: PriceCatalog,
         preemptions: Preemptions, replications: int = 200, seed: int = 0, deadline_h: Optional[float] = None,
         confidence: float = 0.9, interval_s: Optional[float] = None, horizon_factor: float = 20.0,
         baseline: Optional[Job] = None) -> Plan:
    """Simulate every shape, price it in every region, and pick the cheapest that meets the deadline.

    ``baseline`` (``plain_ray_train(job)``) adds a row per shape with Spot nodes for comparison; the
    recommendation is always one of ``job``'s rows.
    """
    accelerator = shapes[0].accelerator
    estimates: List[Estimate] = []
    youngs: Dict[str, Optional[float]] = {}
    mtbi = None
    if preemptions.trace is None:
        mtbi = preemptions.mtbi_s or catalog.mtbi_hours(accelerator) * HOUR
    horizon_s = horizon_factor * job.work_s
    for index, shape in enumerate(shapes):
        shape_mtbi = mtbi if mtbi is not None else trace_mtbi_s(*preemptions.trace, shape.spot_nodes)
        system = system_mtbi_s(shape_mtbi, shape.spot_nodes)
        youngs[shape.name] = None if math.isinf(system) else young_interval(job.checkpoint_s, system)
        variants = [(PRODUCT, job)] + ([(PLAIN, baseline)] if baseline is not None and shape.spot_nodes else [])
        for strategy, variant in variants:
            tau = interval_s if interval_s is not None else interval_for(variant, shape_mtbi, shape.spot_nodes)
            outcomes = simulate_shape(variant, shape, tau, replace(preemptions, mtbi_s=mtbi) if mtbi else preemptions,
                                      replications, seed, index, horizon_s, catalog)
            for region in regions:
                estimates.append(_estimate(variant, shape, region, catalog, outcomes, tau, deadline_h, confidence,
                                           strategy))
    estimates.sort(key=lambda e: e.cost_usd)
    eligible = [e for e in estimates if e.meets_deadline and e.strategy == PRODUCT]
    if eligible:
        best = eligible[0]
        reason = (f"cheapest of {len(eligible)} configurations that finish "
                  + (f"within {deadline_h:g} h in {confidence:.0%} of runs" if deadline_h else "before the horizon"))
    else:
        best, reason = None, "no configuration meets the deadline; relax it or add nodes"
    return Plan(estimates, best, reason, mtbi, youngs)


def _estimate(job: Job, shape: ClusterShape, region: str, catalog: PriceCatalog, outcomes: List[RunOutcome],
              tau: float, deadline_h: Optional[float], confidence: float, strategy: str = PRODUCT) -> Estimate:
    od_price = shape.node_usd_per_hour(catalog, "on_demand", region) if shape.on_demand_nodes else 0.0
    spot_price = shape.node_usd_per_hour(catalog, "spot", region) if shape.spot_nodes else 0.0
    walls = sorted(o.wall_s for o in outcomes)
    costs = [shape.on_demand_nodes * od_price * o.wall_s / HOUR + spot_price * o.spot_node_s / HOUR for o in outcomes]
    mean_wall = sum(walls) / len(walls)
    mean_cost = sum(costs) / len(costs)
    limit_s = deadline_h * HOUR if deadline_h is not None else math.inf
    on_time = sum(1 for o in outcomes if o.finished and o.wall_s <= limit_s) / len(outcomes)
    group_losses = sum(o.group_losses for o in outcomes)
    jit = None
    if job.jit_checkpoint and shape.spot_nodes:
        jit = sum(o.jit_saves for o in outcomes) / group_losses if group_losses else jit_complete_fraction(job)
    return Estimate(
        config=shape.name, region=region, on_demand_nodes=shape.on_demand_nodes, spot_nodes=shape.spot_nodes,
        checkpoint_interval_s=None if math.isinf(tau) else tau,
        wall_h=mean_wall / HOUR, wall_h_p90=walls[min(len(walls) - 1, int(0.9 * len(walls)))] / HOUR,
        goodput=job.work_s / mean_wall, cost_usd=mean_cost, cost_per_step_usd=mean_cost / job.steps,
        preemptions=sum(o.preemptions for o in outcomes) / len(outcomes),
        finish_probability=on_time, meets_deadline=on_time >= confidence, strategy=strategy, jit_complete=jit)


def fixed_goodput_estimate(shape: ClusterShape, catalog: PriceCatalog, region: str, work_h: float,
                           steps_per_hour: float, goodput: float) -> Tuple[float, float, float]:
    """(wall hours, cost, cost per step) when the goodput is assumed rather than simulated.

    This is the seed guide's arithmetic (``calculate_cost_efficiency``, its cost tables): every node
    billed for work / goodput hours.
    """
    wall_h = work_h / goodput
    hourly = shape.usd_per_hour(catalog, region)
    return wall_h, hourly * wall_h, hourly / (steps_per_hour * goodput)


# A measured run -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measured:
    value: float
    how: str
    """How the run measured it, for the printout."""


@dataclass
class RunFigures:
    """What a run's ledger and event log say about the job's figures (None: not measured)."""

    run_dir: str
    figures: Dict[str, Measured]
    """Keyed like the Job fields / options: step_time_s, checkpoint_s, restore_s, jit_s, recovery_s,
    kill_recovery_s (or plain_recovery_s for a plain Ray Train run)."""
    notes: List[str]
    plain: bool
    """The run had no notice handling (``trainer.spot_aware=false``)."""


_HEAD_TYPES = ("local-head", "head")


def _run_config(run_dir: str) -> Dict[str, Any]:
    path = os.path.join(run_dir, ".hydra", "config.yaml")
    if not os.path.exists(path):
        return {}
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def measure_run(run_dir: str) -> RunFigures:
    """The job's figures as a run measured them: ``RUN_DIR/ledger.json`` (built from ``events.jsonl``
    when missing) for the checkpoint stall and the restore, ``events.jsonl`` for the step time and the
    recoveries (notice to training again, kill to training again)."""
    from raytrain_spot.observe.events import EVENTS_FILE, read_events

    events_path, ledger_path = os.path.join(run_dir, EVENTS_FILE), os.path.join(run_dir, "ledger.json")
    if not os.path.exists(events_path) and not os.path.exists(ledger_path):
        raise ValueError(f"{run_dir}: no ledger.json or {EVENTS_FILE}; pass a run directory (outputs/<run.name>)")
    events = read_events(events_path) if os.path.exists(events_path) else []
    if os.path.exists(ledger_path):
        with open(ledger_path) as f:
            summary, ledger_name = json.load(f), "ledger.json"
    else:
        from raytrain_spot.cost.ledger import build_ledger

        summary, ledger_name = build_ledger(events, PriceCatalog.load()).summary, "the ledger of events.jsonl"
    config = _run_config(run_dir)
    trainer = config.get("trainer") or {}
    plain = trainer.get("spot_aware") is False
    figures: Dict[str, Measured] = {}
    notes: List[str] = []

    checkpoints = summary.get("checkpoints") or {}
    if checkpoints.get("mean_stall_s") is not None:
        figures["checkpoint_s"] = Measured(checkpoints["mean_stall_s"], f"{ledger_name} checkpoints.mean_stall_s, "
                                           f"{checkpoints.get('saves')} saves")
    if checkpoints.get("mean_restore_s") is not None:
        figures["restore_s"] = Measured(checkpoints["mean_restore_s"], f"{ledger_name} checkpoints.mean_restore_s, "
                                        f"{checkpoints.get('restores')} restores")

    steps = [e for e in events if e["ev"] == "step"]
    last_execution = {int(e["step"]): id(e) for e in steps}
    kept = [e for e in steps if last_execution[int(e["step"])] == id(e) and e.get("duration_s")]
    if kept:
        world = max(int(e.get("world_size") or 1) for e in kept)
        full = [float(e["duration_s"]) for e in kept if int(e.get("world_size") or 1) == world]
        figures["step_time_s"] = Measured(statistics.median(full), f"events.jsonl, median of {len(full)} steps at "
                                          f"world size {world} (the plan assumes its full cluster runs a step as fast)")
    elif (summary.get("steps") or {}).get("completed"):
        figures["step_time_s"] = Measured(summary["time_s"]["productive"] / summary["steps"]["completed"],
                                          f"{ledger_name}: productive time / completed steps")

    min_workers = trainer.get("min_workers") or next(
        (e["min_workers"] for e in events if e["ev"] == "start" and "min_workers" in e), 1)
    waiting = _waiting_for_capacity(events, int(min_workers))
    handled, unhandled, handoffs, jit_ok = _recoveries(events, waiting)
    if handled:
        jit = [h[1] for h in handled]
        figures["jit_s"] = Measured(statistics.median(jit), "events.jsonl, notice to committed just-in-time "
                                    f"checkpoint, median of {len(jit)}")
        again = [h[0] for h in handled]
        rest = [max(0.0, h[0] - h[1] - h[2]) for h in handled]
        figures["recovery_s"] = Measured(statistics.median(rest), "events.jsonl, notice to training again "
                                         f"{statistics.median(again):.1f} s (median of {len(again)}) less the save "
                                         "and the restore")
    if handoffs:
        notes.append(f"just-in-time checkpoints in the run: {jit_ok} of {handoffs} handoffs at a notice committed "
                     "before the drain deadline")
    if unhandled:
        again = [u[0] for u in unhandled]
        rest = [max(0.0, u[0] - u[1]) for u in unhandled]
        key = "plain_recovery_s" if plain else "kill_recovery_s"
        what = "kill (no notice handling)" if plain else "kill without notice"
        figures[key] = Measured(statistics.median(rest), f"events.jsonl, {what} to training again "
                                f"{statistics.median(again):.1f} s (median of {len(again)}) less the restore")
    if plain:
        notes.append("the run is plain Ray Train (trainer.spot_aware=false): its kill recovery is the plain row's")
    if summary.get("disruptions", {}).get("preemptions"):
        notes.append("not taken from the run: its MTBI (a simulator's or one short run's is no forecast; use "
                     "--mtbi-hours or --trace)")
    return RunFigures(run_dir, figures, notes, plain)


def _worker_capacity(events: Sequence[Dict[str, Any]]) -> List[Tuple[float, float]]:
    """(time, workers the alive nodes hold) after every node change: one per GPU, or one per non-head node;
    a drained node no longer counts (a new group leaves it out)."""
    gpu_run = any(float(e.get("gpus") or 0) > 0 for e in events if e["ev"] == "add")
    alive: Dict[str, float] = {}
    points = []
    for e in events:
        if e["ev"] == "add":
            gpus = float(e.get("gpus") or 0)
            alive[e["node"]] = gpus if gpus > 0 else (0.0 if gpu_run or e.get("node_type") in _HEAD_TYPES else 1.0)
        elif e["ev"] in ("kill", "remove", "drain"):  # a draining node takes no new group
            alive.pop(e["node"], None)
        else:
            continue
        points.append((float(e["t"]), sum(alive.values())))
    return points


def _waiting_for_capacity(events: Sequence[Dict[str, Any]], min_workers: int):
    """A function (t0, t1) -> seconds in [t0, t1] in which the alive nodes held fewer than ``min_workers``."""
    points = _worker_capacity(events)

    def waiting(t0: float, t1: float) -> float:
        total, capacity, since = 0.0, math.inf, -math.inf  # nothing is known before the first change
        for t, after in points:
            if t >= t1:
                break
            if capacity < min_workers:
                total += max(0.0, t - max(since, t0))
            capacity, since = after, t
        if capacity < min_workers:
            total += max(0.0, t1 - max(since, t0))
        return total

    return waiting


def _recoveries(events: Sequence[Dict[str, Any]], waiting) -> Tuple[List[Tuple[float, float, float]],
                                                                    List[Tuple[float, float]], int, int]:
    """Per handoff at a notice: (training again from the notice, notice to committed just-in-time checkpoint,
    restore); per loss of a training group's member without one: (training again from the kill, restore);
    time waiting for capacity left out. Also the handoffs at a notice, and those whose checkpoint
    committed before the drain deadline (no ``jit_late``)."""
    groups = [e for e in events if e["ev"] == "group"]
    steps = [e for e in events if e["ev"] == "step"]

    def first_after(kind: str, t: float, until: float = math.inf, where=lambda e: True):
        return next((e for e in events if e["ev"] == kind and t < float(e["t"]) <= until and where(e)), None)

    def training_again(group) -> Optional[float]:
        first = next((s for s in steps if float(s["t"]) > float(group["t"])), None)
        return None if first is None else float(first["t"]) - float(first.get("duration_s") or 0.0)

    def restore_before(t0: float, t1: float) -> float:
        restores = [e for e in events if e["ev"] == "restore" and t0 < float(e["t"]) <= t1]
        return float(restores[-1].get("duration_s") or 0.0) if restores else 0.0

    handled, unhandled, noticed = [], [], set()
    handoffs = jit_ok = 0
    for handoff in (e for e in events if e["ev"] == "handoff" and e.get("reason") == "preemption"):
        t_handoff = float(handoff["t"])
        notices = [float(n["t"]) for n in events if n["ev"] == "notice" and n["node"] in (handoff.get("nodes") or [])
                   and float(n["t"]) <= t_handoff]
        if not notices:
            continue
        noticed.update(handoff.get("nodes") or [])
        handoffs += 1
        t = min(notices)
        group = first_after("group", t_handoff)
        until = float(group["t"]) if group is not None else math.inf
        save = first_after("checkpoint", t_handoff, until, lambda e: e.get("kind") == "jit")
        if save is None:
            continue
        jit_ok += first_after("jit_late", t_handoff, until) is None
        again = training_again(group) if group is not None else None
        if again is not None:
            handled.append((again - t - waiting(t, again), float(save["t"]) - t, restore_before(t, until)))
    for kill in (e for e in events if e["ev"] == "kill"):
        t = float(kill["t"])
        current = next((g for g in reversed(groups) if float(g["t"]) <= t), None)
        if kill["node"] in noticed or current is None or kill["node"] not in (current.get("nodes") or []):
            continue
        members = set(current.get("nodes") or [])
        # The group must still be training: no handoff since it started, no earlier loss of a member.
        if first_after("handoff", float(current["t"]), t) is not None or first_after(
                "kill", float(current["t"]), t, lambda e: e is not kill and e["node"] in members) is not None:
            continue
        group = first_after("group", t)
        again = training_again(group) if group is not None else None
        if again is not None:
            unhandled.append((again - t - waiting(t, again), restore_before(t, float(group["t"]))))
    return handled, unhandled, handoffs, jit_ok


# Command line ---------------------------------------------------------------------------------------

FIGURE_NAMES = {
    "step_time_s": "step time", "checkpoint_s": "checkpoint stall", "restore_s": "restore",
    "jit_s": "notice to JIT checkpoint", "recovery_s": "recovery at a notice",
    "kill_recovery_s": "recovery after a kill",
    "notice_s": "notice", "margin_s": "drain margin", "plain_recovery_s": "plain: kill to training",
    "plain_regrow_s": "plain: regrow", "plain_checkpoint_s": "plain: checkpoint stall",
}
DEFAULTS = {
    "checkpoint_s": (PRODUCT_CHECKPOINT_S, "default: raytrain-spot's async snapshot"),
    "restore_s": (60.0, "default"),
    "jit_s": (PRODUCT_JIT_S, "default: assumed"),
    "recovery_s": (PRODUCT_RECOVERY_S, "default: raytrain-spot measured, notice to training 6.1 s"),
    "kill_recovery_s": (PRODUCT_KILL_RECOVERY_S, "default: estimated"),
    "plain_recovery_s": (PLAIN_RECOVERY_S, "default: Ray Train 2.60 measured, GCE-like benchmark"),
}


@dataclass(frozen=True)
class Figure:
    key: str
    value: float
    source: str


def resolve_figures(args: argparse.Namespace) -> Tuple[Dict[str, float], List[Figure], Optional[RunFigures]]:
    """Each job figure from the option when given, else from ``--from-run``, else the default."""
    run = measure_run(args.from_run) if args.from_run else None
    values: Dict[str, float] = {}
    shown: List[Figure] = []
    for key in ("step_time_s", "checkpoint_s", "restore_s", "jit_s", "recovery_s", "kill_recovery_s",
                "plain_recovery_s"):
        option = getattr(args, key)
        if option is not None:
            value, source = option, f"option --{key.replace('_', '-')}"
        elif run is not None and key in run.figures:
            value, source = run.figures[key].value, f"run: {run.figures[key].how}"
        elif key in DEFAULTS:
            value, source = DEFAULTS[key]
        else:
            raise ValueError("--step-time-s is required (or --from-run RUN_DIR with step records)")
        values[key] = value
        if key == "jit_s" and not args.jit:
            continue
        shown.append(Figure(key, value, source))
    shown.append(Figure("notice_s", args.notice_s, "option --notice-s" if args.notice_s != GCE_NOTICE_S
                        else "default: GCE's 30 s (120 s with scheduling.preemptionNoticeDuration)"))
    if args.jit:
        shown.append(Figure("margin_s", args.margin_s, "the watcher's drain margin"))
    return values, shown, run


def format_figures(shown: Sequence[Figure], run: Optional[RunFigures]) -> str:
    lines = [f"figures{f' (from run {run.run_dir} where it says run)' if run else ''}:"]
    for figure in shown:
        lines.append(f"  {FIGURE_NAMES[figure.key]:<26} {figure.value:10.3g} s   {figure.source}")
    for note in run.notes if run else ():
        lines.append(f"  {note}")
    return "\n".join(lines)


def _shapes(args) -> List[ClusterShape]:
    if args.nodes < 1:
        raise SystemExit("--gpus must be at least --gpus-per-node")
    mixes = [(args.nodes, 0), (0, args.nodes)] + [(k, args.nodes - k) for k in args.hybrid if 0 < k < args.nodes]
    return [ClusterShape(args.gpu, od, spot, args.gpus_per_node, args.machine) for od, spot in dict.fromkeys(mixes)]


def format_plan(result: Plan, job: Job, deadline_h: Optional[float]) -> str:
    head = (f"{'configuration':<40} {'region':<16} {'ckpt every':>10} {'wall h':>8} {'p90 h':>8} {'goodput':>8} "
            f"{'cost $':>10} {'$/step':>9} {'preempt':>8} {'JIT ok':>7} {'on time':>8}")
    jit = (f"; just-in-time checkpoint on a {job.notice_s:g} s notice, {job.jit_save_s:g} s to commit"
           if job.jit_checkpoint else "; no just-in-time checkpoint")
    lines = [f"job: {job.steps} steps x {job.step_time_s:g} s = {job.work_s / HOUR:.1f} h of work; "
             f"checkpoint {job.checkpoint_s:g} s, restore {job.restore_s:g} s, recovery {job.recovery_s:g} s" + jit,
             head, "-" * len(head)]
    for e in result.estimates:
        if e.checkpoint_interval_s:
            interval = _minutes(e.checkpoint_interval_s)
        else:
            interval = "on notice" if e.spot_nodes and e.jit_complete else "-"
        jit_ok = f"{e.jit_complete:7.0%}" if e.jit_complete is not None else f"{'-':>7}"
        lines.append(f"{e.label:<40} {e.region:<16} {interval:>10} {e.wall_h:8.1f} {e.wall_h_p90:8.1f} "
                     f"{e.goodput:8.1%} {e.cost_usd:10,.0f} {e.cost_per_step_usd:9.4f} {e.preemptions:8.1f} "
                     f"{jit_ok} {e.finish_probability:8.0%}")
    if result.recommended:
        r = result.recommended
        if r.checkpoint_interval_s and job.interval_bounds_s:
            advice = f"the checkpoint advisor saves every {_minutes(r.checkpoint_interval_s)}"
        elif r.checkpoint_interval_s:
            advice = (f"checkpoint every {_minutes(r.checkpoint_interval_s)} "
                      f"(Daly; Young {_minutes(result.young_interval_s.get(r.config))})")
        elif r.spot_nodes and r.jit_complete:
            advice = ("checkpoint on the preemption notice; set the periodic interval for failures without "
                      "notice (Young/Daly on their MTBI)")
        else:
            advice = "no periodic checkpoint needed for preemptions"
        if r.spot_nodes and r.jit_complete is not None:
            advice += f", a just-in-time checkpoint on {r.jit_complete:.0%} of losses"
        lines.append(f"recommended: {r.config} in {r.region}: ${r.cost_usd:,.0f}, {r.wall_h:.1f} h expected, "
                     f"{advice} - {result.reason}")
        plain = result.plain_for(r)
        if plain:
            lines.append(f"plain Ray Train on the same shape: ${plain.cost_usd:,.0f}, {plain.wall_h:.1f} h expected, "
                         f"on time in {plain.finish_probability:.0%} of runs")
    else:
        lines.append(f"recommended: none - {result.reason}")
    return "\n".join(lines)


def _minutes(seconds: Optional[float]) -> str:
    return f"{seconds / 60:.1f} min" if seconds else "n/a"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.cost.plan", description=__doc__.split("\n\n")[0])
    job = parser.add_argument_group("job (each figure: the option, else --from-run, else raytrain-spot's default)")
    job.add_argument("--steps", type=int, required=True, help="optimizer steps to finish")
    job.add_argument("--from-run", default=None, metavar="RUN_DIR",
                     help="take the step time, checkpoint stall, restore and recoveries from a run's ledger.json "
                          "and events.jsonl")
    job.add_argument("--step-time-s", type=float, default=None, help="seconds per step on the full cluster")
    job.add_argument("--checkpoint-s", type=float, default=None,
                     help=f"training stall per checkpoint (default {PRODUCT_CHECKPOINT_S:g}: an async snapshot)")
    job.add_argument("--restore-s", type=float, default=None,
                     help="checkpoint load time after a restart (default 60)")
    job.add_argument("--recovery-s", type=float, default=None,
                     help="handoff at a notice to a re-formed group, without the restore "
                          f"(default {PRODUCT_RECOVERY_S:g})")
    job.add_argument("--kill-recovery-s", type=float, default=None,
                     help=f"loss without a usable notice to a re-formed group (default {PRODUCT_KILL_RECOVERY_S:g})")
    job.add_argument("--jit", action=argparse.BooleanOptionalAction, default=True,
                     help="a just-in-time checkpoint on the notice (default on; --no-jit: periodic checkpoints only)")
    job.add_argument("--jit-s", type=float, default=None,
                     help="notice to a committed just-in-time checkpoint, from a step boundary "
                          f"(default {PRODUCT_JIT_S:g})")
    job.add_argument("--notice-s", type=float, default=GCE_NOTICE_S,
                     help="preemption notice (GCE: 30; 120 with scheduling.preemptionNoticeDuration)")
    job.add_argument("--margin-s", type=float, default=DRAIN_MARGIN_S, help="drain deadline before the hard stop")
    job.add_argument("--min-nodes", type=int, default=1, help="fewest nodes the job can train on (trainer.min_workers)")
    plain = parser.add_argument_group("the plain Ray Train row")
    plain.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                       help="simulate plain Ray Train 2.60 beside each Spot shape (default on)")
    plain.add_argument("--plain-recovery-s", type=float, default=None,
                       help=f"its kill to re-formed group (default {PLAIN_RECOVERY_S:g})")
    plain.add_argument("--plain-regrow-s", type=float, default=PLAIN_REGROW_S, help="its regrow restart")
    plain.add_argument("--plain-checkpoint-s", type=float, default=None,
                       help="its stall per checkpoint (default: --checkpoint-s; a synchronous save is ~20 s/GB)")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--gpu", default="a100-80gb", help="accelerator (catalog name or alias)")
    cluster.add_argument("--gpus", type=int, default=8, help="GPUs in the full cluster")
    cluster.add_argument("--gpus-per-node", type=int, default=1)
    cluster.add_argument("--machine", default=None, help="host machine type to add to the GPU price")
    cluster.add_argument("--hybrid", default="1,2", help="on-demand node counts to try in hybrid shapes")
    cluster.add_argument("--regions", default=None, help="comma-separated regions (default: the catalog's)")
    cluster.add_argument("--prices", default=None, help="user price file merged over the catalog")
    process = parser.add_argument_group("preemptions")
    process.add_argument("--mtbi-hours", type=float, default=None, help="per Spot VM (default: catalog, by GPU)")
    process.add_argument("--replacement-s", type=float, default=600.0, help="delay until a lost VM is replaced")
    process.add_argument("--trace", default=None, help="replay a capacity trace (shared/traces) instead")
    process.add_argument("--trace-time-scale", type=float, default=1.0, help="stretch (>1) or compress the trace")
    goal = parser.add_argument_group("goal and method")
    goal.add_argument("--deadline-h", type=float, default=None, help="finish within this many hours")
    goal.add_argument("--confidence", type=float, default=0.9, help="share of runs that must meet the deadline")
    goal.add_argument("--interval-s", type=float, default=None, help="fix the checkpoint interval (default Daly)")
    goal.add_argument("--goodput", type=float, default=None,
                      help="skip the simulation and assume this goodput for every Spot/hybrid shape")
    goal.add_argument("--replications", type=int, default=200)
    goal.add_argument("--seed", type=int, default=0)
    goal.add_argument("--json", default=None, help="also write the plan as JSON here")
    args = parser.parse_args(argv)
    args.hybrid = [int(k) for k in args.hybrid.split(",") if k.strip()]
    args.nodes = args.gpus // args.gpus_per_node
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _run(parse_args(argv))
    except (PriceNotFound, ValueError, OSError) as error:
        print(f"plan: {error}", file=sys.stderr)
        return 2


def build_jobs(args: argparse.Namespace, values: Dict[str, float]) -> Tuple[Job, Optional[Job]]:
    """raytrain-spot's job from the resolved figures, and the plain Ray Train row's (None with --no-plain)."""
    job = Job(args.steps, values["step_time_s"], values["checkpoint_s"], values["restore_s"], values["recovery_s"],
              notice_s=args.notice_s, jit_checkpoint=args.jit, min_nodes=args.min_nodes, jit_s=values["jit_s"],
              margin_s=args.margin_s, kill_recovery_s=values["kill_recovery_s"],
              interval_bounds_s=PRODUCT_INTERVAL_BOUNDS_S)
    baseline = None
    if args.plain:
        baseline = plain_ray_train(job, values["plain_recovery_s"], args.plain_regrow_s, args.plain_checkpoint_s)
    return job, baseline


def _run(args: argparse.Namespace) -> int:
    catalog = PriceCatalog.load(args.prices)
    regions = args.regions.split(",") if args.regions else catalog.regions
    values, shown, run = resolve_figures(args)
    job, baseline = build_jobs(args, values)
    shapes = _shapes(args)
    if args.goodput is not None:
        for shape in shapes:
            for region in regions:
                goodput = 1.0 if not shape.spot_nodes else args.goodput
                wall_h, cost, per_step = fixed_goodput_estimate(shape, catalog, region, job.work_s / HOUR,
                                                                HOUR / job.step_time_s, goodput)
                print(f"{shape.name:<26} {region:<16} goodput {goodput:6.1%} wall {wall_h:8.1f} h "
                      f"cost ${cost:10,.0f} ${per_step:.4f}/step")
        return 0
    trace = None
    if args.trace:
        counts, tick_s = load_trace(args.trace)
        trace = (tuple(counts), tick_s * args.trace_time_scale)
    preemptions = Preemptions(args.mtbi_hours * HOUR if args.mtbi_hours else None, args.replacement_s, trace)
    result = plan(job, shapes, regions, catalog, preemptions, args.replications, args.seed, args.deadline_h,
                  args.confidence, args.interval_s, baseline=baseline)
    print(format_figures(shown, run))
    print(format_plan(result, job, args.deadline_h))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"job": asdict(job), "baseline": asdict(baseline) if baseline else None,
                       "figures": [asdict(figure) for figure in shown],
                       "recommended": asdict(result.recommended) if result.recommended else None,
                       "reason": result.reason, "estimates": [asdict(e) for e in result.estimates]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
