"""What a preemption costs as the model's state and the cluster grow, on a GPU-like task.

One point of a curve: the same scripted preemptions (one node at a time, each with a notice and
replaced ``--provisioning-s`` after its power-off) on the embedded cluster with ``--workers``
virtual nodes, training the GPU-like task (raytrain_spot/tasks/timed.py: each step waits on a
timer as a CPU waits on a GPU, ``--state-gb`` of real model state per rank). Each mode runs in
turn, the baselines first (bench/bench_recovery.py's modes: ``ray-preemption-api`` is Ray 2.60's
documented recipe). Per preemption (and per regrow) it reports the pause, the old group's last
step to the next group's first, and its parts: the old group's end (the handoff and its
just-in-time checkpoint, or the node's death), Ray Train's restart up to the training function,
the function's startup (its setup, data, model build, restore, DDP) and the first step. Beside them the
restore speed (checkpoint bytes over rank 0's own seconds on a surviving node's copy: reading,
verifying, applying; the restore's rest is waiting for the other ranks, shown beside it) and the
checkpoint stall over a host memory copy of the same bytes, measured here first.

    python bench/bench_scaling.py --state-gb 0.5 --workers 3      # one point; last line: raytrain-spot
    python bench/bench_scaling.py --sweep state --json state.json  # 0.1 0.5 1 2 GB at 3 workers
    python bench/bench_scaling.py --sweep workers --json workers.json  # 2 4 8 12 workers at 0.5 GB
    python bench/bench_scaling.py --plot state.json workers.json --png docs/scaling.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.bench_recovery import MODES, run, run_events  # noqa: E402
from raytrain_spot.observe.events import read_events  # noqa: E402
from raytrain_spot.observe.records import (Checkpoint, Group, Handoff, Kill, Notice, Restore, Step,  # noqa: E402
                                          StopRequested)

SWEEPS = {"state": {"state_gb": [0.1, 0.5, 1, 2], "workers": [3]},
          "workers": {"state_gb": [0.5], "workers": [2, 4, 8, 12]}}
DEFAULT_MODES = ["ray-preemption-api", "raytrain-spot"]
PARTS = ["old_group_end", "ray_train_restart", "setup", "data", "model", "restore", "ddp", "first_step"]
"""A pause's parts, in order; they add up to it."""


def host_copy_s(state_gb: float) -> float:
    """Seconds one core takes to copy ``state_gb`` in memory, in the task's tensor sizes (the floor
    of any snapshot: the checkpoint stall is measured against it). The best of three."""
    import torch

    from raytrain_spot.tasks.timed import ModelState

    torch.set_num_threads(1)
    state = ModelState(state_gb, seed=0)
    copies = {name: torch.empty_like(t) for name, t in state.tensors.items()}
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for name, t in state.tensors.items():
            copies[name].copy_(t)
        best = min(best, time.perf_counter() - started)
    return best


def pauses(events: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, float]]]:
    """Every restart of the worker group, as a pause and its parts, keyed by its cause:
    ``preemption`` (a notice or a node's loss) or ``regrow``."""
    steps = [e for e in events if e["ev"] == Step.ev]
    stopped = next((e["t"] for e in events if e["ev"] == StopRequested.ev), float("inf"))
    groups = [e for e in events if e["ev"] == Group.ev and e["t"] < stopped]  # not the benchmark's own end
    found: Dict[str, List[Dict[str, float]]] = {"preemption": [], "regrow": []}
    for previous, group in zip(groups, groups[1:]):
        before = [s for s in steps if previous["t"] < s["t"] < group["t"]]
        first = next((s for s in steps if s["t"] > group["t"]), None)
        if not before or first is None:
            continue
        last_t = before[-1]["t"]
        function_start = group["t"] - sum(group["startup_s"].values())
        handoff = next((e for e in events if e["ev"] == Handoff.ev and last_t <= e["t"] <= function_start), None)
        # The old group ends when its handoff's checkpoint is in (every tier: the handoff waits), else
        # at the node's death; Ray Train's restart is what follows up to the training function.
        ended = [e["t"] for e in events if e["t"] <= function_start and (
            (handoff and e["ev"] == Checkpoint.ev and e["step"] == handoff["step"] and e["kind"] == "jit")
            or (not handoff and e["ev"] == Kill.ev and e["t"] >= last_t))]
        old_group_end = max(ended, default=last_t)
        parts = {"old_group_end": old_group_end - last_t, "ray_train_restart": function_start - old_group_end,
                 **{phase: group["startup_s"].get(phase, 0.0) for phase in ("setup", "data", "model", "restore", "ddp")},
                 "first_step": first["t"] - group["t"]}
        restore = next((e for e in events if e["ev"] == Restore.ev and function_start <= e["t"] <= group["t"]), None)
        saved = {e["step"]: e["bytes"] for e in events if e["ev"] == Checkpoint.ev}
        found["regrow" if handoff and handoff["reason"] == "regrow" else "preemption"].append({
            "pause_s": first["t"] - last_t, **parts, "world_size": group["world_size"],
            "restore_tier": restore["tier"] if restore else None,
            # The copy's bytes over rank 0's own work on it; the rest of the restore waits for the other ranks.
            "restore_gbps": (saved[restore["step"]] / 2**30 / restore["read_s"]
                             if restore and restore["step"] in saved and restore.get("read_s") else None),
            "restore_wait_s": restore["duration_s"] - restore["read_s"] if restore and restore.get("read_s") else None})
    return found


