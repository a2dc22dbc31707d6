"""What the user sees: progress lines while training, a summary at the end. Both read events.jsonl."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, TextIO

from raytrain_spot.observe.events import iter_events
from raytrain_spot.observe.records import (Add, Checkpoint, CheckpointFailed, Drain, Eval, Group, Kill, Notice, Remove,
                                          Resize, Restore, Step)

SUMMARY_FILE = "summary.json"
"""What the main command writes into the run directory at its end: ``summarize``'s figures and the status."""


def format_event(record: Dict[str, Any], total_steps: int, rate: Optional[float],
                 elapsed_s: Optional[float] = None) -> Optional[str]:
    """The line of a record worth a line, or None. A step's line ends with the time since this
    invocation started (``elapsed_s``, when given) and the time to the last step at ``rate`` samples/s."""
    ev = record["ev"]
    if ev == Step.ev:
        speed = f"{rate:8.1f} samples/s" if rate is not None else " " * 17
        line = (f"step {record['step']:>6}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"{speed} | world {record['world_size']}")
        if elapsed_s is None:
            return line
        samples_per_step = record["samples"][1] - record["samples"][0]
        eta = (clock((total_steps - record["step"]) * samples_per_step / rate) if rate
               else "--" if record["step"] < total_steps else clock(0))
        return f"{line} | elapsed {clock(elapsed_s)} | eta {eta}"
    if ev == Group.ev:
        start = f"restored step {record['restored_step']}" if record.get("restored_step") is not None else "step 0"
        return f"[group] training with {record['world_size']} workers from {start}"
    if ev == Checkpoint.ev:
        return (f"[checkpoint] step {record['step']} {record['kind']} -> {record['tier']} "
                f"({record['bytes'] / 1e6:.1f} MB, stall {record['stall_s']:.3f} s)")
    if ev == Eval.ev:
        return f"[eval] step {record['step']} | loss {record['loss']:.4f} over {record['samples']} samples"
    if ev == Restore.ev:
        return f"[restore] step {record['step']} from {record['tier']} in {record['duration_s']:.2f} s"
    if ev in (Notice.ev, Drain.ev, Kill.ev, Add.ev, Remove.ev, Resize.ev):
        details = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("t", "ev"))
        return f"[{ev}] {details}"
    return None


def clock(seconds: float) -> str:
    """``seconds`` as H:MM:SS."""
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class ProgressPrinter:
    """An event-feed sink that prints the lines that matter of this invocation (records from ``since`` on).

    It also keeps what the Spot simulator needs to aim: the latest step and the node of each rank.
    """

    def __init__(self, total_steps: int, every_steps: int, out: TextIO, since: float):
        self._total = total_steps
        self._every = every_steps
        self._out = out
        self._since = since
        self._last_printed_step: Optional[Dict[str, Any]] = None
        self.latest_step: Optional[int] = None
        self.rank_nodes: List[str] = []  # node id of each rank of the latest worker group

    def write(self, record: Dict[str, Any]) -> None:
        if record["t"] < self._since:
            return
        rate = None
        if record["ev"] == Group.ev:
            self.rank_nodes = record.get("nodes", [])
        if record["ev"] == Step.ev:
            self.latest_step = record["step"]
            if record["step"] % self._every and record["step"] != self._total:
                return
            previous = self._last_printed_step
            if previous is not None and record["step"] > previous["step"]:
                rate = (record["samples"][1] - previous["samples"][1]) / max(record["t"] - previous["t"], 1e-9)
            self._last_printed_step = record
        text = format_event(record, self._total, rate, record["t"] - self._since)
        if text:
            print(text, file=self._out, flush=True)

    def tick(self) -> None:
        """Printing is record-driven."""

    def close(self) -> None:
        """``out`` belongs to the caller."""


PROGRESS_EVERY_S = 5.0
"""Seconds between two progress lines of work before training starts."""


