"""Recovery from Spot preemptions: Ray Train 2.60's own paths vs raytrain-spot, same machine, same trace.

Every mode trains the same tiny VLM on the embedded cluster while the Spot simulator replays
the same window of a Spot trace. The baselines are plain Ray Train with Ray's own elastic and
failure policies and timings and periodic checkpoints: ``ray-preemption-api`` follows Ray
2.60's documented preemption recipe (``get_preemption_info()`` after every step, a just-in-time
checkpoint at the first notice, training on until the node dies; the drain comes from this
project's watcher turning the metadata notice into a Ray drain, since Ray reads no GCE notice);
``plain-ray-train`` has no notice handling (no watchers, so Ray only sees nodes die, as on GCE);
``plain-ray-train-fixed`` waits for its replacement at a fixed size. raytrain-spot gets the
notice through the metadata server and its watcher.

Per preemption it reports the seconds from the notice (and from the kill) to the first step
of the next worker group, where they went (the loop hearing of the notice, Ray Train's restart
of the group, the training function's startup, the first step), and steps redone; over the
replay, the steps trained and never redone, goodput = productive step time / wall time, and
the **oracle**: the steps an ideal policy would train knowing the capacity in advance (at every
moment the fastest world size this run measured that fits the nodes alive, no restart cost).
Then it projects onto the trace's real time scale: the measured overhead per disruption times
the trace's real disruption rate, plus checkpoint stalls at a stated interval. Beside them, the
cores each kind of process used from the replay's start to its first disruption (the steady
state every mode trains in; bench/cpu_accounting.py). A trace replay compresses the trace's time
(its ``gap_seconds`` per tick into ``--tick-s``), and the node-lifetime prior the regrow rule
starts from (``checkpoint.mtbi_prior_s``) is compressed by the same factor. It ends with a
Markdown table per scenario; ``--reanalyse JSON`` recomputes everything from the event logs
of the run that wrote that ``--json`` (its working directory is kept).

    python bench/bench_recovery.py                       # ~8 minutes on 2 cores
    python bench/bench_recovery.py --start-tick 180 --ticks 50 --tick-s 4 --notice-s 10
    python bench/bench_recovery.py --scenarios scripted --experiment hf_vlm trainer.global_batch_size=24
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.cpu_accounting import IDLE_WORKER, TRAIN_WORKER, CpuSampler  # noqa: E402
from raytrain_spot.config.schema import CheckpointingConfig  # noqa: E402
from raytrain_spot.observe.events import read_events  # noqa: E402
from raytrain_spot.observe.records import Add, Chaos, Checkpoint, Group, Handoff, Kill, Notice, Step  # noqa: E402

DEFAULT_TRACE = os.path.join(REPO, "..", "shared", "traces",
                             "preemption__4-node__aws-08-03-2023__us-west-2c_v100_1.json")
MODES = {
    "plain-ray-train": ["chaos.watchers=false"],
    # Ray 2.60's documented recipe: get_preemption_info() every step, a JIT checkpoint at the first
    # notice, train on until the node dies, max_preemption_failures=-1; the drain comes from this
    # project's watcher turning the metadata notice into a Ray drain (Ray reads no GCE notice itself).
    "ray-preemption-api": [],
    "raytrain-spot": [],
    # Warm standbys, off by default on the embedded cluster (CPU training on nodes sharing the machine's cores).
    "raytrain-spot-warm": ["elastic.warm_standby=true"],
    # The textbook Spot setup: a fixed worker count that waits for its replacement node.
    "plain-ray-train-fixed": ["chaos.watchers=false", "trainer.min_workers=3"],
}
BASELINE_OF = {"plain-ray-train": "plain-ray-train", "plain-ray-train-fixed": "plain-ray-train",
               "ray-preemption-api": "ray-preemption-api"}
"""The modes that run one of bench/baselines.py's strategies instead of the product's."""
DEFAULT_MODES = ["ray-preemption-api", "plain-ray-train", "raytrain-spot"]
UNTIMED_STEPS = 2
"""A group's first steps (allocation, first collectives) are left out of its step time, as the loop does."""


