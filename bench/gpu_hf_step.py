"""The train step of a Hugging Face VLM preset on one GPU, without Ray: its median time, samples
per second and peak CUDA memory, for the real-size SmolVLM configurations (random init).

What a rank runs per step, in one process: the preset's model as the task builds it
(``task.model.dtype``, gradient checkpointing, a frozen vision tower), a batch the preset's own
processor makes from 512x512 images (so the image tiles and tokens per sample are the real
model's), the task's caption-only loss, and the loop's ``train_step`` (bf16 autocast on CUDA,
AdamW, gradient clipping). Warm-up steps first, then the timed ones.

    python bench/gpu_hf_step.py                                      # smolvlm-256m, bf16 on CUDA
    python bench/gpu_hf_step.py --preset smolvlm-500m --batch 16 --gradient-checkpointing
    python bench/gpu_hf_step.py --preset smolvlm-256m --no-image-splitting --freeze-vision
    python bench/gpu_hf_step.py --preset tiny-idefics3 --device cpu --steps 2 --warmup 1   # no GPU

Prints one line per measurement and a JSON line with every figure last; exits non-zero if a
step's loss is not finite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raytrain_spot.config.schema import OptimConfig  # noqa: E402
from raytrain_spot.tasks.hf_vlm.data import ImageTextDataConfig, sample_of  # noqa: E402
from raytrain_spot.tasks.hf_vlm.presets import PRESETS  # noqa: E402
from raytrain_spot.tasks.hf_vlm.task import HfModelConfig, HuggingFaceVLMTask  # noqa: E402
from raytrain_spot.tasks.vlm.shapes import generate_sample  # noqa: E402
from raytrain_spot.loop.optim import build_optimizer  # noqa: E402
from raytrain_spot.loop.step import split, train_step  # noqa: E402
from raytrain_spot.loop.task import move_to  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import timed  # noqa: E402  (bench/gpu_check.py: the same timing on CUDA or the CPU)

LEARNING_RATE = 1e-4
"""A fine-tuning rate: the default optim.lr (3e-3, for the small built-in VLM) can diverge a 256M model."""


def shapes_samples(size: int, image_size: int):
    """Samples as the dataset yields them: generated shapes, drawn small and scaled up to
    ``image_size`` (drawing at 512 px is slow and shows the same shapes)."""
    samples = [generate_sample(0, i, 64, max_shapes=3) for i in range(size)]
    return [sample_of([Image.fromarray(s.image).resize((image_size, image_size))], s.caption) for s in samples]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_hf_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--preset", default="smolvlm-256m", choices=sorted(PRESETS), help="default %(default)s")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                        help="weights (task.model.dtype; default bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--batch", type=int, default=8, help="samples per step (default %(default)s)")
    parser.add_argument("--micro-batch", type=int, default=8, help="micro-batch size (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=512, help="side of the input images (default %(default)s)")
    parser.add_argument("--no-image-splitting", action="store_true",
                        help="one encoder tile per image instead of the processor's split into tiles plus the whole")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--freeze-vision", action="store_true")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default %(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")

    with tempfile.TemporaryDirectory() as scratch:
        task = HuggingFaceVLMTask(model=HfModelConfig(preset=args.preset, cache_dir=scratch, dtype=dtype,
                                                      gradient_checkpointing=args.gradient_checkpointing,
                                                      freeze_vision=args.freeze_vision),
                                  data=ImageTextDataConfig(cache_dir=scratch))
        if args.no_image_splitting:
            task.processor().image_processor.do_image_splitting = False
        torch.manual_seed(0)
        model = task.build_model().to(device)
        model.train()
        micro_batches = [(move_to(task.collate(chunk), device), len(chunk))
                         for chunk in split(shapes_samples(args.batch, args.image_size), args.micro_batch)]
    optim = OptimConfig(lr=LEARNING_RATE)
    optimizer = build_optimizer(task.param_groups(model), optim)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    first = micro_batches[0][0]
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "preset": args.preset, "dtype": dtype, "torch": torch.__version__, "batch": args.batch,
               "micro_batch": args.micro_batch, "gradient_checkpointing": args.gradient_checkpointing,
               "freeze_vision": args.freeze_vision, "image_size": args.image_size,
               "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               "trainable_m": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2),
               "tiles_per_sample": int(first["pixel_values"].shape[1]) if first["pixel_values"].dim() == 5 else 1,
               "tokens_per_sample": int(first["input_ids"].shape[1])}
    print(f"{args.preset}: {figures['parameters_m']}M parameters ({figures['trainable_m']}M trained), {dtype}, "
          f"{figures['tiles_per_sample']} image tiles and {figures['tokens_per_sample']} tokens per sample")

    step_s, losses = [], []
    for step in range(args.warmup + args.steps):
        loss_sum, seconds = timed(lambda: train_step(model, optimizer, micro_batches, task.loss, 1 / args.batch,
                                                     optim.grad_clip, autocast_dtype), device)
        losses.append(loss_sum / args.batch)
        if step >= args.warmup:
            step_s.append(seconds)
    if not all(math.isfinite(loss) for loss in losses):
        print(f"FAIL: non-finite loss {losses}", file=sys.stderr)
        return 1
    median = statistics.median(step_s)
    figures.update(step_s_median=median, samples_per_s=args.batch / median, loss_first=losses[0],
                   loss_last=losses[-1])
    if device.type == "cuda":
        figures["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    print(f"train step: {median * 1e3:.1f} ms median over {args.steps} steps ({figures['samples_per_s']:.1f} "
          f"samples/s), loss {losses[0]:.3f} -> {losses[-1]:.3f}"
          + (f", peak memory {figures['peak_memory_gb']:.2f} GB" if device.type == "cuda" else ""))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
