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
import bisect
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from raytrain_spot.observe.events import EVENTS_FILE, iter_events
from raytrain_spot.observe.records import (Add, Checkpoint, CheckpointFailed, End, Group, Kill, Notice, Remove, Restore,
                                          Samples, Start, Step)
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
DISRUPTIONS = (Kill.ev, Notice.ev)


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
    """The ledger: ``summary`` is what ``ledger.json`` holds, the rest feeds the plot.

    The curves hold the points a line through them needs: a point the curve's line (or step)
    through its neighbours already passes is left out, so they stay small however long the run."""

    summary: Dict[str, Any]
    sessions: List[Tuple[float, float]]
    cost_curve: List[Tuple[float, float]] = field(default_factory=list)
    """(unix time, dollars so far); cost grows linearly in between."""
    spot_nodes_curve: List[Tuple[float, int]] = field(default_factory=list)
    world_size_curve: List[Tuple[float, int]] = field(default_factory=list)
    """(unix time, training world size), 0 while no group trains."""
    preemption_times: List[float] = field(default_factory=list)
    goodput_curve: List[Tuple[float, float]] = field(default_factory=list)
    """Productive time over wall time so far at segment boundaries (time between sessions excluded),
    at most about ``GOODPUT_POINTS`` of them, evenly spread over the segments."""


GOODPUT_POINTS = 2000
# Records per block of the log whose earliest timed instant the first pass notes: the partition
# settles the time before the later blocks' earliest instant and forgets the intervals it is done with.
BLOCK = 4096


class _LineCurve:
    """Points of a piecewise-linear curve, leaving out a point on the line through its neighbours."""

    def __init__(self) -> None:
        self.points: List[Tuple[float, float]] = []

    def add(self, t: float, value: float) -> None:
        if len(self.points) >= 2:
            (t1, v1), (t2, v2) = self.points[-2], self.points[-1]
            slack = 1e-9 * max(abs(v1), abs(value), 1e-12) * abs(t - t1)
            if t1 <= t2 <= t and abs((v2 - v1) * (t - t1) - (value - v1) * (t2 - t1)) <= slack:
                self.points[-1] = (t, value)
                return
        self.points.append((t, value))


class _StepCurve:
    """Points of a curve drawn as steps, leaving out a point that repeats the value before it within
    a run of points (``break_run`` ends one: points of another curve may fall between them)."""

    def __init__(self) -> None:
        self.points: List[Tuple[float, int]] = []
        self._run = 0  # points of the current run

    def add(self, t: float, value: int) -> None:
        if self._run >= 2 and self.points[-2][1] == self.points[-1][1] == value and self.points[-1][0] <= t:
            self.points[-1] = (t, value)
        else:
            self.points.append((t, value))
            self._run += 1

    def break_run(self) -> None:
        self._run = 0


# Sessions -----------------------------------------------------------------------------------------

def _by_session(events: Iterable[Dict[str, Any]]) -> Iterator[Tuple[Optional[int], Dict[str, Any]]]:
    """(session index, record), by the same rule as RunningTotals: ``start`` opens, ``end`` closes;
    None for a record between an ``end`` and the next ``start``."""
    index, closed = -1, True
    for record in events:
        if record["ev"] == Start.ev or index < 0:
            index, closed = index + 1, False
        yield (None if closed else index), record
        if record["ev"] == End.ev:
            closed = True


# Re-executed steps ----------------------------------------------------------------------------------

