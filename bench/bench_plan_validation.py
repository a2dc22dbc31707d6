"""Does the planner pick what a trace would have made cheapest? Held-out validation on real Spot traces.

For every trace window used as a test, the planner is given parameters fitted on a *different*
window (the one before it in the same trace), and its recommendation is compared with what
replaying the test window says:

1. **fit** on window i: per-node MTBI = node-time alive / node losses, replacement delay = dead
   node-time / node losses (what ``--mtbi-hours`` / ``--replacement-s`` would be set to from
   that history); the trace mode (``--trace``) replays window i itself, looped, instead.
   Modes: ``exp_prev`` / ``trace_prev`` (window i), ``exp_history`` / ``trace_history`` (all of the
   trace before window j), and ``exp_in_sample`` (window j itself: not held out, a diagnostic that
   isolates the exponential model's own error);
2. **plan** with those: ``plan()`` over the shapes the CLI considers (all on-demand, all Spot,
   1..N-1 on-demand + the rest Spot), its recommendation = the cheapest meeting the deadline in
   ``confidence`` of its simulated runs;
3. **replay** every one of those shapes on window j = i + 1 with the same simulator
   (``simulate_run``): the job launched every ``--launch-every-h`` while its deadline still ends
   inside the window, ``--replays`` times per launch (which trace nodes a hybrid's Spot nodes
   follow, and which group member a drop hits, vary);
4. **compare**: the cheapest shape that met the deadline in ``confidence`` of those runs against
   the recommendation's replayed cost: gap = (recommended - cheapest) / cheapest. A recommendation
   that missed the deadline in the replay is a miss (no gap).

    python bench/bench_plan_validation.py                          # ~1-3 minutes on 2 cores
    python bench/bench_plan_validation.py --work-h 48 --deadline-h 72 --window-h 96 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from raytrain_spot.cost.plan import plan  # noqa: E402
from raytrain_spot.cost.pricing import PriceCatalog  # noqa: E402
from raytrain_spot.cost.spot_capacity import Preemptions, TraceReplay, load_trace, trace_mtbi_s  # noqa: E402
from raytrain_spot.cost.strategy_model import (  # noqa: E402
    GCE_NOTICE_S, PRODUCT_CHECKPOINT_S, PRODUCT_INTERVAL_BOUNDS_S, PRODUCT_JIT_S, PRODUCT_KILL_RECOVERY_S,
    PRODUCT_RECOVERY_S, ClusterShape, Job, interval_for)
from raytrain_spot.cost.strategy_sim import simulate_run  # noqa: E402

TRACES = os.path.join(REPO, "..", "shared", "traces")
DEFAULT_TRACES = [f"preemption__4-node__aws-08-03-2023__{zone}_v100_1.json"
                  for zone in ("us-east-1f", "us-east-2a", "us-west-2c")]
HOUR = 3600.0
MODES = ("exp_prev", "trace_prev", "exp_history", "trace_history", "exp_in_sample")


@dataclass
class Fit:
    mtbi_s: float
    replacement_s: float
    losses: int


def fit_window(counts: Sequence[int], tick_s: float, fleet: int) -> Fit:
    """Exponential-model parameters of a window: per-node MTBI and mean time a lost node stays lost."""
    losses = sum(max(0, a - b) for a, b in zip(counts, counts[1:]))
    alive_s = sum(counts) * tick_s
    dead_s = sum(fleet - c for c in counts) * tick_s
    if not losses:
        return Fit(1e12, 0.0, 0)
    return Fit(alive_s / losses, dead_s / losses, losses)


def product_job(steps: int, step_time_s: float, notice_s: float) -> Job:
    """raytrain-spot's job with the CLI's defaults (planner constants)."""
    return Job(steps, step_time_s, PRODUCT_CHECKPOINT_S, 60.0, PRODUCT_RECOVERY_S, notice_s=notice_s,
               jit_checkpoint=True, jit_s=PRODUCT_JIT_S, kill_recovery_s=PRODUCT_KILL_RECOVERY_S,
               interval_bounds_s=PRODUCT_INTERVAL_BOUNDS_S)


def shapes_for(gpu: str, nodes: int, hybrid: Sequence[int]) -> List[ClusterShape]:
    """The shapes the CLI considers (``--hybrid`` on-demand counts; its default is 1,2)."""
    mixes = [(nodes, 0), (0, nodes)] + [(k, nodes - k) for k in hybrid if 0 < k < nodes]
    return [ClusterShape(gpu, od, spot) for od, spot in dict.fromkeys(mixes)]


def launches(window_ticks: int, tick_s: float, deadline_h: float, every_h: float) -> List[int]:
    """Start ticks of the replayed launches: every ``every_h`` while the deadline still ends inside the window."""
    last = window_ticks - math.ceil(deadline_h * HOUR / tick_s)
    if last < 0:
        raise ValueError(f"a window of {window_ticks * tick_s / HOUR:g} h cannot hold the {deadline_h:g} h deadline")
    every = max(1, round(every_h * HOUR / tick_s))
    return list(range(0, last + 1, every))


def replay(job: Job, shape: ClusterShape, window: Sequence[int], tick_s: float, fleet: int,
           catalog: PriceCatalog, region: str, deadline_h: float, starts: Sequence[int], replays: int,
           seed: int) -> Dict[str, float]:
    """The shape on the test window, launched at each of ``starts`` (``replays`` draws of which trace nodes a
    smaller Spot group follows, and which member a drop hits): mean cost, share of runs on time."""
    mtbi = trace_mtbi_s(window, tick_s)  # the advisor adapts its interval to what it observes
    interval = interval_for(job, mtbi if not math.isinf(mtbi) else 1e12, shape.spot_nodes)
    od = shape.node_usd_per_hour(catalog, "on_demand", region) if shape.on_demand_nodes else 0.0
    spot = shape.node_usd_per_hour(catalog, "spot", region) if shape.spot_nodes else 0.0
    costs, on_time, walls = [], 0, []
    for start in starts if shape.spot_nodes else starts[:1]:
        for r in range(replays if shape.spot_nodes else 1):
            rng = random.Random(f"replay/{seed}/{start}/{r}")
            # offset into the window; the horizon (the deadline) ends inside it, so it never loops
            capacity = TraceReplay(window, tick_s, shape.spot_nodes, offset_s=start * tick_s,
                                   rng=random.Random(f"replay/{seed}/{start}/{r}/streams"), fleet=fleet)
            outcome = simulate_run(job, shape, interval, capacity, rng, horizon_s=deadline_h * HOUR)
            on_time += outcome.finished
            walls.append(outcome.wall_s / HOUR)
            costs.append(shape.on_demand_nodes * od * outcome.wall_s / HOUR + spot * outcome.spot_node_s / HOUR)
    n = len(costs)
    return {"cost_usd": statistics.fmean(costs), "on_time": on_time / n, "wall_h": statistics.fmean(walls), "runs": n}


def validate_pair(name: str, counts: Sequence[int], tick_s: float, fleet: int, fit_ticks: range, test_ticks: range,
                  args, catalog: PriceCatalog, modes: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """One held-out comparison: plan from the fit window (each of ``modes``), replay on the test window."""
    fit_window_counts = counts[fit_ticks.start:fit_ticks.stop]
    test_window = counts[test_ticks.start:test_ticks.stop]
    steps = round(args.work_h * HOUR / args.step_time_s)
    job = product_job(steps, args.step_time_s, args.notice_s)
    shapes = shapes_for(args.gpu, fleet, [int(k) for k in args.hybrid.split(",") if k.strip()])
    fit = fit_window(fit_window_counts, tick_s, fleet)
    starts = launches(len(test_window), tick_s, args.deadline_h, args.launch_every_h)
    truth = {s.name: replay(job, s, test_window, tick_s, fleet, catalog, args.region, args.deadline_h, starts,
                            args.replays, args.seed) for s in shapes}
    feasible = {k: v for k, v in truth.items() if v["on_time"] >= args.confidence}
    cheapest = min(feasible, key=lambda k: feasible[k]["cost_usd"]) if feasible else None
    row: Dict[str, object] = {
        "trace": name, "fit_hours": [round(fit_ticks.start * tick_s / HOUR), round(fit_ticks.stop * tick_s / HOUR)],
        "test_hours": [round(test_ticks.start * tick_s / HOUR), round(test_ticks.stop * tick_s / HOUR)],
        "fit": {"mtbi_h": round(fit.mtbi_s / HOUR, 2), "replacement_h": round(fit.replacement_s / HOUR, 2),
                "losses": fit.losses},
        "test_losses": sum(max(0, a - b) for a, b in zip(test_window, test_window[1:])),
        "test_spot_availability": round(sum(test_window) / (fleet * len(test_window)), 3),
        "replay": {k: {m: round(x, 3) for m, x in v.items()} for k, v in truth.items()},
        "cheapest_feasible": cheapest,
        "cheapest_cost_usd": round(feasible[cheapest]["cost_usd"], 2) if cheapest else None,
    }
    history = fit_window(counts[:test_ticks.start], tick_s, fleet)
    own = fit_window(test_window, tick_s, fleet)
    planners = {
        # held out: what a user has before the test window
        "exp_prev": Preemptions(mtbi_s=fit.mtbi_s, replacement_s=fit.replacement_s),
        "trace_prev": Preemptions(trace=(tuple(fit_window_counts), tick_s), trace_fleet=fleet),
        "exp_history": Preemptions(mtbi_s=history.mtbi_s, replacement_s=history.replacement_s),
        "trace_history": Preemptions(trace=(tuple(counts[:test_ticks.start]), tick_s), trace_fleet=fleet),
        # not held out: the test window's own figures, which isolates the planner's model error
        "exp_in_sample": Preemptions(mtbi_s=own.mtbi_s, replacement_s=own.replacement_s),
    }
    for key, value in (("fit_history", history), ("fit_in_sample", own)):
        row[key] = {"mtbi_h": round(value.mtbi_s / HOUR, 2), "replacement_h": round(value.replacement_s / HOUR, 2)}
    for mode in modes or MODES:
        preemptions = planners[mode]
        result = plan(job, shapes, [args.region], catalog, preemptions, args.replications, args.seed,
                              args.deadline_h, args.confidence)
        pick = result.recommended
        entry: Dict[str, object] = {"pick": pick.config if pick else None,
                                    "predicted_cost_usd": round(pick.cost_usd, 2) if pick else None}
        if pick:
            actual = truth[pick.config]
            entry["replayed_cost_usd"] = round(actual["cost_usd"], 2)
            entry["met_deadline_in_replay"] = actual["on_time"] >= args.confidence
            entry["gap"] = (round(actual["cost_usd"] / feasible[cheapest]["cost_usd"] - 1, 4)
                            if cheapest and entry["met_deadline_in_replay"] else None)
        row[mode] = entry
    return row


def windows(length: int, window_ticks: int, pairs: Optional[int]) -> List[tuple]:
    """Consecutive windows; each (fit = window i, test = window i + 1)."""
    starts = list(range(0, length - window_ticks + 1, window_ticks))
    out = [(range(a, a + window_ticks), range(b, b + window_ticks)) for a, b in zip(starts, starts[1:])]
    return out[:pairs] if pairs else out


def run(args) -> List[Dict[str, object]]:
    catalog = PriceCatalog.load()
    rows = []
    for name in args.traces:
        counts, tick_s = load_trace(os.path.join(args.trace_dir, name))
        fleet = max(counts)
        window_ticks = round(args.window_h * HOUR / tick_s)
        for fit_ticks, test_ticks in windows(len(counts), window_ticks, args.pairs_per_trace):
            rows.append(validate_pair(name, counts, tick_s, fleet, fit_ticks, test_ticks, args, catalog))
    return rows


SHORT = {"1 on-demand + 3 spot": "1od+3s", "2 on-demand + 2 spot": "2od+2s", "3 on-demand + 1 spot": "3od+1s",
         "4 spot": "4s", "4 on-demand": "4od", "None": "none"}


def _short(config) -> str:
    return SHORT.get(str(config), str(config).replace(" on-demand + ", "od+").replace(" spot", "s")
                     .replace(" on-demand", "od"))


def summarise(rows: Sequence[Dict[str, object]], target: float) -> str:
    head = f"{'trace':<11} {'fit h':>9} {'test h':>9} {'avail':>6} {'cheapest':>8} {'$':>5}"
    for mode in MODES:
        head += f" | {mode:<13} {'$':>5} {'gap':>6}"
    lines = [head]
    for r in rows:
        zone = str(r["trace"]).split("__")[-1].split("_")[0]
        cells = []
        for mode in MODES:
            e = r[mode]
            gap = ("miss" if e.get("met_deadline_in_replay") is False else
                   "-" if e.get("gap") is None else f"{e['gap']:+.0%}")
            cells.append(f"{_short(e['pick']):<13} {e.get('replayed_cost_usd') or 0:5.0f} {gap:>6}")
        fit, test = r["fit_hours"], r["test_hours"]
        lines.append(f"{zone:<11} {fit[0]:>4}-{fit[1]:<4} {test[0]:>4}-{test[1]:<4} {r['test_spot_availability']:6.0%} "
                     f"{_short(r['cheapest_feasible']):>8} {r['cheapest_cost_usd'] or 0:5.0f} | " + " | ".join(cells))
    for mode in MODES:
        gaps = [r[mode]["gap"] for r in rows if r[mode].get("gap") is not None]
        misses = sum(1 for r in rows if r[mode].get("met_deadline_in_replay") is False)
        within = sum(1 for g in gaps if g <= target)
        lines.append(f"{mode}: within {target:.0%} on {within} of {len(rows)} windows; misses {misses}; "
                     + (f"median gap {statistics.median(gaps):+.1%}, worst {max(gaps):+.1%}" if gaps else "no gaps"))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace-dir", default=TRACES)
    parser.add_argument("--traces", nargs="+", default=DEFAULT_TRACES)
    parser.add_argument("--gpu", default="v100", help="the traces' GPU")
    parser.add_argument("--region", default="us-central1")
    parser.add_argument("--hybrid", default="1,2", help="on-demand counts of the hybrid shapes (the CLI's default)")
    parser.add_argument("--window-h", type=float, default=72.0)
    parser.add_argument("--pairs-per-trace", type=int, default=None, help="fit/test pairs per trace (default all)")
    parser.add_argument("--work-h", type=float, default=24.0, help="the job's work on the full cluster")
    parser.add_argument("--step-time-s", type=float, default=3.6)
    parser.add_argument("--deadline-h", type=float, default=36.0)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--notice-s", type=float, default=GCE_NOTICE_S)
    parser.add_argument("--replications", type=int, default=100, help="planner runs per shape")
    parser.add_argument("--launch-every-h", type=float, default=3.0,
                        help="replayed launches on the test window: one every this many hours")
    parser.add_argument("--replays", type=int, default=3, help="replays per launch (node streams drawn)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.05)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    rows = run(args)
    print(summarise(rows, args.target))
    print(f"job: {args.work_h:g} h of work on {args.gpu} x nodes of the trace, deadline {args.deadline_h:g} h, "
          f"confidence {args.confidence:g}, windows of {args.window_h:g} h; {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
