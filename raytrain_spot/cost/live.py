"""Running totals of a run, fed one event record at a time: goodput so far, cost so far, preemptions.

The offline ledger, the alerts and the monitoring sink all read these figures, so node-hours,
cost and the preemption count have one definition. Records must arrive in log order; "now" is
passed in by the caller (an injected clock when live, the last record's time offline).

Definitions used here and documented in ``docs/goodput-and-cost.md``:

- wall time: the union of sessions; a session runs from a ``start`` record to its ``end`` record
  (or, after a crash, to the last record before the next ``start``). Time between sessions is
  not wall time: no node is billed then.
- productive seconds: the duration of the last execution of every step number; an earlier
  execution of a step that was done again (after a restore) is wasted progress. Only the
  durations of steps after the latest committed checkpoint are kept (a restore goes back to a
  committed checkpoint), so memory does not grow with the run; a restore further back, past a
  checkpoint it could not load, redoes steps whose first duration is no longer known, and the
  redo's own duration stands in for it.
- a preemption: a node that is not known to be on-demand and received a ``notice`` or died
  (``kill``); each node counts once. Losses of on-demand nodes are counted apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

from raytrain_spot.cost.pricing import PriceCatalog, PriceNotFound, Quote
from raytrain_spot.observe.progress import StepRanges
from raytrain_spot.observe.records import Add, Checkpoint, End, Group, Kill, Notice, Remove, Resize, Start, Step


@dataclass
class NodeSpan:
    """One stretch of time a node was part of the cluster (and billed)."""

    node: str
    """Ray node id."""
    node_type: str
    """Ray node type, the key into the price catalog's ``node_types``."""
    pricing: str
    """``spot`` or ``on_demand``."""
    gpus: float
    """GPUs the node reported."""
    start: float
    """Unix time the node joined (its ``add`` record)."""
    end: Optional[float] = None
    """Unix time it died, left or the session ended; None while it is alive."""

    def seconds_within(self, since: float, until: float) -> float:
        end = until if self.end is None else min(self.end, until)
        return max(0.0, end - max(self.start, since))


@dataclass
class Disruption:
    """A node lost (or about to be lost) to the infrastructure."""

    node: str
    """Ray node id."""
    t: float
    """Unix time of the first notice or of the death, whichever came first."""
    pricing: Optional[str]
    """Pricing of the node, None when it never had an ``add`` record."""
    with_notice: bool
    """Whether a preemption notice reached the node before it died."""

    @property
    def is_preemption(self) -> bool:
        return self.pricing != "on_demand"