def scripted_events(preemptions: int, every_s: float, restore_after_s: float, no_notice: bool = False,
                    first_at_s: float = 10.0) -> str:
    """One node preempted every ``every_s`` seconds from ``first_at_s`` on (powered off without a
    notice, with ``no_notice``), each replaced ``restore_after_s`` after its power-off."""
    without = ",no_notice:true" if no_notice else ""
    steps = [f"{{action:preempt,node:{i % 3},at_s:{first_at_s + i * every_s}{without}}},"
             f"{{action:restore,after_s:{restore_after_s}}}" for i in range(preemptions)]
    return "chaos.events=[" + ",".join(steps) + "]"


def run(mode: str, scenario: str, args, workdir: str) -> Tuple[str, CpuSampler]:
    """Run the main command under the Spot simulator; stop it once the scenario (plus a tail) is
    over. Its event log's path, and the CPU its processes used."""
    name = f"bench-{scenario}-{mode}"
    if scenario == "trace":
        chaos = ["+chaos=trace", f"chaos.trace={os.path.abspath(args.trace)}", f"chaos.tick_s={args.tick_s}",
                 f"chaos.start_tick={args.start_tick}", f"chaos.max_ticks={args.ticks}",
                 f"chaos.provisioning_s={args.provisioning_s}", f"chaos.no_notice={args.no_notice}"]
        chaos += compressed_lifetime_prior(args)
    else:
        chaos = ["+chaos=events", scripted_events(args.preemptions, args.every_s, args.provisioning_s, args.no_notice,
                                                  args.first_at_s)]
    main_command = ([sys.executable, os.path.join(REPO, "bench", "baselines.py"), BASELINE_OF[mode]]
                    if mode in BASELINE_OF else [sys.executable, "-m", "raytrain_spot.run"])
    command = [*main_command, f"+experiment={args.experiment}", f"run.name={name}",
               "trainer.max_steps=1000000", f"checkpoint.interval_steps={args.checkpoint_interval_steps}",
               f"checkpoint.local_dir={workdir}/node-local", f"checkpoint.head_dir={workdir}/head",
               *chaos, f"chaos.notice_s={args.notice_s}", "trainer.log_every_steps=100", *MODES[mode], *args.overrides]
    events_path = run_events(workdir, scenario, mode)
    log = open(os.path.join(workdir, f"{name}.log"), "w")
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")
    process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_interruptible,
                               env={**os.environ, "RAY_TMPDIR": ray_tmp})
    cpu = CpuSampler(process.pid)
    replay_s = scenario_length_s(scenario, args)
    started = None
    while process.poll() is None:
        time.sleep(1)
        if started is None and os.path.exists(events_path):
            started = next((e["t"] for e in read_events(events_path) if e["ev"] == Chaos.ev), None)
        if started is not None and time.time() > started + replay_s + args.tail_s:
            process.send_signal(signal.SIGINT)  # the driver shuts the cluster down on its way out
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                # A stop reaches the workers at a step: a group that waits for capacity (the fixed-size job's
                # at a replay's end) takes none. The event log up to here is the run's.
                print(f"{name}: still running 120 s after SIGINT (no group trained to take the stop): killed",
                      file=sys.stderr, flush=True)
                kill_run(process, ray_tmp)
    cpu.stop()
    log.close()
    # The event log is what the analysis reads; a mode's checkpoints (gigabytes with a large state,
    # one set per mode) would fill the disk under the modes after it.
    for checkpoints in ("node-local", "head", os.path.join("outputs", "storage")):
        shutil.rmtree(os.path.join(workdir, checkpoints), ignore_errors=True)
    return events_path, cpu


