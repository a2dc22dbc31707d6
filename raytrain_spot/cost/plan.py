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
- A lost group member throws away the progress since the last completed checkpoint (unless a
  just-in-time checkpoint fits in the notice), then the group re-forms for ``recovery_s`` +
  ``restore_s``; a loss during that time starts it again.
- A returning node joins by a regrow: a checkpoint, then the same restart (no work is lost).
- Below ``min_nodes`` the job waits for capacity. Spot nodes are billed while alive, on-demand
  nodes for the whole run.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import random
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Deque, Dict, List, Optional, Protocol, Sequence, Tuple

from raytrain_spot.checkpoint.advisor import daly_interval, young_interval
from raytrain_spot.cost.pricing import PriceCatalog, PriceNotFound

HOUR = 3600.0


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
    """Time from a lost node to a re-formed group, excluding the restore (Ray measured 27-47 s locally)."""
    notice_s: float = 30.0
    """Warning before a Spot VM stops (GCE: 30 s)."""
    jit_checkpoint: bool = False
    """Save on the notice: no progress is lost when ``checkpoint_s`` fits in ``notice_s``."""
    min_nodes: int = 1
    """Fewest nodes the job trains on; below it, it waits for capacity."""

    def __post_init__(self):
        if self.steps <= 0 or self.step_time_s <= 0:
            raise ValueError("steps and step_time_s must be > 0")
        if min(self.checkpoint_s, self.restore_s, self.recovery_s, self.notice_s) < 0:
            raise ValueError("checkpoint_s, restore_s, recovery_s and notice_s must be >= 0")
        if self.min_nodes < 1:
            raise ValueError("min_nodes must be >= 1")

    @property
    def work_s(self) -> float:
        return self.steps * self.step_time_s


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


class TraceReplay:
    """Spot capacity follows a recorded trace, scaled to the cluster's Spot nodes, looping at its end."""

    def __init__(self, counts: Sequence[int], tick_s: float, spot_nodes: int, offset_s: float):
        peak = max(counts) or 1
        self.targets = [round(c * spot_nodes / peak) for c in counts]
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
    with open(path) as f:
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

    def restart(self, extra_s: float = 0.0) -> None:
        self.phase, self.group_spot, self.regrow_after_save = RECOVER, 0, False
        self.phase_end = self.t + extra_s + self.job.recovery_s + self.job.restore_s

    def can_train(self) -> bool:
        return self.shape.on_demand_nodes + self.alive >= self.job.min_nodes

    def end_phase(self) -> None:
        if self.phase == SAVE:
            self.saved, self.since_save = self.progress, 0.0
            if self.regrow_after_save:
                self.restart()
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
            jit = jit_covers_preemptions(self.job)
            if jit:
                self.saved = self.progress
            self.progress = self.saved
            self.restart(extra_s=self.job.checkpoint_s if jit else 0.0)
        elif self.phase == RECOVER:
            self.restart()  # the group being formed lost a member
        else:
            self.group_spot = min(self.group_spot, self.alive)
            if self.phase == SAVE:
                self.regrow_after_save = self.alive > self.group_spot  # the newcomer may be the one lost

    def gain_node(self) -> None:
        self.alive += 1
        if self.phase == TRAIN:
            self.start_save(regrow=True)
        elif self.phase == SAVE:
            self.regrow_after_save = True
        elif self.phase == WAIT and self.can_train():
            self.restart()


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
            return RunOutcome(run.t, run.spot_node_s, run.preemptions, True)
        if what == "save":
            run.start_save(regrow=False)
        else:
            run.end_phase()
    return RunOutcome(run.t, run.spot_node_s, run.preemptions, False)


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


def system_mtbi_s(mtbi_s: float, spot_nodes: int) -> float:
    """Mean time between losses in a group of ``spot_nodes`` independent Spot VMs."""
    return mtbi_s / spot_nodes if spot_nodes else math.inf


def trace_mtbi_s(counts: Sequence[int], tick_s: float, spot_nodes: int) -> float:
    """Per-node MTBI of a capacity trace: node-time alive over node losses, after scaling."""
    peak = max(counts) or 1
    scaled = [round(c * spot_nodes / peak) for c in counts]
    losses = sum(max(0, a - b) for a, b in zip(scaled, scaled[1:]))
    return sum(scaled) * tick_s / losses if losses else math.inf


def jit_covers_preemptions(job: Job) -> bool:
    return job.jit_checkpoint and job.checkpoint_s <= job.notice_s