class _Reexecutions:
    """Which step records (counted from 0 in log order) were executed again later, in one pass.

    Holds the latest execution of every step number as runs of consecutive steps executed one after
    another, and the wasted executions as runs of consecutive record numbers: both a handful for a
    run whose restarts redo a stretch of steps, however many steps it takes."""

    def __init__(self) -> None:
        self._latest: List[List[int]] = []  # [first step, last step, record number of the first], by first step
        self._wasted: List[List[int]] = []  # [first record number, last record number]
        self.executions = 0

    def add(self, step: int) -> None:
        number = self.executions
        self.executions += 1
        at = bisect.bisect_right(self._latest, [step, math.inf]) - 1
        if at >= 0 and self._latest[at][0] <= step <= self._latest[at][1]:
            first, last, origin = self._latest.pop(at)
            self._note_wasted(origin + step - first)
            if step < last:
                self._latest.insert(at, [step + 1, last, origin + step + 1 - first])
            if first < step:
                self._latest.insert(at, [first, step - 1, origin])
        at = bisect.bisect_right(self._latest, [step, math.inf]) - 1
        if at >= 0 and self._latest[at][1] == step - 1 and self._latest[at][2] + step - self._latest[at][0] == number:
            self._latest[at][1] = step
        else:
            self._latest.insert(at + 1, [step, step, number])

    def _note_wasted(self, number: int) -> None:
        if self._wasted and self._wasted[-1][1] == number - 1:
            self._wasted[-1][1] = number
        else:
            self._wasted.append([number, number])

    def wasted_runs(self) -> List[Tuple[int, int]]:
        """The wasted record numbers as sorted, disjoint, inclusive runs."""
        runs: List[Tuple[int, int]] = []
        for first, last in sorted(self._wasted):
            if runs and first <= runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], max(runs[-1][1], last))
            else:
                runs.append((first, last))
        return runs


class _WastedLookup:
    """Answers, for step records in log order, whether each one is wasted."""

    def __init__(self, runs: List[Tuple[int, int]]) -> None:
        self._runs, self._at, self._number = runs, 0, -1

    def next_is_wasted(self) -> bool:
        self._number += 1
        while self._at < len(self._runs) and self._runs[self._at][1] < self._number:
            self._at += 1
        return self._at < len(self._runs) and self._runs[self._at][0] <= self._number


# The first pass: what the partition needs to know ahead ---------------------------------------------

class _CheckpointTally:
    """The checkpoint records' figures, folded one record at a time."""

    def __init__(self) -> None:
        self.stall_by_step: Dict[int, float] = {}
        self.periodic_at: Dict[int, float] = {}  # a checkpoint written to several tiers is one checkpoint
        self.restores, self.restore_s = 0, 0.0
        self.failures: Dict[str, int] = {}

    def feed(self, record: Dict[str, Any]) -> None:
        if record["ev"] == Checkpoint.ev:
            stall = float(record.get("stall_s", record.get("duration_s")) or 0.0)
            self.stall_by_step[record["step"]] = max(stall, self.stall_by_step.get(record["step"], 0.0))
            if record.get("kind") == "periodic":
                self.periodic_at.setdefault(record["step"], float(record["t"]))
        elif record["ev"] == Restore.ev:
            self.restores += 1
            self.restore_s += float(record.get("duration_s") or 0.0)
        elif record["ev"] == CheckpointFailed.ev:
            tier = record.get("tier", "all")
            self.failures[tier] = self.failures.get(tier, 0) + 1

    def figures(self, wall_s: float, preemptions: int, productive_s: float, completed_steps: int) -> Dict[str, Any]:
        periodic_times = sorted(self.periodic_at.values())
        stalls = self.stall_by_step
        mean_stall = sum(stalls.values()) / len(stalls) if stalls else None
        gaps = [b - a for a, b in zip(periodic_times, periodic_times[1:])]
        mtbi = wall_s / preemptions if preemptions else None
        recommended = daly_interval(mean_stall, mtbi) if mean_stall is not None and mtbi is not None else None
        step_s = productive_s / completed_steps if completed_steps else None
        return {
            "saves": len(stalls),
            "failed_saves": {tier: self.failures[tier] for tier in sorted(self.failures)},
            "mean_stall_s": mean_stall,
            "restores": self.restores,
            "mean_restore_s": self.restore_s / self.restores if self.restores else None,
            "observed_interval_s": sum(gaps) / len(gaps) if gaps else None,
            "observed_mtbi_s": mtbi,
            "recommended_interval_s": recommended,
            "recommended_interval_steps": (max(1, round(recommended / step_s))
                                           if recommended is not None and step_s else None),
        }