def kill_run(process: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the driver and every process of its cluster (those started with its RAY_TMPDIR)."""
    import psutil

    process.kill()
    process.wait()
    for other in psutil.process_iter(["pid"]):
        try:
            if other.environ().get("RAY_TMPDIR") == ray_tmp:
                other.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def compressed_lifetime_prior(args) -> List[str]:
    """A replay compresses the trace's time ``args.compression``-fold, and with it how long Spot
    nodes live: the prior for a node's lifetime (``checkpoint.mtbi_prior_s``, which the regrow rule
    weighs against this run's observed interruptions) is compressed by the same factor, so the
    replayed run believes what a run at the trace's real rate would. Unless an override sets it."""
    if any(o.startswith("checkpoint.mtbi_prior_s=") for o in args.overrides):
        return []
    return [f"checkpoint.mtbi_prior_s={CheckpointingConfig.mtbi_prior_s / args.compression:.1f}"]


def cores_before_first_disruption(events: List[Dict[str, Any]], cpu: CpuSampler) -> Dict[str, float]:
    """Cores by process kind from the replay's start to its first notice or kill: the steady state
    every mode trains in, where a slower step shows who took the cores."""
    t0 = next(e["t"] for e in events if e["ev"] == Chaos.ev)
    first = first_disruption_t(events, t0)
    return cpu.cores_by_kind(t0, first) if first else {}


def run_events(workdir: str, scenario: str, mode: str) -> str:
    return os.path.join(workdir, "outputs", f"bench-{scenario}-{mode}", "events.jsonl")


def _interruptible() -> None:
    """The run is stopped with SIGINT, which a shell that started this benchmark in the
    background may have set to ignored (children inherit that): give the run the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def scenario_length_s(scenario: str, args) -> float:
    if scenario == "trace":
        return args.ticks * args.tick_s
    return args.first_at_s + args.preemptions * args.every_s


def analyse(events: List[Dict[str, Any]], replay_s: float) -> Dict[str, Any]:
    t0 = next(e["t"] for e in events if e["ev"] == Chaos.ev)
    window_end = t0 + replay_s
    steps = [e for e in events if e["ev"] == Step.ev]
    groups = [e for e in events if e["ev"] == Group.ev]
    seen, redone, trained = set(), 0, 0
    productive = redone_s = 0.0
    redone_steps = set()
    for later in reversed(steps):  # a step done again later: the earlier run of it was wasted
        if later["step"] in seen:
            redone_steps.add(id(later))
        seen.add(later["step"])
    for e in steps:
        start = e["t"] - e["duration_s"]
        in_window = t0 <= start and e["t"] <= window_end
        if id(e) in redone_steps:
            redone += 1
            redone_s += e["duration_s"] if in_window else 0.0
        elif in_window:
            productive += e["duration_s"]
            trained += 1
    recoveries = []
    for disruption in (e for e in events if e["ev"] in (Notice.ev, Kill.ev) and t0 <= e["t"] <= window_end):
        if disruption["ev"] == Kill.ev and any(n["ev"] == Notice.ev and n["node"] == disruption["node"]
                                               for n in events):
            continue  # counted at its notice
        kill = next((k for k in events if k["ev"] == Kill.ev and k["node"] == disruption["node"]), None)
        # Training again without the lost node: a group that still holds it (a regrow between the
        # notice and the kill) has not recovered from this preemption.
        group = next((g for g in groups if g["t"] > disruption["t"] and disruption["node"] not in g["nodes"]), None)
        if group is None:
            continue
        first = next((s for s in steps if s["t"] > group["t"]), None)
        if first is None:
            continue
        last = max((s["t"] for s in steps if s["t"] < group["t"]), default=None)
        recoveries.append({
            "from_notice_s": first["t"] - disruption["t"],
            "paused_s": first["t"] - last if last is not None else None,
            "from_kill_s": first["t"] - kill["t"] if kill and kill["t"] < first["t"] else None,
            "new_world_size": group["world_size"],
            "capacity_left": group["world_size"] > 0,
        })
    return {
        "replay_s": replay_s,
        "capacity": capacity_timeline(events, t0, window_end),
        "step_s_by_world_size": step_time_by_world_size(steps, groups),
        "recovery_phases_s": recovery_phases(events, t0, window_end),
        "productive_s": round(productive, 1),
        "goodput": round(productive / replay_s, 4),
        "steps_trained": trained,  # in the replay window and never redone: progress, whatever the step time
        "steps_redone": redone,
        "redone_s": round(redone_s, 1),
        "preemptions": len(recoveries),
        "recovery_from_notice_s": _stats([r["from_notice_s"] for r in recoveries]),
        "recovery_from_kill_s": _stats([r["from_kill_s"] for r in recoveries if r["from_kill_s"] is not None]),
        # No step between the old group's last and the new group's first: what a preemption stops training for.
        "paused_s": _stats([r["paused_s"] for r in recoveries if r["paused_s"] is not None]),
        "restarts": len(groups) - 1,
        "stall_per_checkpoint_s": _stats([e["stall_s"] for e in events
                                          if e["ev"] == Checkpoint.ev and e["stall_s"] > 0]),
        "step_time_s": _stats([e["duration_s"] for e in steps]),
        "before_first_disruption": steady_state(events, steps, t0, window_end),
    }


def first_disruption_t(events: List[Dict[str, Any]], t0: float) -> Optional[float]:
    return next((e["t"] for e in events if e["ev"] in (Notice.ev, Kill.ev) and e["t"] > t0), None)


def steady_state(events: List[Dict[str, Any]], steps: List[Dict[str, Any]], t0: float,
                 window_end: float) -> Dict[str, Any]:
    """From the replay's start to its first notice or kill every mode trains its first group
    undisturbed: the steps it trained then and their median time (the loop's and its neighbours'
    cost with nothing to recover from)."""
    end = first_disruption_t(events, t0) or window_end
    undisturbed = [e for e in steps if t0 <= e["t"] - e["duration_s"] and e["t"] <= end]
    return {"seconds": round(end - t0, 1), "steps": len(undisturbed),
            "median_step_s": round(statistics.median(e["duration_s"] for e in undisturbed), 4) if undisturbed else None}


def capacity_timeline(events: List[Dict[str, Any]], t0: float, window_end: float) -> List[List[float]]:
    """[[seconds into the replay, Spot worker nodes alive]] at every change: a node counts from its
    ``add`` to its ``kill``, notice or not (an ideal policy trains on a noticed node until it dies)."""
    alive, timeline = set(), []
    for e in events:
        if e["ev"] == Add.ev and e.get("pricing") == "spot":
            alive.add(e["node"])
        elif e["ev"] == Kill.ev:
            alive.discard(e["node"])
        else:
            continue
        at = max(e["t"], t0) - t0
        if e["t"] <= window_end:
            if timeline and timeline[-1][0] == round(at, 2):
                timeline[-1][1] = len(alive)
            else:
                timeline.append([round(at, 2), len(alive)])
    return timeline


def step_time_by_world_size(steps: List[Dict[str, Any]], groups: List[Dict[str, Any]]) -> Dict[str, float]:
    """Median step seconds at each world size, leaving out each group's first UNTIMED_STEPS steps."""
    by_size: Dict[int, List[float]] = {}
    starts = sorted(g["t"] for g in groups)
    group, in_group = -1, 0
    for e in steps:  # in time order, as the log is
        while group + 1 < len(starts) and starts[group + 1] <= e["t"]:
            group, in_group = group + 1, 0
        if in_group >= UNTIMED_STEPS:
            by_size.setdefault(e["world_size"], []).append(e["duration_s"])
        in_group += 1
    return {str(size): round(statistics.median(values), 4) for size, values in sorted(by_size.items())}


def oracle_steps(capacity: List[List[float]], replay_s: float, step_s: Dict[str, float]) -> int:
    """Steps an ideal policy trains in the window knowing the trace in advance: at every moment the
    fastest measured world size that fits the nodes alive (one worker per node), no restart cost,
    nothing redone."""
    def rate(nodes: int) -> float:
        return max((1 / seconds for size, seconds in step_s.items() if 0 < int(size) <= nodes), default=0.0)

    steps = 0.0
    for (start, nodes), (end, _) in zip(capacity, capacity[1:] + [[replay_s, 0]]):
        steps += max(min(end, replay_s) - start, 0.0) * rate(nodes)
    return int(steps)


def fastest_step_s(results: List[Dict[str, Any]]) -> Dict[str, float]:
    """The fastest median step time any mode measured at each world size in this run."""
    best: Dict[str, float] = {}
    for result in results:
        for size, seconds in result["step_s_by_world_size"].items():
            best[size] = min(best.get(size, seconds), seconds)
    return best


def recovery_phases(events: List[Dict[str, Any]], t0: float, window_end: float) -> Optional[Dict[str, float]]:
    """Where the seconds from a notice to training again go, medians over the window's notices that
    led to a handoff: the loop hearing of it, Ray Train restarting the group up to the training
    function, the training function's startup (data, model, restore, DDP), and the first step."""
    phases: Dict[str, List[float]] = {"notice_to_handoff": [], "handoff_to_train_function": [],
                                      "train_function_startup": [], "first_step": []}
    for notice in (e for e in events if e["ev"] == Notice.ev and t0 <= e["t"] <= window_end):
        handoff = next((e for e in events if e["ev"] == Handoff.ev and e["t"] >= notice["t"]), None)
        group = next((e for e in events if e["ev"] == Group.ev and handoff and e["t"] > handoff["t"]), None)
        first = next((e for e in events if e["ev"] == Step.ev and group and e["t"] > group["t"]), None)
        if not (handoff and handoff.get("reason") == "preemption" and group and first):
            continue
        startup = sum(group["startup_s"].values())
        phases["notice_to_handoff"].append(handoff["t"] - notice["t"])
        phases["handoff_to_train_function"].append(group["t"] - startup - handoff["t"])
        phases["train_function_startup"].append(startup)
        phases["first_step"].append(first["t"] - group["t"])
    if not phases["first_step"]:
        return None
    return {name: round(statistics.median(values), 2) for name, values in phases.items()}


def _stats(values: List[float]) -> Optional[Dict[str, float]]:
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "mean": round(statistics.fmean(values), 2),
            "min": round(min(values), 2), "max": round(max(values), 2), "n": len(values)}