@dataclass
class RunningTotals:
    """Folds event records into the run's figures so far."""

    catalog: PriceCatalog
    """Where node prices come from."""
    region: Optional[str] = None
    """Region to price in; None: the catalog's default region."""
    sessions: List[List[Optional[float]]] = field(default_factory=list, init=False)
    """[start, end] of every session; end is None while the session runs."""
    spans: List[NodeSpan] = field(default_factory=list, init=False)
    disruptions: Dict[str, Disruption] = field(default_factory=dict, init=False)
    unpriced: Set[Tuple[str, str]] = field(default_factory=set, init=False)
    """(node type, pricing) pairs the catalog could not price."""
    productive_s: float = field(default=0.0, init=False)
    redone_steps: int = field(default=0, init=False)
    world_size: int = field(default=0, init=False)
    samples_per_s: Optional[float] = field(default=None, init=False)
    """Speed between the last two consecutive steps of one group; None right after a (re)start."""
    last_step: Optional[Dict[str, Any]] = field(default=None, init=False)
    last_t: Optional[float] = field(default=None, init=False)
    min_workers: int = field(default=1, init=False)
    """The run's trainer.min_workers (from its start record)."""
    short_since: Optional[float] = field(default=None, init=False)
    """Since when the alive worker nodes cannot hold min_workers workers; None while they can."""
    head_node_types: Tuple[str, ...] = ("local-head", "head")
    """Node types that never train (their nodes add no worker capacity)."""
    _steps: StepRanges = field(default_factory=StepRanges, init=False)
    _highest_step: Optional[int] = field(default=None, init=False)
    _recent_step_duration: Dict[int, float] = field(default_factory=dict, init=False)
    """Duration of the last execution of each step after the latest committed checkpoint."""
    _open: Dict[str, NodeSpan] = field(default_factory=dict, init=False)
    _quotes: Dict[Tuple[str, str, float], Optional[Quote]] = field(default_factory=dict, init=False)

    def feed(self, record: Dict[str, Any]) -> None:
        t, ev = float(record["t"]), record["ev"]
        if ev == Start.ev:
            self._open_session(t)
            self.min_workers = int(record.get("min_workers", 1))
        elif not self.sessions:
            self._open_session(t)  # a log cut before its start record: begin at its first record
        elif self.sessions[-1][1] is not None:
            self.last_t = t
            return  # between an end and the next start nothing trains and nothing is billed
        if ev == End.ev:
            self._close_session(t)
        elif ev == Add.ev and record["node"] not in self._open:
            span = NodeSpan(record["node"], record["node_type"], record["pricing"], float(record.get("gpus") or 0), t)
            self._open[span.node] = span
            self.spans.append(span)
        elif ev in (Kill.ev, Remove.ev):
            span = self._open.pop(record["node"], None)
            if span is not None:
                span.end = t
        if ev in (Add.ev, Kill.ev, Remove.ev):
            short = self.worker_capacity() < self.min_workers
            if short and self.short_since is None:
                self.short_since = t
            elif not short:
                self.short_since = None
        if ev in (Notice.ev, Kill.ev):
            self._note_disruption(record, t)
        elif ev == Step.ev:
            self._count_step(record, t)
        elif ev == Checkpoint.ev:
            committed = int(record["step"])
            self._recent_step_duration = {s: d for s, d in self._recent_step_duration.items() if s > committed}
        elif ev in (Group.ev, Resize.ev):
            self.world_size = int(record["world_size"])
            self.last_step = None  # a new group: its speed is not measured against the old one
        self.last_t = t

    def worker_capacity(self) -> float:
        """Workers the alive nodes can hold: a GPU node one per GPU, a CPU node one, a head none."""
        return sum(span.gpus if span.gpus > 0 else float(span.node_type not in self.head_node_types)
                   for span in self._open.values())

    def short_of_capacity_s(self, now: float) -> float:
        """How long the alive nodes have been unable to hold min_workers workers (0: they can)."""
        return 0.0 if self.short_since is None else now - self.short_since

    def _open_session(self, t: float) -> None:
        if self.sessions and self.sessions[-1][1] is None:
            self._close_session(self.last_t if self.last_t is not None else t)  # crashed: no end record
        self.sessions.append([t, None])

    def _close_session(self, t: float) -> None:
        if self.sessions and self.sessions[-1][1] is None:
            self.sessions[-1][1] = t
        for span in self._open.values():
            span.end = t
        self._open.clear()
        self.world_size = 0
        self.short_since = None  # between sessions nothing waits for capacity

    def _note_disruption(self, record: Dict[str, Any], t: float) -> None:
        node = record["node"]
        notified = record["ev"] == Notice.ev or bool(record.get("with_notice"))
        known = self.disruptions.get(node)
        if known is not None:
            known.with_notice = known.with_notice or notified
            return
        pricing = next((s.pricing for s in reversed(self.spans) if s.node == node), None)
        self.disruptions[node] = Disruption(node, t, pricing, notified)

    def _count_step(self, record: Dict[str, Any], t: float) -> None:
        step, duration = int(record["step"]), float(record.get("duration_s") or 0.0)
        if self._highest_step is not None and step <= self._highest_step:
            self.productive_s -= self._recent_step_duration.get(step, duration)
            self.redone_steps += 1
        self._highest_step = step if self._highest_step is None else max(self._highest_step, step)
        self._steps.add(step)
        self._recent_step_duration[step] = duration
        self.productive_s += duration
        previous = self.last_step
        if previous is not None and step == previous["step"] + 1 and t > previous["t"]:
            self.samples_per_s = (record["samples"][1] - previous["samples"][1]) / (t - previous["t"])
        else:
            self.samples_per_s = None
        self.world_size = int(record["world_size"])
        self.last_step = record

    # Figures so far -------------------------------------------------------------------------

    def wall_s(self, now: float) -> float:
        total = 0.0
        for start, end in self.sessions:
            total += max(0.0, (now if end is None else end) - start)
        return total

    def goodput(self, now: float) -> Optional[float]:
        wall = self.wall_s(now)
        return self.productive_s / wall if wall > 0 else None

    def completed_steps(self) -> int:
        return self._steps.count()

    def preemptions(self) -> List[Disruption]:
        return [d for d in self.disruptions.values() if d.is_preemption]

    def quote(self, node_type: str, pricing: str, gpus: float) -> Optional[Quote]:
        """The node's hourly price, or None (remembered in ``unpriced``) when the catalog lacks it."""
        key = (node_type, pricing, gpus)
        if key not in self._quotes:
            try:
                self._quotes[key] = self.catalog.node_price(node_type, pricing, gpus, self.region)
            except PriceNotFound:
                self._quotes[key] = None
                self.unpriced.add((node_type, pricing))
        return self._quotes[key]

    def cost_usd(self, now: float) -> float:
        """Cost of every node-second so far."""
        total = 0.0
        for span in self.spans:
            quote = self.quote(span.node_type, span.pricing, span.gpus)
            if quote is not None:
                total += quote.usd_per_hour * span.seconds_within(span.start, now) / 3600.0
        return total

    def spot_node_hours(self, since: float, until: float) -> float:
        return sum(s.seconds_within(since, until) for s in self.spans if s.pricing == "spot") / 3600.0

    def preemption_rate(self, now: float, window_s: float) -> Tuple[int, float]:
        """Preemptions in the trailing window and the Spot node-hours they happened in."""
        since = now - window_s
        count = sum(1 for d in self.preemptions() if since < d.t <= now)
        return count, self.spot_node_hours(since, now)

    def alive_nodes(self, pricing: str) -> int:
        return sum(1 for s in self._open.values() if s.pricing == pricing)

    # Saving and restoring (the event feed's checkpoint) ---------------------------------------

    def state(self) -> Dict[str, Any]:
        """Everything fed so far as JSON-able data; ``load_state`` on fresh totals restores it."""
        return {"sessions": self.sessions, "spans": [asdict(span) for span in self.spans],
                "open": [self.spans.index(span) for span in self._open.values()],
                "disruptions": [asdict(d) for d in self.disruptions.values()],
                "unpriced": sorted(self.unpriced), "productive_s": self.productive_s,
                "redone_steps": self.redone_steps, "world_size": self.world_size,
                "samples_per_s": self.samples_per_s, "last_step": self.last_step, "last_t": self.last_t,
                "min_workers": self.min_workers, "short_since": self.short_since,
                "steps": self._steps.ranges(), "highest_step": self._highest_step,
                "recent_step_duration": [[step, s] for step, s in self._recent_step_duration.items()]}

    def load_state(self, state: Dict[str, Any]) -> None:
        """Restore ``state()``; a state that does not parse raises and leaves these totals as they were."""
        spans = [NodeSpan(**span) for span in state["spans"]]
        restored = {
            "sessions": [list(session) for session in state["sessions"]], "spans": spans,
            "_open": {spans[i].node: spans[i] for i in state["open"]},
            "disruptions": {d["node"]: Disruption(**d) for d in state["disruptions"]},
            "unpriced": {tuple(pair) for pair in state["unpriced"]},
            "productive_s": float(state["productive_s"]), "redone_steps": int(state["redone_steps"]),
            "world_size": int(state["world_size"]), "samples_per_s": state["samples_per_s"],
            "last_step": state["last_step"], "last_t": state["last_t"], "min_workers": int(state["min_workers"]),
            "short_since": state["short_since"], "_steps": StepRanges.from_ranges(state["steps"]),
            "_highest_step": state["highest_step"],
            "_recent_step_duration": {int(step): float(s) for step, s in state["recent_step_duration"]},
        }
        self.__dict__.update(restored)
