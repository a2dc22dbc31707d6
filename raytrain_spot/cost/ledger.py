"""The goodput and cost ledger of a run, built from its ``events.jsonl``.

Wall time is cut into segments, each in exactly one category (after Google's
ml-goodput-measurement). Timed records paint the time they measured; the time between them
gets a category from what happened around it. When painted intervals overlap, the instant goes
to the first category in ``PRIORITY``. ``docs/goodput-and-cost.md`` defines each category and
every key of ``ledger.json``.

``python -m raytrain_spot.cost.ledger RUN_DIR`` rebuilds ledger.json and ledger.png and prints the table.
"""

from __future__ import annotations

import json
import logging
import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from raytrain_spot.observe.events import EVENTS_FILE, iter_events
from raytrain_spot.cost.live import RunningTotals
from raytrain_spot.checkpoint.advisor import daly_interval
from raytrain_spot.cost.plot import plot_ledger
from raytrain_spot.cost.pricing import PriceCatalog, PriceNotFound

logger = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
PLOT_FILE = "ledger.png"
FORMAT = 1

PRODUCTIVE = "productive"
STARTUP = "program_startup"
DATA = "data_loading"
SAVE = "checkpoint_save"
RESTORE = "checkpoint_restore"
WASTED = "wasted_progress"
RECOVERY = "infrastructure_recovery"
WAITING = "waiting_for_capacity"
OTHER = "other"

CATEGORIES = (PRODUCTIVE, STARTUP, DATA, SAVE, RESTORE, WASTED, RECOVERY, WAITING, OTHER)
# Strongest first: a stall measured inside a step is a stall, a step inside a recovery window is work.
PRIORITY = (SAVE, RESTORE, DATA, WASTED, PRODUCTIVE, WAITING, RECOVERY, STARTUP, OTHER)
_RANK = {category: rank for rank, category in enumerate(PRIORITY)}
DISRUPTIONS = ("kill", "notice")


@dataclass
class LedgerOptions:
    """What the event log cannot tell the ledger by itself."""

    min_workers: Optional[int] = None
    """Fewest workers a group trains with (``trainer.min_workers``); unset: the ``start`` record's
    ``min_workers`` field, else 1. Below it, non-training time counts as waiting for capacity."""
    head_node_types: List[str] = field(default_factory=lambda: ["local-head", "head"])
    """Node types that never host a training worker. Other nodes hold one worker per GPU, or one
    per node in a run where no node has a GPU."""
    region: Optional[str] = None
    """Region to price in; unset: the catalog's default region."""


@dataclass(frozen=True)
class Segment:
    """A stretch of wall time in one category."""

    start: float
    end: float
    category: str

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Ledger:
    """The ledger: ``summary`` is what ``ledger.json`` holds, the rest feeds the plot."""

    summary: Dict[str, Any]
    segments: List[Segment]
    sessions: List[Tuple[float, float]]
    cost_curve: List[Tuple[float, float]] = field(default_factory=list)
    """(unix time, dollars so far) at every record; cost grows linearly in between."""
    spot_nodes_curve: List[Tuple[float, int]] = field(default_factory=list)
    world_size_curve: List[Tuple[float, int]] = field(default_factory=list)
    """(unix time, training world size), 0 while no group trains."""
    preemption_times: List[float] = field(default_factory=list)

    def goodput_curve(self) -> List[Tuple[float, float]]:
        """Productive time over wall time so far, at every segment boundary (time between sessions excluded)."""
        points, wall, productive = [], 0.0, 0.0
        for segment in self.segments:
            wall += segment.seconds
            productive += segment.seconds if segment.category == PRODUCTIVE else 0.0
            points.append((segment.end, productive / wall if wall > 0 else 0.0))
        return points


# Sessions -----------------------------------------------------------------------------------------

def _records_by_session(events: Sequence[Dict[str, Any]], count: int) -> List[List[Dict[str, Any]]]:
    """Records of each session, by the same rule as RunningTotals: ``start`` opens, ``end`` closes."""
    sessions: List[List[Dict[str, Any]]] = []
    closed = True
    for record in events:
        if record["ev"] == "start" or not sessions:
            sessions.append([])
            closed = False
        if not closed:
            sessions[-1].append(record)
        if record["ev"] == "end":
            closed = True
    return sessions[:count]


