"""Training throughput of the Hugging Face VLM task: raytrain-spot's loop vs a plain Ray Train loop.

Both train the same model (``HuggingFaceVLMTask``, preset ``tiny-llava`` or ``tiny-idefics3``,
seeded random init) on the same generated data with the same collate and loss, the same global
batch, micro batch and worker count, and AdamW with the same settings, on the same embedded
local cluster (``cluster/embedded.py``: a head raylet plus ``cluster.num_worker_nodes`` virtual
worker nodes on this machine), one after the other:

* **raytrain-spot**: the main command, ``python -m raytrain_spot.run +experiment=hf_vlm ...``,
  in a subprocess, at its defaults but for the sizes: elastic (``trainer.min_workers`` 1 up to
  ``--workers``), Spot-aware, warm standbys, and checkpoints **at the default cadence**
  (``checkpoint.interval_steps`` unset: a first save at step 5 to measure the stall, then the
  interval advisor's choice; a final one at the last step) on all three tiers.
* **plain Ray Train**: a stock ``TorchTrainer`` with a fixed ``ScalingConfig(num_workers=W)``
  running a textbook loop: ``ray.train.torch.prepare_model`` (DDP), the framework's sample order
  (``GlobalSampleOrder``: the same rows in the same order; a ``DistributedSampler(shuffle=True)``
  order over the whole dataset reads across Parquet row groups, which the framework's order avoids)
  fed to a torch ``DataLoader`` as its batch sampler, with the task's collate and
  ``trainer.data_workers`` loader processes (HF Trainer's ``dataloader_num_workers``), the
  framework's gradient accumulation over micro batches and optimizer step (``accumulate``,
  ``update``: the forward/backward/optimizer step is the same code), a constant learning rate, no
  checkpoints, no reports, no agreement collectives, no watchers.

Both modes load with the same number of loader processes per worker (``--data-workers``, the
framework's ``trainer.data_workers``; 0: on the training thread).

Samples/s come from per-step records (the run's ``events.jsonl``; the plain loop writes the same
records): the median over steps after ``--warmup-steps`` of ``samples / duration_s``, and, over
the same steps, samples / wall time from the end of the last warm-up step to the end of the last
step ("span"). A periodic checkpoint's stall falls between two step records, so only the span
figure includes it; both include the background commit's competition for the CPU.

Beside them the benchmark prints the cores each kind of process used over the measured steps
(bench/cpu_accounting.py: Train workers, idle standbys, the driver, Ray's own processes), and
``--modes ... raytrain-spot-warm`` adds the framework with ``elastic.warm_standby=true`` (on the
embedded cluster its default keeps no standbys: CPU training on nodes sharing its cores), so a gap can
be read as who took the cores. ``--profile-s S`` samples the Train workers' stacks with
py-spy for S seconds and reports the share of their CPU each loop's own code takes outside the
shared step and batch loading: the per-step cost of the framework's agreement, events and
capacity watch, which run-to-run variation on shared cores hides in samples/s.

    python bench/bench_hf_vlm.py                          # tiny-llava, 60 steps, ~2-4 minutes on 2 cores
    python bench/bench_hf_vlm.py --preset tiny-idefics3
    python bench/bench_hf_vlm.py --steps 200 --repeats 3 --json hf_vlm.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.cpu_accounting import CpuSampler, loop_own_share, profile_train_workers  # noqa: E402
from raytrain_spot.observe.events import EVENTS_FILE, read_events  # noqa: E402
from raytrain_spot.observe.records import Advice, Checkpoint, CheckpointFailed, Step, to_line  # noqa: E402

MODES = ("plain-ray-train", "raytrain-spot", "raytrain-spot-warm")
DEFAULT_MODES = MODES[:2]
MODE_OVERRIDES = {"raytrain-spot": [], "raytrain-spot-warm": ["elastic.warm_standby=true"]}
"""The framework's modes: its defaults, and with warm standbys (what their imports cost on shared cores)."""
PLAIN_EVENTS = "plain-events.jsonl"
PLAIN_LOOP_FRAME, FRAMEWORK_LOOP_FRAME = "plain_loop_per_worker (", "run_group (raytrain_spot/loop/worker.py"
"""The two training loops, as py-spy names their frames."""


def overrides(args, workdir: str, name: str) -> List[str]:
    """The settings both modes share (the framework gets them on its command line, the plain
    loop composes the same configuration from them)."""
    return ["+experiment=hf_vlm", f"run.name={name}", f"task.model.preset={args.preset}",
            f"trainer.max_steps={args.steps}", f"trainer.max_workers={args.workers}",
            f"trainer.global_batch_size={args.global_batch}", f"trainer.micro_batch_size={args.micro_batch}",
            f"cluster.num_worker_nodes={args.nodes}",
            f"task.model.cache_dir={workdir}/models", f"task.data.cache_dir={workdir}/data",
            f"checkpoint.local_dir={workdir}/node-local", f"checkpoint.head_dir={workdir}/head",
            f"trainer.data_workers={args.data_workers}", "trainer.log_every_steps=1000"]