def _earliest_instant(record: Dict[str, Any]) -> Optional[float]:
    """The earliest instant a record can open an interval of the partition at."""
    ev, t = record["ev"], float(record["t"])
    if ev in (Step.ev, Checkpoint.ev, Restore.ev):
        return t - float(record.get("duration_s") or 0.0)
    return t if ev in (Add.ev, Kill.ev, Remove.ev, Notice.ev) else None


@dataclass
class _Scan:
    """What one pass over the log gathers before the partition's pass."""

    totals: RunningTotals
    cost_curve: _LineCurve = field(default_factory=_LineCurve)
    spot_curve: _StepCurve = field(default_factory=_StepCurve)
    reexecutions: _Reexecutions = field(default_factory=_Reexecutions)
    checkpoints: _CheckpointTally = field(default_factory=_CheckpointTally)
    block_earliest: List[float] = field(default_factory=list)
    """Per block of BLOCK records, then made the earliest instant of that block and every later one."""
    statuses: List[str] = field(default_factory=list)
    with_adds: List[bool] = field(default_factory=list)
    """Per session: whether it has ``add`` records (else it says nothing about capacity)."""
    start_record: Dict[str, Any] = field(default_factory=dict)
    min_workers: Optional[int] = None
    gpu_run: bool = False


def _scan(events: Iterable[Dict[str, Any]], catalog: PriceCatalog, region: Optional[str]) -> _Scan:
    scan = _Scan(RunningTotals(catalog, region))
    totals = scan.totals
    for number, (session, record) in enumerate(_by_session(events)):
        totals.feed(record)
        scan.cost_curve.add(totals.last_t, totals.cost_usd(totals.last_t))
        scan.spot_curve.add(totals.last_t, totals.alive_nodes("spot"))
        ev = record["ev"]
        if ev == Step.ev:
            scan.reexecutions.add(int(record["step"]))
        scan.checkpoints.feed(record)
        if number % BLOCK == 0:
            scan.block_earliest.append(math.inf)
        earliest = _earliest_instant(record)
        if earliest is not None:
            scan.block_earliest[-1] = min(scan.block_earliest[-1], earliest)
        if session is not None and session == len(scan.statuses):
            scan.statuses.append("interrupted")
            scan.with_adds.append(False)
        if session is not None and ev == End.ev:  # it closes the session: its only end record
            scan.statuses[session] = record.get("status", "finished")
        if session is not None and ev == Add.ev:
            scan.with_adds[session] = True
        if ev == Start.ev and not scan.start_record:
            scan.start_record = record
        if ev == Start.ev and "min_workers" in record and scan.min_workers is None:
            scan.min_workers = int(record["min_workers"])
        scan.gpu_run |= ev == Add.ev and float(record.get("gpus") or 0) > 0
    for block in range(len(scan.block_earliest) - 2, -1, -1):
        scan.block_earliest[block] = min(scan.block_earliest[block], scan.block_earliest[block + 1])
    return scan


# The wall-time partition ------------------------------------------------------------------------

def _capacity(node: Dict[str, Any], gpu_run: bool, head_types: Sequence[str]) -> float:
    gpus = float(node.get("gpus") or 0)
    if gpus > 0:
        return gpus
    return 0.0 if gpu_run or node.get("node_type") in head_types else 1.0


def _step_span(record: Dict[str, Any]) -> Tuple[float, float]:
    t = float(record["t"])
    return t - float(record.get("duration_s") or 0.0), t


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