class WorkProgress:
    """Progress lines for long work before training starts (checking every row, fetching a model from
    ``gs://``): how far, the time since it began and the time left at its rate so far, at most every
    ``PROGRESS_EVERY_S`` (work done sooner prints nothing), through ``log``. Use it as a context
    manager: work that printed a line prints an end line when it finishes."""

    def __init__(self, what: str, total: float, unit: str, log: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic):
        self._what, self._total, self._unit, self._log = what, total, unit, log
        self._every_s, self._clock = PROGRESS_EVERY_S, clock
        self._started = clock()
        self._printed = self._started
        self._lines = 0

    def update(self, done: float) -> None:
        """``done`` of the total is finished; print a line if ``PROGRESS_EVERY_S`` passed since the last."""
        now = self._clock()
        if now - self._printed >= self._every_s:
            self._printed = now
            self._lines += 1
            elapsed = now - self._started
            eta = clock((self._total - done) * elapsed / done) if done > 0 else "--"
            self._log(f"{self._what}: {self._amount(done)}/{self._amount(self._total)} {self._unit} "
                      f"({100 * done / max(self._total, 1e-9):.0f}%) | elapsed {clock(elapsed)} | eta {eta}")

    def _amount(self, value: float) -> str:
        return f"{value:,.0f}" if self._unit != "MiB" else f"{value:,.1f}"

    def __enter__(self) -> "WorkProgress":
        return self

    def __exit__(self, error_type, *_) -> None:
        if error_type is None and self._lines:
            self._log(f"{self._what}: done, {self._amount(self._total)} {self._unit} in "
                      f"{clock(self._clock() - self._started)}")


class StepRanges:
    """The distinct steps seen, as ranges: steps come in order, going back only at a restart (a
    redone step counts once), so this stays a few pairs however long the run."""

    def __init__(self):
        self._ranges: List[List[int]] = []

    def add(self, step: int) -> None:
        if self._ranges and self._ranges[-1][0] <= step <= self._ranges[-1][1] + 1:
            self._ranges[-1][1] = max(self._ranges[-1][1], step)
        else:
            self._ranges.append([step, step])

    def ranges(self) -> List[List[int]]:
        """[first, last] of each range, in the order seen."""
        return [list(r) for r in self._ranges]

    @classmethod
    def from_ranges(cls, ranges: List[List[int]]) -> "StepRanges":
        steps = cls()
        steps._ranges = [[int(low), int(high)] for low, high in ranges]
        return steps

    def count(self) -> int:
        merged: List[List[int]] = []
        for low, high in sorted(self._ranges):
            if merged and low <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        return sum(high - low + 1 for low, high in merged)


def summarize(events_path: str, since: float, storage: str) -> Dict[str, Any]:
    """Figures of this invocation (records from ``since`` on) plus the run's state, read in one
    streaming pass: memory does not grow with the log (a long run's is hundreds of MB)."""
    first = latest = None  # step records
    stepped = StepRanges()
    world_sizes: set[int] = set()
    checkpoint_steps: set[int] = set()
    latest_checkpoint = durable = None
    failed_saves = 0
    for e in iter_events(events_path):
        if e["t"] < since:
            continue
        if e["ev"] == Step.ev:
            first = first or e
            latest = e
            stepped.add(e["step"])
            world_sizes.add(e["world_size"])
        elif e["ev"] == Checkpoint.ev:
            checkpoint_steps.add(e["step"])
            latest_checkpoint = e["step"]
            if e["tier"] == "durable":
                durable = max(durable or e["step"], e["step"])
        elif e["ev"] == CheckpointFailed.ev:
            failed_saves += 1
    return {
        "steps": latest["step"] if latest else None,
        "steps_this_invocation": stepped.count(),
        "samples": latest["samples"][1] if latest else None,
        "wall_time_s": round(time.time() - since, 1),
        "final_loss": latest["loss"] if latest else None,
        "first_loss": first["loss"] if first else None,
        "world_sizes": sorted(world_sizes),
        "checkpoints_written": len(checkpoint_steps),
        "latest_checkpoint_step": latest_checkpoint,
        "durable_checkpoint_step": durable,
        "failed_saves": failed_saves,
        "checkpoints_at": storage,
        "events": events_path,
    }


def format_summary(summary: Dict[str, Any], status: str) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [f"== run {status} =="]
    labels = {"steps": "steps", "samples": "samples", "wall_time_s": "wall time (s)", "first_loss": "first loss",
              "final_loss": "final loss", "world_sizes": "world sizes", "checkpoints_written": "checkpoints written",
              "latest_checkpoint_step": "latest checkpoint", "durable_checkpoint_step": "in durable storage",
              "failed_saves": "failed saves", "checkpoints_at": "checkpoints at", "events": "event log"}
    width = max(len(label) for label in labels.values())
    lines += [f"{label:<{width}}  {fmt(summary[key])}" for key, label in labels.items()]
    return "\n".join(lines)