# The wall-time partition ------------------------------------------------------------------------

def _wasted_step_records(events: Sequence[Dict[str, Any]]) -> set:
    """ids of step records whose step number was executed again later (after a restore)."""
    last_execution: Dict[int, int] = {}
    for record in events:
        if record["ev"] == "step":
            last_execution[int(record["step"])] = id(record)
    return {id(r) for r in events if r["ev"] == "step" and last_execution[int(r["step"])] != id(r)}


def _capacity(node: Dict[str, Any], gpu_run: bool, head_types: Sequence[str]) -> float:
    gpus = float(node.get("gpus") or 0)
    if gpus > 0:
        return gpus
    return 0.0 if gpu_run or node.get("node_type") in head_types else 1.0


def _low_capacity(records: Sequence[Dict[str, Any]], start: float, end: float, min_workers: int,
                  gpu_run: bool, head_types: Sequence[str]) -> List[Tuple[float, float]]:
    """Intervals of the session in which the alive nodes could not hold ``min_workers`` workers.

    A session without ``add`` records says nothing about capacity: no interval then.
    """
    if not any(r["ev"] == "add" for r in records):
        return []
    alive: Dict[str, float] = {}
    intervals: List[Tuple[float, float]] = []
    low_since: Optional[float] = start
    for record in records:
        if record["ev"] == "add":
            alive[record["node"]] = _capacity(record, gpu_run, head_types)
        elif record["ev"] in ("kill", "remove"):
            alive.pop(record["node"], None)
        else:
            continue
        low = sum(alive.values()) < min_workers
        if low and low_since is None:
            low_since = float(record["t"])
        elif not low and low_since is not None:
            intervals.append((low_since, float(record["t"])))
            low_since = None
    if low_since is not None:
        intervals.append((low_since, end))
    return intervals


def _step_span(record: Dict[str, Any]) -> Tuple[float, float]:
    t = float(record["t"])
    return t - float(record.get("duration_s") or 0.0), t


def _gap_intervals(records: Sequence[Dict[str, Any]], start: float, end: float) -> List[Tuple[float, float, str]]:
    """Startup and recovery windows of one session: the time around steps that has a cause."""
    step_positions = [i for i, r in enumerate(records) if r["ev"] == "step"]
    first = step_positions[0] if step_positions else len(records)
    startup_end = _step_span(records[first])[0] if step_positions else end
    disrupted = next((float(r["t"]) for r in records[:first] if r["ev"] in DISRUPTIONS), None)
    intervals = [(start, disrupted if disrupted is not None else startup_end, STARTUP)]
    if disrupted is not None:
        intervals.append((disrupted, startup_end, RECOVERY))
    for before, after in zip(step_positions, step_positions[1:]):
        if any(r["ev"] == "group" for r in records[before + 1:after]):
            intervals.append((_step_span(records[before])[1], _step_span(records[after])[0], RECOVERY))
    if step_positions:
        last = step_positions[-1]
        tail = records[last + 1:]
        if any(r["ev"] == "group" for r in tail):
            intervals.append((_step_span(records[last])[1], end, RECOVERY))
        else:
            disrupted = next((float(r["t"]) for r in tail if r["ev"] in DISRUPTIONS), None)
            if disrupted is not None:
                intervals.append((disrupted, end, RECOVERY))
    return intervals


def _measured_intervals(records: Sequence[Dict[str, Any]], wasted: set) -> List[Tuple[float, float, str]]:
    """What the timed records say they spent: steps, data loading, checkpoint stalls, restores."""
    intervals = []
    for record in records:
        ev, t = record["ev"], float(record["t"])
        if ev == "step":
            begin, finish = _step_span(record)
            if id(record) in wasted:
                intervals.append((begin, finish, WASTED))
                continue
            intervals.append((begin, finish, PRODUCTIVE))
            if record.get("data_s"):
                intervals.append((begin, begin + float(record["data_s"]), DATA))
        elif ev == "checkpoint":
            # The stall is the first part of the save (the snapshot); the upload may go on after it.
            duration = float(record.get("duration_s") or 0.0)
            stall = float(record.get("stall_s", duration) or 0.0)
            intervals.append((t - duration, t - duration + stall, SAVE))
        elif ev == "restore":
            intervals.append((t - float(record.get("duration_s") or 0.0), t, RESTORE))
    return intervals