def run(mode: str, args, workdir: str, repeat: int) -> Tuple[List[Dict[str, Any]], CpuSampler, List[float]]:
    """One run in a fresh process with its own Ray temp dir; its step and checkpoint records, the
    CPU its processes used, and (``--profile-s``) the loop's own share of each Train worker's CPU."""
    name = f"bench-hf-vlm-{mode}-{repeat}"
    settings = overrides(args, workdir, name)
    if mode in MODE_OVERRIDES:
        command = [sys.executable, "-m", "raytrain_spot.run", *settings, *MODE_OVERRIDES[mode],
                   *args.framework_overrides]
        events_path = os.path.join(workdir, "outputs", name, EVENTS_FILE)
    else:
        events_path = os.path.join(workdir, "outputs", name, PLAIN_EVENTS)
        command = [sys.executable, os.path.abspath(__file__), "--plain-run", events_path, "--", *settings]
    log_path = os.path.join(workdir, f"{name}.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=_interruptible,
                                   env={**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rts-", dir="/tmp")})
        cpu = CpuSampler(process.pid)
        profiles: List[str] = []
        profiler = threading.Thread(target=lambda: profiles.extend(profile_train_workers(
            process.pid, args.profile_after_s, args.profile_s, tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)))
                                    ) if args.profile_s else None
        if profiler is not None:
            profiler.start()
        try:
            rc = process.wait(timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)  # the driver shuts its cluster down on the way out
            process.wait(timeout=120)
            rc = "timeout"
        finally:
            cpu.stop()
            if profiler is not None:
                profiler.join()
    if rc != 0:
        raise SystemExit(f"{mode} run failed (exit {rc}); see {log_path}")
    loop_frame = FRAMEWORK_LOOP_FRAME if mode in MODE_OVERRIDES else PLAIN_LOOP_FRAME
    shares = [loop_own_share(path, loop_frame) for path in profiles]
    return read_events(events_path), cpu, [round(share, 4) for share in shares if share is not None]


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a backgrounding shell may have set it to ignored


def analyse(events: List[Dict[str, Any]], cpu: CpuSampler, loop_shares: List[float], warmup: int,
            workers: int) -> Dict[str, Any]:
    steps = [e for e in events if e["ev"] == Step.ev]
    measured = [e for e in steps if e["step"] > warmup]
    other_size = [e["step"] for e in measured if e["world_size"] != workers]
    measured = [e for e in measured if e["world_size"] == workers]
    boundary = next((e for e in steps if e["step"] == warmup), None)
    rates = [(e["samples"][1] - e["samples"][0]) / e["duration_s"] for e in measured]
    span = None
    if boundary is not None and measured and not other_size:
        span = (measured[-1]["samples"][1] - boundary["samples"][1]) / (measured[-1]["t"] - boundary["t"])
    # One checkpoint event per tier: count each save once, by its stall (the first tier reports it).
    saves = {}
    for e in events:
        if e["ev"] == Checkpoint.ev and e["step"] not in saves:
            saves[e["step"]] = e
    return {
        "steps_measured": len(measured),
        "steps_at_other_world_size": other_size,
        "median_samples_per_s": round(statistics.median(rates), 2) if rates else None,
        "span_samples_per_s": round(span, 2) if span else None,
        "median_step_s": round(statistics.median(e["duration_s"] for e in measured), 4) if measured else None,
        "median_data_s": (round(statistics.median(e["data_s"] for e in measured), 4)
                          if measured and "data_s" in measured[0] else None),
        "checkpoints": [{"step": s, "kind": e["kind"], "stall_s": round(e["stall_s"], 4),
                         "in_measured_window": warmup <= s < (measured[-1]["step"] if measured else 0)}
                        for s, e in sorted(saves.items())],
        "advised_interval_steps": [e["interval_steps"] for e in events if e["ev"] == Advice.ev],
        "failed_saves": sum(e["ev"] == CheckpointFailed.ev for e in events),
        # Who used the cores over the measured steps: the gap between the modes, by process kind.
        "cores_by_process_kind": cpu.cores_by_kind(boundary["t"], measured[-1]["t"]) if boundary and measured else None,
        "loop_own_share_of_worker_cpu": loop_shares,
    }


def main() -> None:
    if "--plain-run" in sys.argv:
        return plain_run(sys.argv[sys.argv.index("--plain-run") + 1], sys.argv[sys.argv.index("--") + 1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-llava", help="task.model.preset (tiny-llava, tiny-idefics3)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=3, help="virtual worker nodes of the embedded cluster")
    parser.add_argument("--global-batch", type=int, default=24)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--data-workers", type=int, default=0,
                        help="loader processes per Train worker, in both modes (trainer.data_workers)")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="steps left out of the figures (3 keeps the first periodic save, at step 5, in)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternating")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES,
                        help="raytrain-spot-warm: the framework with elastic.warm_standby=true")
    parser.add_argument("--framework-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="diagnostics only: extra settings for the framework's runs (e.g. checkpoint.interval_steps=0)")
    parser.add_argument("--profile-s", type=float, default=0.0,
                        help="sample every Train worker's stacks with py-spy for this long (0: off) and report the "
                             "share of their CPU the loop's own code takes, outside the step and the batch loading")
    parser.add_argument("--profile-after-s", type=float, default=15.0,
                        help="seconds after the Train workers appear to start sampling (past their start-up)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.steps <= args.warmup_steps + 1:
        parser.error("--steps must exceed --warmup-steps + 1")

    workdir = tempfile.mkdtemp(prefix="bench-hf-vlm-")
    results: Dict[str, List[Dict[str, Any]]] = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        for mode in args.modes:
            started = time.time()
            result = analyse(*run(mode, args, workdir, repeat), args.warmup_steps, args.workers)
            result["bench_wall_s"] = round(time.time() - started, 1)
            results[mode].append(result)
            print(f"{mode} (run {repeat + 1}): {json.dumps(result)}", flush=True)

    print(f"\npreset={args.preset} steps={args.steps} (first {args.warmup_steps} left out) workers={args.workers} "
          f"global_batch={args.global_batch} micro_batch={args.micro_batch} data_workers={args.data_workers} "
          f"nodes={args.nodes} "
          f"repeats={args.repeats}{' framework_overrides=' + ' '.join(args.framework_overrides) if args.framework_overrides else ''}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; workdir {workdir}")
    summary = {}
    print(f"{'mode':18} {'median samples/s':>17} {'span samples/s':>15} {'median step s':>14} {'steps':>6}")
    for mode, runs in results.items():
        summary[mode] = {key: _median([r[key] for r in runs]) for key in
                         ("median_samples_per_s", "span_samples_per_s", "median_step_s")}
        print(f"{mode:18} {summary[mode]['median_samples_per_s']:>17} {summary[mode]['span_samples_per_s']:>15} "
              f"{summary[mode]['median_step_s']:>14} {sum(r['steps_measured'] for r in runs):>6}")
    for framework_mode in [m for m in summary if m in MODE_OVERRIDES and "plain-ray-train" in summary]:
        plain, spot = summary["plain-ray-train"], summary[framework_mode]
        for key, what in (("median_samples_per_s", "median"), ("span_samples_per_s", "span")):
            if plain[key] and spot[key]:
                ratio = spot[key] / plain[key]
                print(f"ratio {framework_mode} / plain ({what}): {ratio:.3f}  "
                      f"(target >= 0.98: {'met' if ratio >= 0.98 else 'NOT met'})")
    for framework_mode in [m for m in results if m in MODE_OVERRIDES]:
        for r in results[framework_mode]:
            periodic = [c for c in r["checkpoints"] if c["kind"] == "periodic"]
            cadence = ("at the default cadence (checkpoint.interval_steps unset: first save at step 5, then the "
                       "advisor's interval" if not any(o.startswith("checkpoint.") for o in args.framework_overrides)
                       else "NOT at the default cadence (--framework-overrides); advised interval")
            print(f"{framework_mode} checkpoints {cadence} {r['advised_interval_steps'] or 'not yet set'} steps): "
                  f"periodic at steps {[c['step'] for c in periodic]} "
                  f"(in the measured window: {[c['step'] for c in periodic if c['in_measured_window']]}, "
                  f"stall {[c['stall_s'] for c in periodic]} s), final at {[c['step'] for c in r['checkpoints'] if c['kind'] == 'final']}; "
                  f"failed saves {r['failed_saves']}")
    print(f"cores used over the measured steps, by process kind ({os.cpu_count()} CPUs; bench/cpu_accounting.py):")
    for mode, runs in results.items():
        for repeat, r in enumerate(runs):
            print(f"  {mode} (run {repeat + 1}): {r['cores_by_process_kind']}")
    if args.profile_s:
        print(f"the loop's own code (outside the step and the batch loading), share of each Train worker's on-CPU "
              f"samples over {args.profile_s:g} s (py-spy):")
        for mode, runs in results.items():
            print(f"  {mode}: {[r['loop_own_share_of_worker_cpu'] for r in runs]}")
    if any(r["steps_at_other_world_size"] for runs in results.values() for r in runs):
        print("WARNING: some steps ran at another world size (left out of the medians, no span figure)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": results, "summary": summary}, f, indent=1)


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


# -- the plain Ray Train baseline (runs in its own process: --plain-run EVENTS -- OVERRIDES) ----------

def plain_run(events_path: str, settings: List[str]) -> None:
    """Compose the configuration the framework would, then train it with a stock TorchTrainer."""
    from hydra import compose, initialize_config_dir

    from raytrain_spot.config.schema import load_config, register_configs
    from raytrain_spot.loop.task import build_task

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        cfg = load_config(compose(config_name="config", overrides=settings))
    task = build_task(cfg.task)
    print("plain Ray Train on", task.prepare(cfg.run.seed), flush=True)  # writes the preset and the data, as the driver does

    from raytrain_spot.cluster.embedded import connect

    with connect(cfg.cluster):
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.train.v2.api.config import LoggingConfig

        from raytrain_spot.loop.ray_trainer import ray_storage

        trainer = TorchTrainer(
            plain_loop_per_worker,
            train_loop_config={"config": cfg.to_dict(), "events_path": events_path},
            scaling_config=ScalingConfig(num_workers=cfg.trainer.max_workers, use_gpu=cfg.trainer.use_gpu,
                                         resources_per_worker=cfg.trainer.resources_per_worker),
            run_config=RunConfig(name=cfg.run.name, **ray_storage(cfg.storage.resolved_uri(os.getcwd())),
                                 logging_config=LoggingConfig(log_level="WARNING")),
            torch_config=TorchConfig(backend="nccl" if cfg.trainer.use_gpu else "gloo",
                                     timeout_s=int(cfg.trainer.collective_timeout_s)),
        )
        trainer.fit()
    print("plain Ray Train finished", flush=True)


def plain_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """A textbook Ray Train loop over the task: DDP, a torch DataLoader with ``trainer.data_workers``
    processes (HF Trainer's ``dataloader_num_workers``) over the framework's sample order, a constant
    learning rate."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader

    from raytrain_spot.config.schema import config_from_dict
    from raytrain_spot.loop.optim import build_optimizer
    from raytrain_spot.loop.sample_order import GlobalSampleOrder, rank_positions
    from raytrain_spot.loop.step import accumulate, split, update
    from raytrain_spot.loop.task import build_task, move_to
    from raytrain_spot.loop.worker import sample_spans

    cfg = config_from_dict(loop_config["config"])
    task = build_task(cfg.task)
    torch.set_num_threads(cfg.trainer.torch_threads)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    global_batch, steps = cfg.trainer.global_batch_size, cfg.trainer.max_steps

    dataset = task.build_dataset(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model = ray.train.torch.prepare_model(task.build_model(), parallel_strategy_kwargs={
        "find_unused_parameters": task.unused_parameters})
    optimizer = build_optimizer(task.param_groups(model.module), cfg.optim)  # AdamW at optim.lr, constant

    # The framework's sample order, so both loops read the same rows: only the loop around them differs.
    order = GlobalSampleOrder(sample_spans(dataset), cfg.run.seed)
    step_micro_batches = [split(order.rows_at(rank_positions(step * global_batch, global_batch, rank, world_size)),
                                cfg.trainer.micro_batch_size) for step in range(steps)]
    loader = iter(DataLoader(dataset, batch_sampler=[rows for step in step_micro_batches for rows in step],
                             collate_fn=task.collate, num_workers=cfg.trainer.loader_processes,
                             pin_memory=device.type == "cuda"))
    records = []
    for step in range(steps):
        step_started = time.time()
        micro_batches = [(move_to(next(loader), device), len(rows)) for rows in step_micro_batches[step]]
        data_s = time.time() - step_started
        loss_sum = accumulate(model, micro_batches, task.loss, world_size / global_batch)
        grad_norm = update(model, optimizer, cfg.optim.grad_clip)
        if rank == 0:  # the loss is rank 0's share's: no collective beyond DDP's
            now = time.time()
            first = step * global_batch
            records.append(to_line(Step(step=step + 1, world_size=world_size, samples=[first, first + global_batch],
                                        loss=loss_sum / sum(size for _, size in micro_batches), lr=cfg.optim.lr,
                                        grad_norm=grad_norm, duration_s=now - step_started, data_s=data_s), now))
    if rank == 0:  # every rank runs on this machine (the embedded cluster)
        os.makedirs(os.path.dirname(loop_config["events_path"]), exist_ok=True)
        with open(loop_config["events_path"], "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)


if __name__ == "__main__":
    main()
