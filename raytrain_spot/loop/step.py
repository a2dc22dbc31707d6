"""The pieces of an optimizer step that must not depend on the world size.

* the learning rate is a function of samples seen, not of steps or workers (the task's
  ``learning_rate``; loop/optim.py has the default), and the optimizer is the task's
  (loop/optim.py's AdamW by default), checked before it trains;
* each rank sums the task's per-sample losses scaled by world_size / global_batch_size, so DDP's
  gradient average over ranks equals the mean over the whole global batch, however the
  batch is split across ranks and micro-batches;
* randomness is reseeded every step from (seed, step, rank), so a resumed run replays the
  random stream of the run it continues.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, List, Sequence, Tuple

import torch
import torch.nn as nn

from raytrain_spot.config.errors import TaskContractError
from raytrain_spot.loop.task import per_sample_loss


def checked_optimizer(optimizer: Any, task_name: str) -> torch.optim.Optimizer:
    """``optimizer`` if the loop can set its learning rate and the checkpoint can hold its state;
    else the contract error."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TaskContractError(
            f"{task_name}.build_optimizer returned a {type(optimizer).__name__}, not a torch.optim.Optimizer, so "
            "the framework can neither set its learning rate nor checkpoint its state. Fix: return a "
            "torch.optim.Optimizer (wrap a scheduler's logic in learning_rate instead)")
    return optimizer


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: Any, task_name: str) -> float:
    """Set ``lr``, the task's learning rate for this step, on every parameter group; return it as a float."""
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise TaskContractError(
            f"{task_name}.learning_rate returned {lr!r}; it must return a finite number >= 0. Fix: compute it "
            "from samples_seen, total_samples and the optim settings alone")
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
    return float(lr)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63)


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a step draws from: the CPU's and, on a GPU, its device's.
    (``torch.manual_seed`` seeds every device type torch knows, work a step need not pay for.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def split(indices: Sequence[int], size: int) -> List[Sequence[int]]:
    """``indices`` in micro-batches of at most ``size``."""
    return [indices[start:start + size] for start in range(0, len(indices), size)]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Tuple[Any, int]],
    loss: Callable[[nn.Module, Any], torch.Tensor],
    loss_scale: float,
    grad_clip: float,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One optimizer step over this rank's share of the global batch: ``accumulate``, then
    ``update``. Returns the sum of per-sample losses."""
    loss_sum = accumulate(model, micro_batches, loss, loss_scale, autocast_dtype)
    update(model, optimizer, grad_clip)
    return loss_sum


def accumulate(
    model: nn.Module,
    micro_batches: Sequence[Tuple[Any, int]],
    loss: Callable[[nn.Module, Any], torch.Tensor],
    loss_scale: float,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """The gradients of this rank's share of the global batch. Returns the sum of per-sample losses.

    ``micro_batches`` are (batch, number of samples) pairs; ``loss(model, batch)`` returns one
    loss per sample. ``model`` may be DDP-wrapped: gradients are synchronised once, on the last
    micro-batch. ``loss_scale`` is world_size / global_batch_size.

    The step trains the model in train mode whatever mode it was left in: ``from_pretrained``
    returns eval mode, where dropout is off and checkpointed layers keep their activations.
    """
    model.train()
    device_type = next(model.parameters()).device.type
    loss_sum = 0.0
    for i, (batch, size) in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if is_last or not hasattr(model, "no_sync") else model.no_sync()
        autocast = (torch.autocast(device_type=device_type, dtype=autocast_dtype)
                    if autocast_dtype is not None else contextlib.nullcontext())
        with sync:
            with autocast:
                per_sample = per_sample_loss(loss(model, batch), size)
            (per_sample.sum() * loss_scale).backward()
        loss_sum += per_sample.detach().sum().item()
    return loss_sum


def update(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip the synchronised gradients to ``grad_clip`` (0: no clipping), step, clear them.
    Returns the gradient norm before clipping (the same on every rank)."""
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)