def _intersect(a: Iterable[Tuple[float, float]], b: Iterable[Tuple[float, float]]) -> List[Tuple[float, float]]:
    b = list(b)
    return [(max(s1, s2), min(e1, e2)) for s1, e1 in a for s2, e2 in b if min(e1, e2) > max(s1, s2)]


def _sweep(intervals: Sequence[Tuple[float, float, str]], start: float, end: float) -> List[Segment]:
    """Tile [start, end] with segments, each instant taking the strongest category covering it."""
    edges: List[Tuple[float, int, int]] = [(start, +1, _RANK[OTHER]), (end, -1, _RANK[OTHER])]
    for begin, finish, category in intervals:
        begin, finish = max(begin, start), min(finish, end)
        if finish > begin:
            edges += [(begin, +1, _RANK[category]), (finish, -1, _RANK[category])]
    edges.sort()
    active = [0] * len(PRIORITY)
    segments: List[Segment] = []
    for (t, change, rank), (next_t, _, _) in zip(edges, edges[1:] + [(end, 0, 0)]):
        active[rank] += change
        if next_t > t:
            category = PRIORITY[next(r for r, n in enumerate(active) if n > 0)]
            if segments and segments[-1].category == category and segments[-1].end == t:
                segments[-1] = Segment(segments[-1].start, next_t, category)
            else:
                segments.append(Segment(t, next_t, category))
    return segments


def partition(events: Sequence[Dict[str, Any]], sessions: Sequence[Tuple[float, float]], min_workers: int,
              head_types: Sequence[str]) -> List[Segment]:
    """Every second of every session, in exactly one category."""
    wasted = _wasted_step_records(events)
    gpu_run = any(float(r.get("gpus") or 0) > 0 for r in events if r["ev"] == "add")
    segments: List[Segment] = []
    for (start, end), records in zip(sessions, _records_by_session(events, len(sessions))):
        windows = _gap_intervals(records, start, end)
        idle = [(s, e) for s, e, category in windows if category in (STARTUP, RECOVERY)]
        low = _low_capacity(records, start, end, min_workers, gpu_run, head_types)
        waiting = [(s, e, WAITING) for s, e in _intersect(idle, low)]
        segments += _sweep(windows + waiting + _measured_intervals(records, wasted), start, end)
    return segments


# Assembling the ledger ------------------------------------------------------------------------------

def _min_workers(events: Sequence[Dict[str, Any]], options: LedgerOptions) -> int:
    if options.min_workers is not None:
        return options.min_workers
    start = next((r for r in events if r["ev"] == "start" and "min_workers" in r), None)
    return int(start["min_workers"]) if start else 1


def _node_usage(totals: RunningTotals, now: float) -> List[Dict[str, Any]]:
    rows: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for span in totals.spans:
        row = rows.setdefault((span.node_type, span.pricing), {
            "node_type": span.node_type, "pricing": span.pricing, "nodes": 0, "node_hours": 0.0, "gpu_hours": 0.0,
            "cost_usd": 0.0, "on_demand_cost_usd": 0.0, "price_basis": None, "estimated": False, "notional": False})
        hours = span.seconds_within(span.start, now) / 3600.0
        row["nodes"] += 1
        row["node_hours"] += hours
        row["gpu_hours"] += hours * span.gpus
        for key, pricing in (("cost_usd", span.pricing), ("on_demand_cost_usd", "on_demand")):
            quote = totals.quote(span.node_type, pricing, span.gpus)
            if quote is not None:
                row[key] += quote.usd_per_hour * hours
                if pricing == span.pricing:
                    row["price_basis"] = quote.basis
                    row["estimated"] |= quote.estimated
                    row["notional"] |= quote.notional
    return sorted(rows.values(), key=lambda r: (r["node_type"], r["pricing"]))


