"""Plan a Spot training job before paying for it: ``python -m raytrain_spot.cost.plan --help``.

Simulates one job (``strategy_sim``) under a preemption process (``spot_capacity``) for
all-on-demand, all-Spot and hybrid (k on-demand + n Spot) clusters in candidate regions, with
raytrain-spot's figures and plain Ray Train's beside them (``strategy_model``). It prints expected
wall time, goodput, cost and cost per step per configuration, and recommends the cheapest one
that meets the deadline, with its checkpoint interval (Young/Daly). ``--from-run RUN_DIR`` takes
the job's figures from a run's ``ledger.json`` and ``events.jsonl`` (``run_facts``) instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from raytrain_spot.checkpoint.advisor import young_interval
from raytrain_spot.cost.pricing import PriceCatalog, PriceNotFound
from raytrain_spot.cost.run_facts import RunFigures, measure_run
from raytrain_spot.cost.spot_capacity import Preemptions, load_trace, trace_mtbi_s
from raytrain_spot.cost.strategy_model import (DRAIN_MARGIN_S, GCE_NOTICE_S, HOUR, PLAIN, PLAIN_RECOVERY_S,
                                               PLAIN_REGROW_S, PRODUCT, PRODUCT_CHECKPOINT_S,
                                               PRODUCT_INTERVAL_BOUNDS_S, PRODUCT_JIT_S, PRODUCT_KILL_RECOVERY_S,
                                               PRODUCT_RECOVERY_S, ClusterShape, Job, interval_for,
                                               jit_complete_fraction, plain_ray_train, system_mtbi_s)
from raytrain_spot.cost.strategy_sim import RunOutcome, simulate_shape

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
