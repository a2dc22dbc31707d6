"""Checkpoints of full fine-tuning vs LoRA on the same base model: bytes, stall and commit time.

One base (``--preset``; default ``smolvlm-256m``, the published SmolVLM-256M configuration at its
real size with a seeded random init, or ``tiny-llava`` where that preset is missing) is built
twice through ``HuggingFaceVLMTask.build_model``, as a worker builds it: once trained in full
(``task.lora.r=0``) and once with LoRA adapters (``task.lora.r=--lora-r``, the task's default
``target_modules``: the attention projections). Each gets the framework's AdamW
(``build_optimizer`` over ``task.param_groups``) and one optimizer step on zero gradients, so the
optimizer holds its moments for exactly the parameters that train. Then it is saved, in the same
process and without Ray, through a real ``CheckpointManager`` with the parts the training loop
gives it (``{"model": ModelWeights(model), "optimizer": optimizer}``: frozen parameters are left
out): the node-local tier and a durable tier, both ``LocalStore`` directories on a temp dir (as
``tests/test_checkpoint_manager.py`` builds them), over a gloo process group of one. Per mode:

* trainable and total parameters;
* ``bytes``: the state file of one checkpoint on disk (each tier holds one copy);
* ``stall``: what ``save()`` returns, the snapshot into host buffers that training waits for; the
  first save (it allocates the buffers) and the median of the later ones;
* ``commit``: from the call to ``save()`` until both tiers have committed (``wait()``), median;
* ``frozen_fingerprint_s``: the pass over a strided sample of the frozen parameters that
  ``ModelWeights`` makes when it is created (at start-up, before training: in no save's stall);

and full / LoRA ratios of each. CPU only:

    python bench/bench_lora_checkpoint.py                         # smolvlm-256m, float32, ~3 minutes on 2 cores, ~7 GB RAM, up to ~15 GB in /tmp
    python bench/bench_lora_checkpoint.py --dtype bfloat16
    python bench/bench_lora_checkpoint.py --preset tiny-llava --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from raytrain_spot.checkpoint.format import STATE_FILE, checkpoint_key, read_manifest  # noqa: E402
from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest  # noqa: E402
from raytrain_spot.checkpoint.state import LoopState, ModelWeights  # noqa: E402
from raytrain_spot.checkpoint.tiers import StoreTier  # noqa: E402
from raytrain_spot.config.schema import OptimConfig  # noqa: E402
from raytrain_spot.observe.events import EventLog  # noqa: E402
from raytrain_spot.storage.store import LocalStore  # noqa: E402
from raytrain_spot.tasks.hf_vlm.presets import PRESETS  # noqa: E402
from raytrain_spot.loop.optim import build_optimizer  # noqa: E402
from raytrain_spot.loop.task import build_task  # noqa: E402

TASK = "raytrain_spot.tasks.hf_vlm.task.HuggingFaceVLMTask"
DEFAULT_PRESET = "smolvlm-256m" if "smolvlm-256m" in PRESETS else "tiny-llava"


def measure(mode: str, args, workdir: str) -> Dict[str, Any]:
    lora_r = args.lora_r if mode == "lora" else 0
    task = build_task({"_target_": TASK, "lora": {"r": lora_r},
                       "model": {"preset": args.preset, "dtype": args.dtype, "cache_dir": f"{workdir}/models"}})
    started = time.perf_counter()
    torch.manual_seed(0)  # what the loop does before build_model
    model = task.build_model()
    build_s = time.perf_counter() - started
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    optimizer = build_optimizer(task.param_groups(model), OptimConfig())
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the moments of every trained parameter
    optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    parts = {"model": ModelWeights(model), "optimizer": optimizer}  # fingerprints the frozen base
    fingerprint_s = time.perf_counter() - started

    run = f"bench-{mode}"
    local = StoreTier("local", LocalStore(os.path.join(workdir, mode, "local")), run, 2)
    durable = StoreTier("durable", LocalStore(os.path.join(workdir, mode, "durable")), run, 2)
    manager = CheckpointManager(run, {}, local, [durable], writes_local=True, events=EventLog(),
                                scratch_root=os.path.join(workdir, mode, "scratch"))
    stalls, commits = [], []
    for step in range(1, args.repeats + 1):
        started = time.perf_counter()
        stalls.append(manager.save(parts, SaveRequest(LoopState(step, step), 1, "periodic"), writer=True))
        manager.wait()
        commits.append(time.perf_counter() - started)
    assert manager.committed_step == args.repeats, f"{mode}: the last save did not commit (see the log above)"
    state_entry = read_manifest(local.store, checkpoint_key(run, args.repeats)).files[STATE_FILE]
    result = {
        "trainable_params": trainable,
        "total_params": total,
        "build_s": round(build_s, 1),
        "snapshot_bytes": manager._snapshot.nbytes,
        "checkpoint_bytes": state_entry.size,
        "first_stall_s": round(stalls[0], 4),
        "stall_s": round(statistics.median(stalls[1:] or stalls), 4),
        "commit_s": round(statistics.median(commits[1:] or commits), 3),
        "first_commit_s": round(commits[0], 3),
        "frozen_fingerprint_s": round(fingerprint_s, 3) if trainable < total else 0.0,
        "peak_rss_gb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }
    del manager, parts, optimizer, model
    gc.collect()
    shutil.rmtree(os.path.join(workdir, mode), ignore_errors=True)  # the full model's copies are GBs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help=f"task.model.preset (default {DEFAULT_PRESET})")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="task.model.dtype")
    parser.add_argument("--lora-r", type=int, default=16, help="task.lora.r of the LoRA mode")
    parser.add_argument("--repeats", type=int, default=3, help="saves per mode (the first allocates the buffers)")
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.lora_r <= 0:
        parser.error("--lora-r must be positive")
    torch.set_num_threads(os.cpu_count() or 1)

    workdir = tempfile.mkdtemp(prefix="bench-lora-checkpoint-")
    dist.init_process_group("gloo", init_method=f"file://{workdir}/pg", rank=0, world_size=1)
    results = {}
    try:
        for mode in args.modes:
            results[mode] = measure(mode, args, workdir)
            print(mode, " ".join(f"{k}={v}" for k, v in results[mode].items()), flush=True)
    finally:
        dist.destroy_process_group()

    print(f"\npreset={args.preset} dtype={args.dtype} lora_r={args.lora_r} (target_modules: the task's default) "
          f"repeats={args.repeats}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; tiers: "
          f"node-local + durable, both on local disk ({workdir})")
    rows = [("trainable parameters", "trainable_params", "{:,}"), ("total parameters", "total_params", "{:,}"),
            ("checkpoint bytes on disk", "checkpoint_bytes", "{:,}"), ("stall, first save (s)", "first_stall_s", "{}"),
            ("stall, later saves (s)", "stall_s", "{}"), ("save to commit, later saves (s)", "commit_s", "{}"),
            ("frozen-base fingerprint (s)", "frozen_fingerprint_s", "{}")]
    modes = list(results)
    print(f"{'':34}" + "".join(f"{m:>16}" for m in modes) + (f"{'full / lora':>14}" if len(modes) == 2 else ""))
    for label, key, fmt in rows:
        line = f"{label:34}" + "".join(f"{fmt.format(results[m][key]):>16}" for m in modes)
        if len(modes) == 2 and results["lora"][key] and results["full"][key]:
            line += f"{results['full'][key] / results['lora'][key]:>14.1f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