def _checkpoint_figures(events: Sequence[Dict[str, Any]], wall_s: float, preemptions: int,
                        productive_s: float, completed_steps: int) -> Dict[str, Any]:
    stall_by_step: Dict[int, float] = {}
    periodic_at: Dict[int, float] = {}  # a checkpoint written to several tiers is one checkpoint
    for record in events:
        if record["ev"] == "checkpoint":
            stall = float(record.get("stall_s", record.get("duration_s")) or 0.0)
            stall_by_step[record["step"]] = max(stall, stall_by_step.get(record["step"], 0.0))
            if record.get("kind") == "periodic":
                periodic_at.setdefault(record["step"], float(record["t"]))
    periodic_times = sorted(periodic_at.values())
    restores = [float(r.get("duration_s") or 0.0) for r in events if r["ev"] == "restore"]
    mean_stall = sum(stall_by_step.values()) / len(stall_by_step) if stall_by_step else None
    gaps = [b - a for a, b in zip(periodic_times, periodic_times[1:])]
    mtbi = wall_s / preemptions if preemptions else None
    recommended = daly_interval(mean_stall, mtbi) if mean_stall is not None and mtbi is not None else None
    step_s = productive_s / completed_steps if completed_steps else None
    failures = [r.get("tier", "all") for r in events if r["ev"] == "checkpoint_failed"]
    return {
        "saves": len(stall_by_step),
        "failed_saves": {tier: failures.count(tier) for tier in sorted(set(failures))},
        "mean_stall_s": mean_stall,
        "restores": len(restores),
        "mean_restore_s": sum(restores) / len(restores) if restores else None,
        "observed_interval_s": sum(gaps) / len(gaps) if gaps else None,
        "observed_mtbi_s": mtbi,
        "recommended_interval_s": recommended,
        "recommended_interval_steps": (max(1, round(recommended / step_s))
                                       if recommended is not None and step_s else None),
    }


def build_ledger(events: Sequence[Dict[str, Any]], catalog: PriceCatalog,
                 options: Optional[LedgerOptions] = None) -> Ledger:
    """The ledger of a run from all of its event records."""
    options = options or LedgerOptions()
    totals = RunningTotals(catalog, options.region)
    cost_curve, spot_curve = [], []
    for record in events:
        totals.feed(record)
        cost_curve.append((totals.last_t, totals.cost_usd(totals.last_t)))
        spot_curve.append((totals.last_t, totals.alive_nodes("spot")))
    now = totals.last_t if totals.last_t is not None else 0.0
    sessions = [(start, now if end is None else end) for start, end in totals.sessions]
    wall_s = sum(end - start for start, end in sessions)
    segments = partition(events, sessions, _min_workers(events, options), options.head_node_types)
    seconds = {category: 0.0 for category in CATEGORIES}
    for segment in segments:
        seconds[segment.category] += segment.seconds

    preempted = totals.preemptions()
    step_records = [r for r in events if r["ev"] == "step"]
    wasted = _wasted_step_records(events)
    samples = sum(r["samples"][1] - r["samples"][0] for r in step_records if id(r) not in wasted)
    completed = totals.completed_steps()
    usage = _node_usage(totals, now)
    cost = sum(row["cost_usd"] for row in usage)
    on_demand_cost = sum(row["on_demand_cost_usd"] for row in usage)
    start_record = next((r for r in events if r["ev"] == "start"), {})
    summary = {
        "format": FORMAT,
        "run": start_record.get("run"),
        "sessions": [{"start": s, "end": e, "wall_time_s": e - s,
                      "status": status} for (s, e), status in zip(sessions, _statuses(events, len(sessions)))],
        "wall_time_s": wall_s,
        "between_sessions_s": sum((b[0] - a[1] for a, b in zip(sessions, sessions[1:])), 0.0),
        "goodput": seconds[PRODUCTIVE] / wall_s if wall_s > 0 else None,
        "time_s": seconds,
        "badput_s": {c: s for c, s in seconds.items() if c != PRODUCTIVE},
        "steps": {"completed": completed, "executions": len(step_records), "redone": totals.redone_steps},
        "samples": samples,
        "disruptions": {
            "preemptions": len(preempted),
            "with_notice": sum(1 for d in preempted if d.with_notice),
            "without_notice": sum(1 for d in preempted if not d.with_notice),
            "on_demand_losses": len(totals.disruptions) - len(preempted),
        },
        "node_usage": usage,
        "cost": {
            "region": options.region or catalog.default_region,
            "total_usd": cost,
            "on_demand_equivalent_usd": on_demand_cost,
            "savings_usd": on_demand_cost - cost,
            "savings_fraction": (on_demand_cost - cost) / on_demand_cost if on_demand_cost else None,
            "per_step_usd": cost / completed if completed else None,
            "per_1k_samples_usd": 1000.0 * cost / samples if samples else None,
            "estimated": any(row["estimated"] for row in usage),
            "notional": any(row["notional"] for row in usage),
            "unpriced_node_types": sorted({node_type for node_type, _ in totals.unpriced}),
        },
        "checkpoints": _checkpoint_figures(events, wall_s, len(preempted), totals.productive_s, completed),
    }
    return Ledger(summary, segments, sessions, cost_curve, spot_curve, _world_size_curve(events, segments, sessions),
                  sorted(d.t for d in preempted))