class _SessionPartition:
    """Cuts one session into segments as its records come, holding only the intervals not yet settled.

    Timed records paint what they measured (steps, data loading, checkpoint stalls, restores); the
    time around steps that has a cause becomes startup or recovery windows; those windows while the
    alive nodes cannot hold ``min_workers`` workers are waiting for capacity. The time before
    ``settle``'s bound is swept and handed on: no interval yet to come reaches back before it."""

    def __init__(self, start: float, end: float, min_workers: int, watches_capacity: bool, gpu_run: bool,
                 head_types: Sequence[str]) -> None:
        self.start, self.end = start, end
        self._min_workers, self._gpu_run, self._head_types = min_workers, gpu_run, head_types
        self._pending: List[Tuple[float, float, str]] = []
        self._settled = start
        self._last_step: Optional[Tuple[float, float]] = None
        self._disrupted: Optional[float] = None  # first disruption since the last step (or the start)
        self._regrouped = False  # a group record since the last step
        self._idle: List[Tuple[float, float]] = []
        self._low: List[Tuple[float, float]] = []
        self._alive: Dict[str, float] = {}
        self._low_since: Optional[float] = start if watches_capacity else None
        self._watches_capacity = watches_capacity
        self._segment: Optional[Segment] = None

    def feed(self, record: Dict[str, Any], wasted: bool) -> None:
        ev, t = record["ev"], float(record["t"])
        if ev == Step.ev:
            self._step(record, wasted)
        elif ev == Checkpoint.ev:
            # The stall is the first part of the save (the snapshot); the upload may go on after it.
            duration = float(record.get("duration_s") or 0.0)
            stall = float(record.get("stall_s", duration) or 0.0)
            self._pending.append((t - duration, t - duration + stall, SAVE))
        elif ev == Restore.ev:
            self._pending.append((t - float(record.get("duration_s") or 0.0), t, RESTORE))
        elif ev == Group.ev:
            self._regrouped = True
        if ev in DISRUPTIONS and self._disrupted is None:
            self._disrupted = t
        if self._watches_capacity and ev in (Add.ev, Kill.ev, Remove.ev):
            self._capacity_changed(record, t)

    def _step(self, record: Dict[str, Any], wasted: bool) -> None:
        begin, finish = _step_span(record)
        if self._last_step is None:
            self._window(self.start, self._disrupted if self._disrupted is not None else begin, STARTUP)
            if self._disrupted is not None:
                self._window(self._disrupted, begin, RECOVERY)
        elif self._regrouped:
            self._window(self._last_step[1], begin, RECOVERY)
        self._last_step, self._disrupted, self._regrouped = (begin, finish), None, False
        if wasted:
            self._pending.append((begin, finish, WASTED))
            return
        self._pending.append((begin, finish, PRODUCTIVE))
        if record.get("data_s"):
            self._pending.append((begin, begin + float(record["data_s"]), DATA))

    def _window(self, begin: float, finish: float, category: str) -> None:
        self._pending.append((begin, finish, category))
        self._idle.append((begin, finish))
        self._pending += [(s, e, WAITING) for s, e in _intersect([(begin, finish)], self._low)]

    def _capacity_changed(self, record: Dict[str, Any], t: float) -> None:
        if record["ev"] == Add.ev:
            self._alive[record["node"]] = _capacity(record, self._gpu_run, self._head_types)
        else:
            self._alive.pop(record["node"], None)
        low = sum(self._alive.values()) < self._min_workers
        if low and self._low_since is None:
            self._low_since = t
        elif not low and self._low_since is not None:
            self._low_interval(self._low_since, t)
            self._low_since = None

    def _low_interval(self, begin: float, finish: float) -> None:
        self._low.append((begin, finish))
        self._pending += [(s, e, WAITING) for s, e in _intersect(self._idle, [(begin, finish)])]

    def settle(self, bound: float) -> Iterator[Segment]:
        """Segments up to ``bound`` or as near it as intervals still open allow; later records' intervals
        start at ``bound`` or after it."""
        opened = [bound, self.end]
        if self._last_step is None:
            opened.append(self.start)
        else:
            opened.append(self._last_step[1])  # a group record to come makes the time since it recovery
        if self._disrupted is not None:
            opened.append(self._disrupted)
        if self._low_since is not None:
            opened.append(self._low_since)
        until = min(opened)
        if until > self._settled:
            yield from self._swept(until)

    def close(self) -> Iterator[Segment]:
        """The rest of the session's segments."""
        if self._last_step is None:
            self._window(self.start, self._disrupted if self._disrupted is not None else self.end, STARTUP)
            if self._disrupted is not None:
                self._window(self._disrupted, self.end, RECOVERY)
        elif self._regrouped:
            self._window(self._last_step[1], self.end, RECOVERY)
        elif self._disrupted is not None:
            self._window(self._disrupted, self.end, RECOVERY)
        if self._low_since is not None:
            self._low_interval(self._low_since, self.end)
        yield from self._swept(self.end)
        if self._segment is not None:
            yield self._segment

    def _swept(self, until: float) -> Iterator[Segment]:
        """Segments of [settled, until], merged with the one before when they continue it, as one sweep
        over the whole session would have made them."""
        for segment in _sweep(self._pending, self._settled, until):
            previous = self._segment
            if previous is not None and previous.category == segment.category and previous.end == segment.start:
                self._segment = Segment(previous.start, segment.end, segment.category)
            else:
                if previous is not None:
                    yield previous
                self._segment = segment
        self._settled = until
        self._pending = [interval for interval in self._pending if interval[1] > until]


