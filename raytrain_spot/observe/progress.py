"""What the user sees: progress lines while training, a summary at the end. Both read events.jsonl."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, TextIO

from raytrain_spot.observe.events import read_events

SUMMARY_FILE = "summary.json"
"""What the main command writes into the run directory at its end: ``summarize``'s figures and the status."""


def format_event(record: Dict[str, Any], total_steps: int, rate: Optional[float]) -> Optional[str]:
    ev = record["ev"]
    if ev == "step":
        speed = f"{rate:8.1f} samples/s" if rate is not None else " " * 17
        return (f"step {record['step']:>6}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"{speed} | world {record['world_size']}")
    if ev == "group":
        start = f"restored step {record['restored_step']}" if record.get("restored_step") is not None else "step 0"
        return f"[group] training with {record['world_size']} workers from {start}"
    if ev == "checkpoint":
        return (f"[checkpoint] step {record['step']} {record['kind']} -> {record['tier']} "
                f"({record['bytes'] / 1e6:.1f} MB, stall {record['stall_s']:.3f} s)")
    if ev == "restore":
        return f"[restore] step {record['step']} from {record['tier']} in {record['duration_s']:.2f} s"
    if ev in ("notice", "drain", "kill", "add", "remove", "resize"):
        details = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("t", "ev"))
        return f"[{ev}] {details}"
    return None


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
        if record["ev"] == "group":
            self.rank_nodes = record.get("nodes", [])
        if record["ev"] == "step":
            self.latest_step = record["step"]
            if record["step"] % self._every and record["step"] != self._total:
                return
            previous = self._last_printed_step
            if previous is not None and record["step"] > previous["step"]:
                rate = (record["samples"][1] - previous["samples"][1]) / max(record["t"] - previous["t"], 1e-9)
            self._last_printed_step = record
        text = format_event(record, self._total, rate)
        if text:
            print(text, file=self._out, flush=True)

    def tick(self) -> None:
        """Printing is record-driven."""

    def close(self) -> None:
        """``out`` belongs to the caller."""


def summarize(events_path: str, since: float, storage: str) -> Dict[str, Any]:
    """Figures of this invocation (records from ``since`` on) plus the run's state."""
    events = [e for e in read_events(events_path) if e["t"] >= since]
    steps = [e for e in events if e["ev"] == "step"]
    checkpoints = [e for e in events if e["ev"] == "checkpoint"]
    world_sizes = sorted({e["world_size"] for e in steps})
    return {
        "steps": steps[-1]["step"] if steps else None,
        "steps_this_invocation": len({e["step"] for e in steps}),
        "samples": steps[-1]["samples"][1] if steps else None,
        "wall_time_s": round(time.time() - since, 1),
        "final_loss": steps[-1]["loss"] if steps else None,
        "first_loss": steps[0]["loss"] if steps else None,
        "world_sizes": world_sizes,
        "checkpoints_written": len({e["step"] for e in checkpoints}),
        "latest_checkpoint_step": checkpoints[-1]["step"] if checkpoints else None,
        "durable_checkpoint_step": max((e["step"] for e in checkpoints if e["tier"] == "durable"), default=None),
        "failed_saves": sum(1 for e in events if e["ev"] == "checkpoint_failed"),
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