def interval_for(job: Job, mtbi_s: float, spot_nodes: int) -> float:
    """Daly's interval for the group's MTBI; none when nothing preempts or a save on the notice protects."""
    system = system_mtbi_s(mtbi_s, spot_nodes)
    if math.isinf(system) or jit_covers_preemptions(job):
        return math.inf
    if job.checkpoint_s == 0:
        return job.step_time_s  # free checkpoints: every step
    return daly_interval(job.checkpoint_s, system)


def plan(job: Job, shapes: Sequence[ClusterShape], regions: Sequence[str], catalog: PriceCatalog,
         preemptions: Preemptions, replications: int = 200, seed: int = 0, deadline_h: Optional[float] = None,
         confidence: float = 0.9, interval_s: Optional[float] = None, horizon_factor: float = 20.0) -> Plan:
    """Simulate every shape, price it in every region, and pick the cheapest that meets the deadline."""
    accelerator = shapes[0].accelerator
    estimates: List[Estimate] = []
    youngs: Dict[str, Optional[float]] = {}
    mtbi = None
    if preemptions.trace is None:
        mtbi = preemptions.mtbi_s or catalog.mtbi_hours(accelerator) * HOUR
    horizon_s = horizon_factor * job.work_s
    for index, shape in enumerate(shapes):
        shape_mtbi = mtbi if mtbi is not None else trace_mtbi_s(*preemptions.trace, shape.spot_nodes)
        tau = interval_s if interval_s is not None else interval_for(job, shape_mtbi, shape.spot_nodes)
        system = system_mtbi_s(shape_mtbi, shape.spot_nodes)
        youngs[shape.name] = None if math.isinf(system) else young_interval(job.checkpoint_s, system)
        outcomes = []
        for replication in range(replications if shape.spot_nodes else 1):
            rng = random.Random(f"{seed}/{index}/{replication}")
            if preemptions.trace is None:
                capacity = ExponentialLosses(mtbi, preemptions.replacement_s, rng)
            else:
                counts, tick_s = preemptions.trace
                capacity = TraceReplay(counts, tick_s, shape.spot_nodes,
                                       offset_s=len(counts) * tick_s * replication / replications)
            outcomes.append(simulate_run(job, shape, tau, capacity, rng, horizon_s))
        for region in regions:
            estimates.append(_estimate(job, shape, region, catalog, outcomes, tau, deadline_h, confidence))
    estimates.sort(key=lambda e: e.cost_usd)
    eligible = [e for e in estimates if e.meets_deadline]
    if eligible:
        best = eligible[0]
        reason = (f"cheapest of {len(eligible)} configurations that finish "
                  + (f"within {deadline_h:g} h in {confidence:.0%} of runs" if deadline_h else "before the horizon"))
    else:
        best, reason = None, "no configuration meets the deadline; relax it or add nodes"
    return Plan(estimates, best, reason, mtbi, youngs)


def _estimate(job: Job, shape: ClusterShape, region: str, catalog: PriceCatalog, outcomes: List[RunOutcome],
              tau: float, deadline_h: Optional[float], confidence: float) -> Estimate:
    od_price = shape.node_usd_per_hour(catalog, "on_demand", region) if shape.on_demand_nodes else 0.0
    spot_price = shape.node_usd_per_hour(catalog, "spot", region) if shape.spot_nodes else 0.0
    walls = sorted(o.wall_s for o in outcomes)
    costs = [shape.on_demand_nodes * od_price * o.wall_s / HOUR + spot_price * o.spot_node_s / HOUR for o in outcomes]
    mean_wall = sum(walls) / len(walls)
    mean_cost = sum(costs) / len(costs)
    limit_s = deadline_h * HOUR if deadline_h is not None else math.inf
    on_time = sum(1 for o in outcomes if o.finished and o.wall_s <= limit_s) / len(outcomes)
    return Estimate(
        config=shape.name, region=region, on_demand_nodes=shape.on_demand_nodes, spot_nodes=shape.spot_nodes,
        checkpoint_interval_s=None if math.isinf(tau) else tau,
        wall_h=mean_wall / HOUR, wall_h_p90=walls[min(len(walls) - 1, int(0.9 * len(walls)))] / HOUR,
        goodput=job.work_s / mean_wall, cost_usd=mean_cost, cost_per_step_usd=mean_cost / job.steps,
        preemptions=sum(o.preemptions for o in outcomes) / len(outcomes),
        finish_probability=on_time, meets_deadline=on_time >= confidence)