def median(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summary(events: List[Dict[str, Any]], copy_s: float) -> Dict[str, Any]:
    found = pauses(events)
    preemptions, regrows = found["preemption"], found["regrow"]
    # A periodic save's snapshot: what training waits for while it goes on (a handoff's writes the still state).
    stalls = [e["stall_s"] for e in events if e["ev"] == Checkpoint.ev and e["kind"] == "periodic"]
    return {
        "notices": sum(1 for e in events if e["ev"] == Notice.ev),
        "preemption_pauses": preemptions,
        "regrow_pauses": regrows,
        "pause_median_s": median([p["pause_s"] for p in preemptions]),
        "parts_median_s": {part: median([p[part] for p in preemptions]) for part in PARTS},
        "regrow_pause_median_s": median([p["pause_s"] for p in regrows]),
        # A copy from a surviving node (its own local copy): what the node's memory can give.
        "restore_gbps": median([p["restore_gbps"] for p in preemptions + regrows if p["restore_tier"] == "local"]),
        "restore_wait_median_s": median([p["restore_wait_s"] for p in preemptions + regrows]),
        "restore_tiers": sorted({p["restore_tier"] for p in preemptions + regrows if p["restore_tier"]}),
        "stall_median_s": median(stalls),
        "stall_ratio": round(statistics.median(stalls) / copy_s, 2) if stalls else None,
        "steps_redone": len([e for e in events if e["ev"] == Step.ev]) - len({e["step"] for e in events
                                                                              if e["ev"] == Step.ev}),
    }


def point(state_gb: float, workers: int, args) -> Dict[str, Any]:
    """One point of a curve: every mode, in turn, on the same scenario."""
    copy_s = host_copy_s(state_gb)
    workdir = tempfile.mkdtemp(prefix=f"bench-scaling-{state_gb:g}gb-{workers}w-")
    global_batch = workers * args.micro_batch_size  # one micro-batch per rank at full size
    run_args = argparse.Namespace(
        experiment="timed", checkpoint_interval_steps=args.checkpoint_interval_steps, preemptions=args.preemptions,
        every_s=args.every_s, first_at_s=args.first_at_s, provisioning_s=args.provisioning_s, no_notice=False,
        notice_s=args.notice_s, tail_s=args.tail_s, overrides=[
            f"task.state_gb={state_gb}", f"task.micro_batch_s={args.micro_batch_s}",
            f"cluster.num_worker_nodes={workers}", f"trainer.max_workers={workers}",
            f"trainer.global_batch_size={global_batch}", f"trainer.micro_batch_size={args.micro_batch_size}",
            # The fewest copies a tier may keep: at 2 GB the default 3 on every tier fill tens of GB of disk.
            "trainer.min_workers=1", "checkpoint.keep_latest_k=2", *args.overrides])
    results = {}
    for mode in args.modes:
        # The fixed-size job waits for its replacement at the full size.
        fixed = [f"trainer.min_workers={workers}"] if mode == "plain-ray-train-fixed" else []
        run(mode, "scripted", argparse.Namespace(**{**vars(run_args), "overrides": run_args.overrides + fixed}),
            workdir)
        results[mode] = summary(read_events(run_events(workdir, "scripted", mode)), copy_s)
        print(f"{mode}: {json.dumps({k: v for k, v in results[mode].items() if not k.endswith('_pauses')})}",
              flush=True)
    return {"state_gb": state_gb, "workers": workers, "host_copy_s": round(copy_s, 3), "workdir": workdir,
            "results": results}


def headline(mode: str, result: Dict[str, Any]) -> str:
    return (f"{mode}: pause_median_s={result['pause_median_s']} restore_gbps={result['restore_gbps']} "
            f"stall_ratio={result['stall_ratio']} regrow_pause_median_s={result['regrow_pause_median_s']} "
            f"steps_redone={result['steps_redone']}")


def markdown_table(points: List[Dict[str, Any]], varying: str) -> str:
    """A curve as a table: a row per point and mode, the pause's parts in columns."""
    header = [varying, "mode", "pause (median)", *PARTS, "regrow pause", "restore GB/s (tier); its wait",
              "stall / host copy"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for p in points:
        for mode, r in p["results"].items():
            parts = [f"{r['parts_median_s'][part]:.2f}" if r["parts_median_s"][part] is not None else "-"
                     for part in PARTS]
            gbps = f"{r['restore_gbps']:.2f}" if r["restore_gbps"] else "-"
            cells = [f"{p['state_gb']:g} GB" if varying == "state" else str(p["workers"]), mode,
                     f"{r['pause_median_s']:.2f} s" if r["pause_median_s"] is not None else "-", *parts,
                     f"{r['regrow_pause_median_s']:.2f} s" if r["regrow_pause_median_s"] is not None else "-",
                     f"{gbps} ({'/'.join(r['restore_tiers']) or '-'}); "
                     + (f"{r['restore_wait_median_s']:.2f} s" if r.get("restore_wait_median_s") is not None else "-"),
                     f"{r['stall_ratio']:.2f}" if r["stall_ratio"] is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: Dict[str, List[Dict[str, Any]]], png: str) -> None:
    """A panel per curve: the pause per preemption by mode, raytrain-spot's parts stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 4.5), squeeze=False)
    for axis, (varying, points) in zip(axes[0], curves.items()):
        xs = [p["state_gb"] if varying == "state" else p["workers"] for p in points]
        bottom = [0.0] * len(points)
        for part in PARTS:
            heights = [p["results"]["raytrain-spot"]["parts_median_s"][part] or 0.0 for p in points]
            axis.bar([str(x) for x in xs], heights, bottom=bottom, label=f"raytrain-spot: {part}", alpha=0.8)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for mode in points[0]["results"]:
            if mode != "raytrain-spot":
                axis.plot([str(x) for x in xs], [p["results"][mode]["pause_median_s"] for p in points],
                          "k--o", label=f"{mode}: pause")
        axis.set_xlabel("model state per rank, GB (3 workers)" if varying == "state" else "workers (0.5 GB state)")
        axis.set_ylabel("pause per preemption, s (median)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="further overrides for every mode")
    parser.add_argument("--state-gb", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--sweep", choices=list(SWEEPS), help="every point of a curve instead of one")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--preemptions", type=int, default=1)
    parser.add_argument("--every-s", type=float, default=45.0)
    parser.add_argument("--first-at-s", type=float, default=30.0,
                        help="the first preemption, after the replay's start: once the group has its warm standbys "
                             "and a measured checkpoint, as a node that lived minutes or hours has")
    parser.add_argument("--notice-s", type=float, default=30.0, help="GCE's preemption notice")
    parser.add_argument("--provisioning-s", type=float, default=10.0)
    parser.add_argument("--tail-s", type=float, default=45.0,
                        help="after the last preemption's slot: the baselines restart about 35 s after a kill")
    parser.add_argument("--micro-batch-s", type=float, default=0.1, help="device time per micro-batch")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--checkpoint-interval-steps", type=int, default=100)
    parser.add_argument("--json", help="write the points here")
    parser.add_argument("--plot", nargs="+", metavar="JSON", help="no runs: tables and a PNG of these --json files")
    parser.add_argument("--png", default="scaling.png")
    args = parser.parse_args()
    # Ray's memory monitor counts the page cache of the checkpoints just written as used (in a
    # container's cgroup) and kills workers over it at a few GB of state; the kernel still guards memory.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

    if args.plot:
        curves = {}
        for path in args.plot:
            with open(path) as f:
                saved = json.load(f)
            curves[saved["sweep"]] = saved["points"]
            print(markdown_table(saved["points"], saved["sweep"]) + "\n")
        plot(curves, args.png)
        return
    grid = SWEEPS[args.sweep] if args.sweep else {"state_gb": [args.state_gb], "workers": [args.workers]}
    points = [point(gb, n, args) for gb in grid["state_gb"] for n in grid["workers"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sweep": args.sweep or "point", "args": vars(args), "points": points}, f, indent=1)
    for p in points:
        print(f"state_gb={p['state_gb']:g} workers={p['workers']} host_copy_s={p['host_copy_s']} "
              f"workdir={p['workdir']}")
        for mode, result in sorted(p["results"].items(), key=lambda item: item[0] == "raytrain-spot"):
            print(headline(mode, result))


if __name__ == "__main__":
    main()