def _statuses(events: Sequence[Dict[str, Any]], count: int) -> List[str]:
    """Each session's ``end`` status, or ``interrupted`` when the driver never wrote one."""
    return [next((r.get("status", "finished") for r in records if r["ev"] == "end"), "interrupted")
            for records in _records_by_session(events, count)]


def _world_size_curve(events: Sequence[Dict[str, Any]], segments: Sequence[Segment],
                      sessions: Sequence[Tuple[float, float]]) -> List[Tuple[float, int]]:
    points = [(_step_span(r)[0], int(r["world_size"])) for r in events if r["ev"] == "step"]
    idle = [(s.start, 0) for s in segments if s.category in (STARTUP, RECOVERY, WAITING)]
    return sorted(points + idle + [(end, 0) for _, end in sessions])


# Output -----------------------------------------------------------------------------------------------

def _fmt(value: Optional[float], spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(summary: Dict[str, Any]) -> str:
    """The ledger as a table for the end of a run."""
    wall = summary["wall_time_s"]
    lines = [f"== goodput and cost ({summary['run'] or 'run'}) ==",
             f"{'category':<26}{'seconds':>12}{'share':>9}"]
    for category, seconds in summary["time_s"].items():
        lines.append(f"{category:<26}{seconds:12.1f}{_fmt(seconds / wall if wall else None, '9.1%')}")
    lines.append(f"{'wall time':<26}{wall:12.1f}{'100.0%' if wall else '-':>9}")
    if summary["between_sessions_s"]:
        lines.append(f"(not counted: {summary['between_sessions_s']:.1f} s between sessions)")
    d = summary["disruptions"]
    lines += [f"goodput {_fmt(summary['goodput'], '.1%')} | steps {summary['steps']['completed']} "
              f"({summary['steps']['redone']} redone) | preemptions {d['preemptions']} "
              f"({d['with_notice']} with notice)"
              + (f" | failed saves {summary['checkpoints']['failed_saves']}"
                 if summary["checkpoints"]["failed_saves"] else ""),
              f"{'node type':<20}{'pricing':<11}{'nodes':>6}{'node-h':>10}{'cost $':>11}{'on-demand $':>13}"]
    for row in summary["node_usage"]:
        lines.append(f"{row['node_type']:<20}{row['pricing']:<11}{row['nodes']:>6}{row['node_hours']:10.3f}"
                     f"{row['cost_usd']:11.4f}{row['on_demand_cost_usd']:13.4f}")
    cost = summary["cost"]
    label = " (notional: local stand-in prices)" if cost["notional"] else ""
    lines.append(f"cost ${cost['total_usd']:.4f}{label} in {cost['region']} | per step "
                 f"${_fmt(cost['per_step_usd'], '.6f')} | per 1k samples ${_fmt(cost['per_1k_samples_usd'], '.4f')} | "
                 f"saved ${cost['savings_usd']:.4f} ({_fmt(cost['savings_fraction'], '.0%')}) vs on-demand")
    if cost["unpriced_node_types"]:
        lines.append(f"not priced (add them to a price file): {', '.join(cost['unpriced_node_types'])}")
    advice = summary["checkpoints"]
    if advice["recommended_interval_s"] is not None:
        lines.append(f"checkpoint interval: observed {_fmt(advice['observed_interval_s'], '.1f')} s, Young/Daly "
                     f"{advice['recommended_interval_s']:.1f} s (~{advice['recommended_interval_steps']} steps) for a "
                     f"{advice['mean_stall_s']:.2f} s stall and an MTBI of {advice['observed_mtbi_s']:.0f} s")
    return "\n".join(lines)


def write_ledger(run_dir: str, catalog: Optional[PriceCatalog] = None, options: Optional[LedgerOptions] = None,
                 plot: bool = True) -> Dict[str, Any]:
    """Build the ledger from ``RUN_DIR/events.jsonl``; write ``ledger.json`` (and ``ledger.png``); return it."""
    events = list(ledger_records(os.path.join(run_dir, EVENTS_FILE)))
    ledger = build_ledger(events, catalog or PriceCatalog.load(), options)
    with open(os.path.join(run_dir, LEDGER_FILE), "w") as f:
        json.dump(ledger.summary, f, indent=1)
    if plot:
        plot_ledger(ledger, os.path.join(run_dir, PLOT_FILE))
    s = ledger.summary
    logger.info("ledger: goodput %s over %.1f s, %d preemptions, cost $%.4f (saved $%.4f vs on-demand)",
                _fmt(s["goodput"], ".3f"), s["wall_time_s"], s["disruptions"]["preemptions"],
                s["cost"]["total_usd"], s["cost"]["savings_usd"])
    return s

# What the ledger reads of a record: per-step records are most of a long run's log, so only these stay.
_STEP_FIELDS = ("t", "ev", "step", "world_size", "samples", "duration_s", "data_s")


def ledger_records(events_path: str) -> Iterator[Dict[str, Any]]:
    """The log's records as the ledger needs them, read in one pass: the ``samples`` audit records
    (a rank's sample ids of a step) are left out and a ``step`` record keeps only what the ledger
    reads, so the records held take a fraction of the log's size."""
    for record in iter_events(events_path):
        if record["ev"] == "step":
            yield {key: record[key] for key in _STEP_FIELDS if key in record}
        elif record["ev"] != "samples":
            yield record


def _configured_min_workers(run_dir: str) -> Optional[int]:
    """``trainer.min_workers`` from the Hydra config saved in the run directory, if there is one."""
    path = os.path.join(run_dir, ".hydra", "config.yaml")
    if not os.path.exists(path):
        return None
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    value = (config.get("trainer") or {}).get("min_workers")
    return int(value) if value is not None else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.cost.ledger", description=__doc__)
    parser.add_argument("run_dir", help="a run directory holding events.jsonl")
    parser.add_argument("--prices", default=None, help="user price file (JSON or YAML) merged over the catalog")
    parser.add_argument("--region", default=None, help="region to price in (default: the catalog's)")
    parser.add_argument("--min-workers", type=int, default=None,
                        help="trainer.min_workers (default: the run's saved Hydra config, else 1)")
    parser.add_argument("--no-plot", action="store_true", help="skip ledger.png")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.run_dir, EVENTS_FILE)):
        print(f"{args.run_dir}: no {EVENTS_FILE} here; pass the run directory (outputs/<run.name>)", file=sys.stderr)
        return 2
    try:
        catalog = PriceCatalog.load(args.prices)
    except (OSError, ValueError, PriceNotFound) as error:
        print(f"price file {args.prices}: {error}", file=sys.stderr)
        return 2
    min_workers = args.min_workers if args.min_workers is not None else _configured_min_workers(args.run_dir)
    summary = write_ledger(args.run_dir, catalog, LedgerOptions(min_workers=min_workers, region=args.region),
                           plot=not args.no_plot)
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
