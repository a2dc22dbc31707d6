"""The default optimizer and learning-rate schedule a task trains with unless it brings its own
(``TrainingTask.build_optimizer`` and ``learning_rate``): AdamW, and a schedule by samples seen,
so a resize never shifts it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List

import torch

if TYPE_CHECKING:
    from raytrain_spot.config.schema import OptimConfig  # schema.py imports the task interface, which imports this


def learning_rate(samples_seen: int, total_samples: int, cfg: OptimConfig) -> float:
    """The default schedule (``TrainingTask.learning_rate``): linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``total_samples``."""
    if samples_seen < cfg.warmup_samples:
        return cfg.lr * (samples_seen + 1) / cfg.warmup_samples
    decay_span = max(total_samples - cfg.warmup_samples, 1)
    progress = min((samples_seen - cfg.warmup_samples) / decay_span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(param_groups: List[Dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The default optimizer (``TrainingTask.build_optimizer``): AdamW over the task's parameter
    groups; a group without its own weight decay gets optim.weight_decay."""
    groups = [group for group in param_groups if group["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
