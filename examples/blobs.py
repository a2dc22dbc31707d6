"""A training task of your own, outside the package: a small image classifier.

Each image is noise with one bright blob; its class is the quadrant the blob is in. The task
is the whole of what is specific to this model (docs/extending.md): the framework trains it
with elastic DDP on Spot capacity, checkpoints it on every tier and resumes it after a
preemption at the exact next sample.

    PYTHONPATH=$PWD/examples python -m raytrain_spot.run task=custom task._target_=blobs.BlobClassifierTask
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raytrain_spot import ConfigError, TrainingTask


class BlobImages(torch.utils.data.Dataset):
    """Image ``i`` is a pure function of (seed, i): the same on every node, on every read."""

    def __init__(self, seed: int, num_samples: int, image_size: int, noise: float):
        self.seed, self.num_samples, self.image_size, self.noise = seed, num_samples, image_size, noise

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(4))
        size, half = self.image_size, self.image_size // 2
        cy = rng.uniform(0.2, 0.8) * half + half * (label // 2)
        cx = rng.uniform(0.2, 0.8) * half + half * (label % 2)
        y, x = np.mgrid[0:size, 0:size]
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (size / 10) ** 2))
        image = blob + self.noise * rng.standard_normal((size, size))
        return torch.from_numpy(image.astype(np.float32))[None], label


@dataclass
class BlobClassifierTask(TrainingTask):
    """Which quadrant holds the blob: a two-layer CNN and cross-entropy."""

    image_size: int = 16
    """Side of the square images."""
    num_samples: int = 4096
    """Images in one epoch."""
    noise: float = 0.3
    """Standard deviation of the pixel noise (the blob peaks at 1)."""
    channels: int = 8
    """Channels of each convolution."""

    def __post_init__(self):
        if self.image_size < 8 or self.image_size % 4:
            raise ConfigError(f"task.image_size: {self.image_size} is not a multiple of 4 of at least 8. "
                              "Fix: set task.image_size=16.")

    def build_model(self) -> nn.Module:
        c = self.channels
        return nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c * (self.image_size // 4) ** 2, 4),
        )

    def build_dataset(self, seed: int) -> BlobImages:
        return BlobImages(seed, self.num_samples, self.image_size, self.noise)

    def collate(self, samples: Sequence[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*samples)
        return torch.stack(images), torch.tensor(labels)

    def loss(self, model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels, reduction="none")
