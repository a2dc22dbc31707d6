"""The job's figures as a finished run measured them, for ``plan --from-run RUN_DIR``: the checkpoint
stall and the restore from its ``ledger.json``, the step time and the recoveries from its ``events.jsonl``."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from raytrain_spot.cost.pricing import PriceCatalog
from raytrain_spot.observe.records import (Add, Checkpoint, Drain, Group, Handoff, JitLate, Kill, Notice, Remove,
                                          Restore, Start, Step)

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
    """The run had no notice handling: a plain Ray Train baseline (its ``start`` event's ``strategy``)."""


_HEAD_TYPES = ("local-head", "head")
PLAIN_RAY_TRAIN = "plain-ray-train"
"""The ``strategy`` of a run with no notice handling (bench/baselines.py)."""


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
    plain = next((e.get("strategy") for e in events if e["ev"] == Start.ev), None) == PLAIN_RAY_TRAIN
    figures: Dict[str, Measured] = {}
    notes: List[str] = []

    checkpoints = summary.get("checkpoints") or {}
    if checkpoints.get("mean_stall_s") is not None:
        figures["checkpoint_s"] = Measured(checkpoints["mean_stall_s"], f"{ledger_name} checkpoints.mean_stall_s, "
                                           f"{checkpoints.get('saves')} saves")
    if checkpoints.get("mean_restore_s") is not None:
        figures["restore_s"] = Measured(checkpoints["mean_restore_s"], f"{ledger_name} checkpoints.mean_restore_s, "
                                        f"{checkpoints.get('restores')} restores")

    steps = [e for e in events if e["ev"] == Step.ev]
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
        (e["min_workers"] for e in events if e["ev"] == Start.ev and "min_workers" in e), 1)
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
        notes.append(f"the run is {PLAIN_RAY_TRAIN} (bench/baselines.py): its kill recovery is the plain row's")
    if summary.get("disruptions", {}).get("preemptions"):
        notes.append("not taken from the run: its MTBI (a simulator's or one short run's is no forecast; use "
                     "--mtbi-hours or --trace)")
    return RunFigures(run_dir, figures, notes, plain)


def _worker_capacity(events: Sequence[Dict[str, Any]]) -> List[Tuple[float, float]]:
    """(time, workers the alive nodes hold) after every node change: one per GPU, or one per non-head node;
    a drained node no longer counts (a new group leaves it out)."""
    gpu_run = any(float(e.get("gpus") or 0) > 0 for e in events if e["ev"] == Add.ev)
    alive: Dict[str, float] = {}
    points = []
    for e in events:
        if e["ev"] == Add.ev:
            gpus = float(e.get("gpus") or 0)
            alive[e["node"]] = gpus if gpus > 0 else (0.0 if gpu_run or e.get("node_type") in _HEAD_TYPES else 1.0)
        elif e["ev"] in (Kill.ev, Remove.ev, Drain.ev):  # a draining node takes no new group
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
    groups = [e for e in events if e["ev"] == Group.ev]
    steps = [e for e in events if e["ev"] == Step.ev]

    def first_after(kind: str, t: float, until: float = math.inf, where=lambda e: True):
        return next((e for e in events if e["ev"] == kind and t < float(e["t"]) <= until and where(e)), None)

    def training_again(group) -> Optional[float]:
        first = next((s for s in steps if float(s["t"]) > float(group["t"])), None)
        return None if first is None else float(first["t"]) - float(first.get("duration_s") or 0.0)

    def restore_before(t0: float, t1: float) -> float:
        restores = [e for e in events if e["ev"] == Restore.ev and t0 < float(e["t"]) <= t1]
        return float(restores[-1].get("duration_s") or 0.0) if restores else 0.0

    handled, unhandled, noticed = [], [], set()
    handoffs = jit_ok = 0
    for handoff in (e for e in events if e["ev"] == Handoff.ev and e.get("reason") == "preemption"):
        t_handoff = float(handoff["t"])
        notices = [float(n["t"]) for n in events if n["ev"] == Notice.ev and n["node"] in (handoff.get("nodes") or [])
                   and float(n["t"]) <= t_handoff]
        if not notices:
            continue
        noticed.update(handoff.get("nodes") or [])
        handoffs += 1
        t = min(notices)
        group = first_after(Group.ev, t_handoff)
        until = float(group["t"]) if group is not None else math.inf
        save = first_after(Checkpoint.ev, t_handoff, until, lambda e: e.get("kind") == "jit")
        if save is None:
            continue
        jit_ok += first_after(JitLate.ev, t_handoff, until) is None
        again = training_again(group) if group is not None else None
        if again is not None:
            handled.append((again - t - waiting(t, again), float(save["t"]) - t, restore_before(t, until)))
    for kill in (e for e in events if e["ev"] == Kill.ev):
        t = float(kill["t"])
        current = next((g for g in reversed(groups) if float(g["t"]) <= t), None)
        if kill["node"] in noticed or current is None or kill["node"] not in (current.get("nodes") or []):
            continue
        members = set(current.get("nodes") or [])
        # The group must still be training: no handoff since it started, no earlier loss of a member.
        if first_after(Handoff.ev, float(current["t"]), t) is not None or first_after(
                Kill.ev, float(current["t"]), t, lambda e: e is not kill and e["node"] in members) is not None:
            continue
        group = first_after(Group.ev, t)
        again = training_again(group) if group is not None else None
        if again is not None:
            unhandled.append((again - t - waiting(t, again), restore_before(t, float(group["t"]))))
    return handled, unhandled, handoffs, jit_ok