def project(result: Dict[str, Any], trace: List[int], gap_s: float, interval_s: float) -> Dict[str, float]:
    """Goodput on the trace's real time scale.

    Per disruption: the measured non-productive time of the replay per preemption (restarts,
    shrink and regrow, waits), not counting redone steps; plus, where steps were redone (no
    just-in-time checkpoint), half a checkpoint interval of lost work on average. Per
    checkpoint: the measured stall.
    """
    hours = len(trace) * gap_s / 3600
    per_hour = sum(1 for a, b in zip(trace, trace[1:]) if b < a) / hours
    restarts = (result["replay_s"] - result["productive_s"] - result["redone_s"]) / max(result["preemptions"], 1)
    lost = interval_s / 2 if result["steps_redone"] else 0.0
    stall = result["stall_per_checkpoint_s"]["mean"] if result["stall_per_checkpoint_s"] else 0.0
    badput_per_hour = per_hour * (restarts + lost) + (3600 / interval_s) * stall
    return {"disruptions_per_hour": round(per_hour, 3), "restart_overhead_per_disruption_s": round(restarts, 1),
            "lost_work_per_disruption_s": lost, "checkpoint_interval_s": interval_s,
            "projected_goodput": round(1 - badput_per_hour / 3600, 4)}


def cores_split(cores: Optional[Dict[str, float]]) -> str:
    if not cores:
        return "-"
    workers, idle = cores.get(TRAIN_WORKER, 0.0), cores.get(IDLE_WORKER, 0.0)
    return f"{workers:.2f} / {idle:.2f} / {sum(cores.values()) - workers - idle:.2f}"