def _partition(events: Iterable[Dict[str, Any]], scan: _Scan, sessions: Sequence[Tuple[float, float]],
               min_workers: int, head_types: Sequence[str],
               on_record: Callable[[Dict[str, Any], bool], None]) -> Iterator[Segment]:
    """The second pass: every second of every session in exactly one category, in time order;
    ``on_record`` sees each record and whether it is a wasted step."""
    wasted = _WastedLookup(scan.reexecutions.wasted_runs())
    current: Optional[_SessionPartition] = None
    current_index = -1
    for number, (session, record) in enumerate(_by_session(events)):
        if current is not None and number % BLOCK == 0:
            yield from current.settle(scan.block_earliest[number // BLOCK])
        if current is not None and session != current_index:
            yield from current.close()
            current = None
        if session is not None and session < len(sessions) and current is None:
            current, current_index = _SessionPartition(*sessions[session], min_workers, scan.with_adds[session],
                                                       scan.gpu_run, head_types), session
        is_wasted = record["ev"] == Step.ev and wasted.next_is_wasted()
        on_record(record, is_wasted)
        if current is not None:
            current.feed(record, is_wasted)
    if current is not None:
        yield from current.close()


class _GoodputCurve:
    """Goodput so far at segment ends: every segment's while few, then every 2nd, 4th, ... one (and
    the last), so at most 2 * GOODPUT_POINTS points however many segments."""

    def __init__(self) -> None:
        self.points: List[Tuple[float, float]] = []
        self._latest: Optional[Tuple[float, float]] = None
        self._every, self._seen = 1, 0
        self._wall, self._productive = 0.0, 0.0

    def add(self, segment: Segment) -> None:
        self._wall += segment.seconds
        self._productive += segment.seconds if segment.category == PRODUCTIVE else 0.0
        self._latest = (segment.end, self._productive / self._wall if self._wall > 0 else 0.0)
        if self._seen % self._every == 0:
            self.points.append(self._latest)
            if len(self.points) >= 2 * GOODPUT_POINTS:
                self.points, self._every = self.points[::2], self._every * 2
        self._seen += 1

    def curve(self) -> List[Tuple[float, float]]:
        return self.points + ([self._latest] if self.points and self._latest != self.points[-1] else [])


# Assembling the ledger ------------------------------------------------------------------------------

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


def _sessions(totals: RunningTotals) -> List[Tuple[float, float]]:
    now = totals.last_t if totals.last_t is not None else 0.0
    return [(start, now if end is None else end) for start, end in totals.sessions]


def segments(events: Iterable[Dict[str, Any]], options: Optional[LedgerOptions] = None) -> Iterator[Segment]:
    """Every second of every session of a run in exactly one category, in time order.

    ``events`` is read twice: a list, or something that reads the log anew on each iteration."""
    options = options or LedgerOptions()
    scan = _scan(events, PriceCatalog({}), None)
    min_workers = options.min_workers if options.min_workers is not None else scan.min_workers or 1
    return _partition(events, scan, _sessions(scan.totals), min_workers, options.head_node_types, lambda *_: None)


def build_ledger(events: Iterable[Dict[str, Any]], catalog: PriceCatalog,
                 options: Optional[LedgerOptions] = None) -> Ledger:
    """The ledger of a run from all of its event records, in memory that does not grow with the
    run's length. ``events`` is read twice: a list, or something that reads the log anew on each
    iteration (as ``write_ledger`` passes)."""
    if iter(events) is events:
        raise TypeError("build_ledger reads the records twice: pass a list, or LogRecords(path) for a log file")
    options = options or LedgerOptions()
    scan = _scan(events, catalog, options.region)
    totals = scan.totals
    now = totals.last_t if totals.last_t is not None else 0.0
    sessions = _sessions(totals)
    wall_s = sum(end - start for start, end in sessions)
    min_workers = options.min_workers if options.min_workers is not None else scan.min_workers or 1
    seconds = {category: 0.0 for category in CATEGORIES}
    goodput = _GoodputCurve()
    world_sizes: List[Tuple[float, int]] = [(end, 0) for _, end in sessions]
    step_sizes = _StepCurve()
    samples = [0]

    def count_step(record: Dict[str, Any], wasted: bool) -> None:
        if record["ev"] in (Group.ev, Start.ev, End.ev):
            step_sizes.break_run()  # startup or recovery (world size 0) may fall between the steps around it
        if record["ev"] != Step.ev:
            return
        step_sizes.add(_step_span(record)[0], int(record["world_size"]))
        if not wasted:
            samples[0] += record["samples"][1] - record["samples"][0]

    for segment in _partition(events, scan, sessions, min_workers, options.head_node_types, count_step):
        seconds[segment.category] += segment.seconds
        goodput.add(segment)
        if segment.category in (STARTUP, RECOVERY, WAITING):
            world_sizes.append((segment.start, 0))

    preempted = totals.preemptions()
    completed = totals.completed_steps()
    usage = _node_usage(totals, now)
    cost = sum(row["cost_usd"] for row in usage)
    on_demand_cost = sum(row["on_demand_cost_usd"] for row in usage)
    samples_total = samples[0]
    start_record = scan.start_record
    summary = {
        "format": FORMAT,
        "run": start_record.get("run"),
        "sessions": [{"start": s, "end": e, "wall_time_s": e - s,
                      "status": status} for (s, e), status in zip(sessions, scan.statuses)],
        "wall_time_s": wall_s,
        "between_sessions_s": sum((b[0] - a[1] for a, b in zip(sessions, sessions[1:])), 0.0),
        "goodput": seconds[PRODUCTIVE] / wall_s if wall_s > 0 else None,
        "time_s": seconds,
        "badput_s": {c: s for c, s in seconds.items() if c != PRODUCTIVE},
        "steps": {"completed": completed, "executions": scan.reexecutions.executions, "redone": totals.redone_steps},
        "samples": samples_total,
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
            "per_1k_samples_usd": 1000.0 * cost / samples_total if samples_total else None,
            "estimated": any(row["estimated"] for row in usage),
            "notional": any(row["notional"] for row in usage),
            "unpriced_node_types": sorted({node_type for node_type, _ in totals.unpriced}),
        },
        "checkpoints": scan.checkpoints.figures(wall_s, len(preempted), totals.productive_s, completed),
    }
    return Ledger(summary, sessions, scan.cost_curve.points, scan.spot_curve.points,
                  sorted(world_sizes + step_sizes.points), sorted(d.t for d in preempted), goodput.curve())


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
    ledger = build_ledger(LogRecords(os.path.join(run_dir, EVENTS_FILE)), catalog or PriceCatalog.load(), options)
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


class LogRecords:
    """The records of an event log as the ledger reads them, read anew from the file on each iteration."""

    def __init__(self, events_path: str) -> None:
        self.events_path = events_path

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return ledger_records(self.events_path)


def ledger_records(events_path: str) -> Iterator[Dict[str, Any]]:
    """The log's records as the ledger needs them, in one pass: the ``samples`` audit records
    (a rank's sample ids of a step) are left out and a ``step`` record keeps only what the ledger reads."""
    for record in iter_events(events_path):
        if record["ev"] == Step.ev:
            yield {key: record[key] for key in _STEP_FIELDS if key in record}
        elif record["ev"] != Samples.ev:
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