def fixed_goodput_estimate(shape: ClusterShape, catalog: PriceCatalog, region: str, work_h: float,
                           steps_per_hour: float, goodput: float) -> Tuple[float, float, float]:
    """(wall hours, cost, cost per step) when the goodput is assumed rather than simulated.

    This is the seed guide's arithmetic (``calculate_cost_efficiency``, its cost tables): every node
    billed for work / goodput hours.
    """
    wall_h = work_h / goodput
    hourly = shape.usd_per_hour(catalog, region)
    return wall_h, hourly * wall_h, hourly / (steps_per_hour * goodput)


# Command line ---------------------------------------------------------------------------------------

def _shapes(args) -> List[ClusterShape]:
    if args.nodes < 1:
        raise SystemExit("--gpus must be at least --gpus-per-node")
    mixes = [(args.nodes, 0), (0, args.nodes)] + [(k, args.nodes - k) for k in args.hybrid if 0 < k < args.nodes]
    return [ClusterShape(args.gpu, od, spot, args.gpus_per_node, args.machine) for od, spot in dict.fromkeys(mixes)]


def format_plan(result: Plan, job: Job, deadline_h: Optional[float]) -> str:
    head = (f"{'configuration':<26} {'region':<16} {'ckpt every':>10} {'wall h':>8} {'p90 h':>8} {'goodput':>8} "
            f"{'cost $':>10} {'$/step':>9} {'preempt':>8} {'on time':>8}")
    lines = [f"job: {job.steps} steps x {job.step_time_s:g} s = {job.work_s / HOUR:.1f} h of work; "
             f"checkpoint {job.checkpoint_s:g} s, restore {job.restore_s:g} s, recovery {job.recovery_s:g} s",
             head, "-" * len(head)]
    for e in result.estimates:
        if e.checkpoint_interval_s:
            interval = _minutes(e.checkpoint_interval_s)
        else:
            interval = "on notice" if e.spot_nodes and jit_covers_preemptions(job) else "-"
        lines.append(f"{e.config:<26} {e.region:<16} {interval:>10} {e.wall_h:8.1f} {e.wall_h_p90:8.1f} "
                     f"{e.goodput:8.1%} {e.cost_usd:10,.0f} {e.cost_per_step_usd:9.4f} {e.preemptions:8.1f} "
                     f"{e.finish_probability:8.0%}")
    if result.recommended:
        r = result.recommended
        if r.checkpoint_interval_s:
            advice = (f"checkpoint every {_minutes(r.checkpoint_interval_s)} "
                      f"(Daly; Young {_minutes(result.young_interval_s.get(r.config))})")
        elif r.spot_nodes and jit_covers_preemptions(job):
            advice = ("checkpoint on the preemption notice; set the periodic interval for failures without "
                      "notice (Young/Daly on their MTBI)")
        else:
            advice = "no periodic checkpoint needed for preemptions"
        lines.append(f"recommended: {r.config} in {r.region}: ${r.cost_usd:,.0f}, {r.wall_h:.1f} h expected, "
                     f"{advice} - {result.reason}")
    else:
        lines.append(f"recommended: none - {result.reason}")
    return "\n".join(lines)


def _minutes(seconds: Optional[float]) -> str:
    return f"{seconds / 60:.1f} min" if seconds else "n/a"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.cost.plan", description=__doc__.split("\n\n")[0])
    job = parser.add_argument_group("job")
    job.add_argument("--steps", type=int, required=True, help="optimizer steps to finish")
    job.add_argument("--step-time-s", type=float, required=True, help="seconds per step on the full cluster")
    job.add_argument("--checkpoint-s", type=float, default=60.0, help="training stall per checkpoint")
    job.add_argument("--restore-s", type=float, default=60.0, help="checkpoint load time after a restart")
    job.add_argument("--recovery-s", type=float, default=45.0, help="node loss to re-formed group, without restore")
    job.add_argument("--jit", action="store_true", help="a just-in-time checkpoint on the 30 s notice saves progress")
    job.add_argument("--min-nodes", type=int, default=1, help="fewest nodes the job can train on")
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


def _run(args: argparse.Namespace) -> int:
    catalog = PriceCatalog.load(args.prices)
    regions = args.regions.split(",") if args.regions else catalog.regions
    job = Job(args.steps, args.step_time_s, args.checkpoint_s, args.restore_s, args.recovery_s,
              jit_checkpoint=args.jit, min_nodes=args.min_nodes)
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
                  args.confidence, args.interval_s)
    print(format_plan(result, job, args.deadline_h))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"job": asdict(job), "recommended": asdict(result.recommended) if result.recommended else None,
                       "reason": result.reason, "estimates": [asdict(e) for e in result.estimates]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