def markdown_table(by_mode: Dict[str, Dict[str, Any]]) -> str:
    """One scenario's figures, a column per mode, for docs/benchmarks.md."""
    def seconds(stats: Optional[Dict[str, float]], key: str = "median") -> str:
        return "-" if not stats else f"{stats[key]:.1f} s"

    rows = {
        "steps trained in the replay, never redone": lambda r: str(r["steps_trained"]),
        "oracle: steps an ideal policy trains on this capacity": lambda r: str(r["oracle_steps"]),
        "share of the oracle": lambda r: f"{r['steps_trained'] / max(r['oracle_steps'], 1):.2f}",
        "training again, from the notice (median; max)": lambda r: (
            f"{seconds(r['recovery_from_notice_s'])} ({seconds(r['recovery_from_notice_s'], 'max')})"),
        "training again, from the kill (median)": lambda r: seconds(r["recovery_from_kill_s"]),
        "training paused: the last step to the next group's first (median; max)": lambda r: (
            f"{seconds(r['paused_s'])} ({seconds(r['paused_s'], 'max')})"),
        "of which: to the handoff / Ray Train's restart / training function startup / first step (medians)": lambda r: (
            " / ".join(f"{v:.1f}" for v in r["recovery_phases_s"].values()) + " s" if r["recovery_phases_s"] else "-"),
        "before the first disruption: seconds / steps trained / median step": lambda r: (
            "{seconds:.0f} s / {steps} / {median_step_s} s".format(**r["before_first_disruption"])),
        "cores before the first disruption: Train workers / idle worker processes (standbys) / all else": lambda r: (
            cores_split(r["cores_before_first_disruption"])),
        "steps redone": lambda r: str(r["steps_redone"]),
        "worker-group restarts": lambda r: str(r["restarts"]),
        "goodput over the replay": lambda r: f"{r['goodput']:.3f}",
        "projected goodput, real trace rate": lambda r: f"{r['projection']['projected_goodput']:.4f}",
    }
    lines = ["| | " + " | ".join(by_mode) + " |", "|---" * (len(by_mode) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r) for r in by_mode.values()) + " |" for name, cell in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--experiment", default="vlm", help="the task: vlm (the built-in VLM) or hf_vlm")
    parser.add_argument("overrides", nargs="*", help="further overrides for every mode, e.g. task.model.preset=...")
    parser.add_argument("--start-tick", type=int, default=180)
    parser.add_argument("--ticks", type=int, default=50)
    parser.add_argument("--tick-s", type=float, default=4.0)
    parser.add_argument("--notice-s", type=float, default=10.0)
    parser.add_argument("--provisioning-s", type=float, default=3.0)
    parser.add_argument("--tail-s", type=float, default=30.0)
    parser.add_argument("--checkpoint-interval-steps", type=int, default=100)
    parser.add_argument("--projected-interval-s", type=float, default=600.0,
                        help="checkpoint interval assumed on the real time scale (the seed guide's local tier: 10 min)")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--scenarios", nargs="+", default=["scripted", "trace"])
    parser.add_argument("--preemptions", type=int, default=3, help="scripted: single-node preemptions")
    parser.add_argument("--every-s", type=float, default=60.0, help="scripted: seconds between them")
    parser.add_argument("--first-at-s", type=float, default=10.0, help="scripted: the first one, after the replay's start")
    parser.add_argument("--no-notice", action="store_true",
                        help="every node loss without a notice (a powered-off VM): scripted and trace")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--reanalyse", metavar="JSON",
                        help="no new runs: recompute the figures from the event logs of the run that wrote this --json")
    args = parser.parse_args()

    earlier: Dict[str, Any] = {}
    if args.reanalyse:
        with open(args.reanalyse) as f:
            earlier = json.load(f)
        args = argparse.Namespace(**{"first_at_s": 10.0, **earlier["args"], "json": args.json, "reanalyse": args.reanalyse})
    with open(args.trace) as f:
        raw = json.load(f)
    args.compression = raw["metadata"]["gap_seconds"] / args.tick_s
    workdir = earlier.get("workdir") or tempfile.mkdtemp(prefix="bench-recovery-")
    results: Dict[str, Dict[str, Any]] = {}
    for scenario in args.scenarios:
        for mode in args.modes:
            started = time.time()
            events_path, cpu = (run_events(workdir, scenario, mode), None) if earlier else run(mode, scenario, args,
                                                                                              workdir)
            events = read_events(events_path)
            result = analyse(events, scenario_length_s(scenario, args))
            result["cores_before_first_disruption"] = (
                earlier["results"][f"{scenario}/{mode}"].get("cores_before_first_disruption") if earlier
                else cores_before_first_disruption(events, cpu))
            result["projection"] = project(result, raw["data"], raw["metadata"]["gap_seconds"],
                                           args.projected_interval_s)
            result["bench_wall_s"] = (earlier["results"][f"{scenario}/{mode}"]["bench_wall_s"] if earlier
                                      else round(time.time() - started, 1))
            results[f"{scenario}/{mode}"] = result
            print(f"{scenario}/{mode}: {json.dumps(result)}", flush=True)
        scenario_results = [r for key, r in results.items() if key.startswith(f"{scenario}/")]
        step_s = fastest_step_s(scenario_results)
        for result in scenario_results:
            result["oracle_steps"] = oracle_steps(result["capacity"], result["replay_s"], step_s)

    print(f"trace={os.path.basename(args.trace)} ticks={args.start_tick}..{args.start_tick + args.ticks} "
          f"tick_s={args.tick_s} (time compressed {args.compression:g}x; trace runs with "
          f"{' '.join(compressed_lifetime_prior(args)) or 'the given checkpoint.mtbi_prior_s'}) notice_s={args.notice_s} "
          f"no_notice={args.no_notice} workdir={workdir}")
    for key, r in results.items():
        notice, kill = r["recovery_from_notice_s"] or {}, r["recovery_from_kill_s"] or {}
        print(f"{key:26} preemptions={r['preemptions']} recovery_from_notice_median_s={notice.get('median')} "
              f"recovery_from_kill_median_s={kill.get('median')} steps_redone={r['steps_redone']} "
              f"goodput={r['goodput']} projected_goodput={r['projection']['projected_goodput']} "
              f"steps_trained={r['steps_trained']} oracle_steps={r['oracle_steps']} "
              f"recovery_phases_s={r['recovery_phases_s']}")
        print(f"{'':26} cores before the first disruption, by process kind (bench/cpu_accounting.py): "
              f"{r['cores_before_first_disruption']}")
    for scenario in args.scenarios:  # the headline baseline: Ray 2.60's own preemption path
        ray_api, spot = results.get(f"{scenario}/ray-preemption-api"), results.get(f"{scenario}/raytrain-spot")
        if ray_api and spot and ray_api["recovery_from_notice_s"] and spot["recovery_from_notice_s"]:
            speedup = ray_api["recovery_from_notice_s"]["median"] / spot["recovery_from_notice_s"]["median"]
            print(f"{scenario}: recovery from the notice {speedup:.1f}x faster than ray-preemption-api")
        baselines = {key: r["steps_trained"] for key, r in results.items()
                     if key.startswith(f"{scenario}/") and not key.endswith("/raytrain-spot")}
        if spot and baselines:
            best = max(baselines, key=baselines.get)
            print(f"{scenario}: steps trained {spot['steps_trained']} against the best baseline's {baselines[best]} "
                  f"({best}); oracle {spot['oracle_steps']}")
    for scenario in args.scenarios:
        print(markdown_table({key.split("/", 1)[1]: r for key, r in results.items() if key.startswith(f"{scenario}/")}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "workdir": workdir, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
