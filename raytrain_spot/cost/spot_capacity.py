"""Where Spot capacity comes and goes in the planner's simulation: exponential lifetimes per Spot VM
(MTBI by GPU type from the price catalog) or a capacity trace replayed from ``shared/traces``."""

from __future__ import annotations

import bisect
import json
import math
import os
import random
from collections import deque
from dataclasses import dataclass
from typing import Deque, List, Optional, Protocol, Sequence, Tuple

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


class CapacityProcess(Protocol):
    """Where Spot capacity comes and goes: ExponentialLosses or TraceReplay."""

    def initial_alive(self, spot_nodes: int) -> int: ...

    def next_change(self, now: float, alive: int) -> Optional[CapacityChange]: ...

    def apply(self, change: CapacityChange) -> None: ...


def trace_mtbi_s(counts: Sequence[int], tick_s: float, spot_nodes: int = 0) -> float:
    """Per-node MTBI of a capacity trace: node-time alive over node losses. Mapping the trace onto
    any number of nodes (``scaled_trace``) keeps it, so ``spot_nodes`` does not enter."""
    losses = sum(max(0, a - b) for a, b in zip(counts, counts[1:]))
    return sum(counts) * tick_s / losses if losses else math.inf


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
