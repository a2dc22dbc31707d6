"""A chaos test's task: the built-in VLM, slowed while the group is short-handed.

A scenario that regrows must still be training when the replacement nodes have joined; on a
loaded 2-core machine they take longer to start than a short run's shrunk group takes to finish.
The arithmetic is the built-in task's, so the run still matches an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from raytrain_spot.tasks.vlm.task import VisionLanguageTask


@dataclass
class ShortHandedVLMTask(VisionLanguageTask):
    full_world_size: int = 3
    """A group smaller than this is short-handed."""
    short_handed_step_s: float = 0.1
    """Seconds each micro-batch waits while short-handed."""

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if world_size < self.full_world_size:
            time.sleep(self.short_handed_step_s)
        return super().loss(model, batch)
