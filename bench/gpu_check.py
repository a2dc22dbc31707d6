"""The torch side of a GPU run, without Ray: the real train step, the per-step agreement and the
checkpoint snapshot on CUDA with NCCL, then the snapshot's stall against a synchronous save.

Ray's wheel cannot travel to the GPU machine, so this runs what the training loop runs on each
rank, in one process: a world-size-1 process group (NCCL on CUDA, gloo on the CPU), the
built-in VLM wrapped in DDP, ``train_step`` with bf16 autocast, ``agree`` (the loop's one
all-reduce per step, on the training device), ``RankGroup`` object collectives (gloo), and
``HostSnapshot`` (the async checkpoint's only stall) against ``torch.save`` of the same state.

    python bench/gpu_check.py                         # CUDA when present, else the CPU
    python bench/gpu_check.py --model small --steps 30 --state-gb 4
    python bench/gpu_check.py --device cpu --steps 3 --state-gb 0.01   # what the tests run

Prints one line per measurement and a JSON line with every figure last; exits non-zero if a
step's loss is not finite or the ranks' agreement decodes wrongly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raytrain_spot.loop.agreement import Proposal, RankView, agree  # noqa: E402
from raytrain_spot.checkpoint.state import LoopState, ModelWeights, training_state  # noqa: E402
from raytrain_spot.checkpoint.snapshot import HostSnapshot, tensors_in  # noqa: E402
from raytrain_spot.distributed.collectives import RankGroup  # noqa: E402
from raytrain_spot.config.schema import OptimConfig  # noqa: E402
from raytrain_spot.tasks.vlm.config import CaptionDataConfig, ModelConfig  # noqa: E402
from raytrain_spot.tasks.vlm.shapes import generate_sample, max_caption_tokens, tokenize  # noqa: E402
from raytrain_spot.tasks.vlm.task import VisionLanguageTask  # noqa: E402
from raytrain_spot.loop.optim import build_optimizer  # noqa: E402
from raytrain_spot.loop.step import split, train_step  # noqa: E402
from raytrain_spot.loop.task import move_to  # noqa: E402

MAX_SHAPES = 3


def model_preset(name: str) -> ModelConfig:
    with open(os.path.join(ROOT, "conf", "task", "model", f"{name}.yaml")) as f:
        return ModelConfig(**yaml.safe_load(f))


def shapes_samples(size: int, image_size: int, seed: int = 0):
    """Samples of the generated shapes data, as the dataset yields them."""
    samples = [generate_sample(seed, i, image_size, MAX_SHAPES) for i in range(size)]
    return [(torch.from_numpy(s.image).permute(2, 0, 1).float().div_(127.5).sub_(1.0),
             torch.from_numpy(tokenize(s.caption, max_caption_tokens(MAX_SHAPES)))) for s in samples]


def init_one_rank_group(device: torch.device) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--model", default="small", help="model preset from conf/task/model/ (default %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="samples per step (default %(default)s)")
    parser.add_argument("--micro-batch", type=int, default=32, help="micro-batch size (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps after 3 warm-up steps")
    parser.add_argument("--state-gb", type=float, default=1.0,
                        help="extra state on the device for the checkpoint-stall comparison (default %(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    init_one_rank_group(device)
    group = RankGroup.for_training(device)
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "backend": dist.get_backend(), "model": args.model, "torch": torch.__version__}

    cfg = model_preset(args.model)
    task = VisionLanguageTask(model=cfg, data=CaptionDataConfig(image_size=cfg.image_size, max_shapes=MAX_SHAPES))
    torch.manual_seed(0)
    model = task.build_model().to(device)
    optimizer = build_optimizer(task.param_groups(model), OptimConfig())
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    samples = shapes_samples(args.batch, cfg.image_size)
    micro_batches = [(move_to(task.collate(chunk), device), len(chunk)) for chunk in split(samples, args.micro_batch)]
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    figures["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)

    step_s, agree_s, losses = [], [], []
    for step in range(3 + args.steps):
        loss_sum, seconds = timed(lambda: train_step(ddp, optimizer, micro_batches, task.loss, 1 / args.batch, 1.0,
                                                     autocast_dtype), device)
        agreed, agreement_seconds = timed(lambda: agree(RankView(loss_sum, [0], Proposal(grow_to=2), save_due=True,
                                                                 committed_step=step), group), device)
        if (agreed.leaving_ranks, agreed.grow_to, agreed.save_due, agreed.committed_step) != ([0], 2, True, step):
            print(f"FAIL: the agreement decoded to {agreed}", file=sys.stderr)
            return 1
        losses.append(agreed.loss_sum / args.batch)
        if step >= 3:
            step_s.append(seconds)
            agree_s.append(agreement_seconds)
    if not all(math.isfinite(loss) for loss in losses):
        print(f"FAIL: non-finite loss {losses}", file=sys.stderr)
        return 1
    figures.update(step_s_median=statistics.median(step_s), agreement_s_median=statistics.median(agree_s),
                   samples_per_s=args.batch / statistics.median(step_s), loss_first=losses[0], loss_last=losses[-1])
    if device.type == "cuda":
        figures["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    print(f"train step: {figures['step_s_median'] * 1e3:.1f} ms median over {args.steps} steps "
          f"({figures['samples_per_s']:.0f} samples/s), agreement {figures['agreement_s_median'] * 1e3:.2f} ms, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert group.all_gather_object(("node", 1)) == [("node", 1)]

    state = training_state({"model": ModelWeights(model), "optimizer": optimizer}, LoopState(step=3 + args.steps))
    extra_elements = int(args.state_gb * 1e9 / 4)
    if extra_elements:
        state["extra"] = torch.randn(extra_elements, device=device)
    state_bytes = sum(t.numel() * t.element_size() for t in tensors_in(state))
    snapshot = HostSnapshot()
    snapshot.take(state)  # allocates the (pinned) host buffers, once per run as in training
    _, snapshot_s = snapshot.take(state)
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "state.pt")

        def save_synchronously():
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        _, save_s = timed(save_synchronously, device)
    figures.update(state_gb=state_bytes / 1e9, snapshot_stall_s=snapshot_s, torch_save_s=save_s,
                   stall_ratio=snapshot_s / save_s)
    print(f"checkpoint of {state_bytes / 1e9:.2f} GB: snapshot stall {snapshot_s:.3f} s "
          f"({state_bytes / 1e9 / snapshot_s:.1f} GB/s) vs synchronous torch.save {save_s:.3f} s "
          f"(ratio {snapshot_s / save_s:.3f})")
    dist.destroy_process_group()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
