"""The built-in task: a small vision-language model captioning generated shapes.

It uses only the public task interface (``raytrain_spot.TrainingTask``, defined in
raytrain_spot/loop/task.py), like a task of your own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence, Tuple

import torch

from raytrain_spot.config.errors import require
from raytrain_spot.tasks.vlm.config import CaptionDataConfig, ModelConfig
from raytrain_spot.tasks.vlm.model import VisionLanguageModel
from raytrain_spot.tasks.vlm.parquet import HeldOutShapes, ImageCaptionDataset, ensure_dataset
from raytrain_spot.tasks.vlm.shapes import PAD, TOKEN_ID, VOCAB, max_caption_tokens
from raytrain_spot.loop.task import TrainingTask


@dataclass
class VisionLanguageTask(TrainingTask):
    """Image captioning: ViT encoder, projector, causal decoder; next-token loss on the caption."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Size of the model (presets: ``task/model=tiny|small|base``)."""
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    """The image-caption Parquet shards (generated unless ``task.data.path`` is set)."""

    resumable_settings: ClassVar[Tuple[str, ...]] = ("data.cache_dir", "data.cached_row_groups", "data.eval_samples")

    def __post_init__(self):
        require(self.model.image_size == self.data.image_size, "task.data.image_size",
                f"{self.data.image_size} differs from task.model.image_size={self.model.image_size}",
                "set both to the same value, e.g. task.data.image_size=${task.model.image_size}")

    def prepare(self, seed: int) -> Optional[str]:
        return ensure_dataset(self.data, seed)

    def build_model(self) -> torch.nn.Module:
        return VisionLanguageModel(self.model, len(VOCAB), max_caption_tokens(self.data.max_shapes), TOKEN_ID[PAD])

    def build_dataset(self, seed: int) -> ImageCaptionDataset:
        return ImageCaptionDataset(ensure_dataset(self.data, seed), self.data.image_size, self.data.max_shapes,
                                   self.data.cached_row_groups)

    def build_eval_dataset(self, seed: int) -> Optional[HeldOutShapes]:
        if self.data.path is not None or not self.data.eval_samples:
            return None
        return HeldOutShapes(self.data, seed, self.data.eval_samples)

    def collate(self, samples: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        images, tokens = zip(*samples)
        return torch.stack(images), torch.stack(tokens)

    def loss(self, model: torch.nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, tokens = batch
        return model(images, tokens)
