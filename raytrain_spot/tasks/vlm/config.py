"""Settings of the built-in vision-language task (``task.model.*``, ``task.data.*``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from raytrain_spot.config.errors import require, require_non_negative, require_positive


@dataclass
class ModelConfig:
    """Size of the vision-language model: a ViT encoder, a projector and a causal decoder."""

    preset: str = "tiny"
    """Name of the preset this size came from (informational; printed in the summary)."""
    image_size: int = 32
    """Side of the square input image in pixels; must equal task.data.image_size."""
    patch_size: int = 8
    """Side of a ViT patch; image_size must be a multiple of it."""
    vision_dim: int = 64
    """Width of the vision encoder."""
    vision_layers: int = 2
    """Transformer blocks in the vision encoder."""
    text_dim: int = 64
    """Width of the text decoder; the projector maps vision_dim to it."""
    text_layers: int = 2
    """Transformer blocks in the text decoder."""
    num_heads: int = 4
    """Attention heads in every block; must divide vision_dim and text_dim."""
    mlp_ratio: int = 4
    """Hidden width of each block's MLP as a multiple of the block width."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP outputs."""

    def __post_init__(self):
        require_positive("task.model", self, "image_size", "patch_size", "vision_dim", "vision_layers", "text_dim",
                         "text_layers", "num_heads", "mlp_ratio")
        require(self.image_size % self.patch_size == 0, "task.model.patch_size",
                f"{self.patch_size} does not divide task.model.image_size={self.image_size}",
                "choose a patch size that divides the image size, e.g. task.model.patch_size=8")
        for name in ("vision_dim", "text_dim"):
            require(getattr(self, name) % self.num_heads == 0, "task.model.num_heads",
                    f"{self.num_heads} heads do not divide task.model.{name}={getattr(self, name)}",
                    f"pick task.model.num_heads that divides task.model.{name}")
        require(0.0 <= self.dropout < 1.0, "task.model.dropout", f"must be in [0, 1), got {self.dropout}",
                 "set task.model.dropout=0.0 or a small value such as 0.1")


@dataclass
class CaptionDataConfig:
    """The image-caption dataset: Parquet shards of generated coloured shapes."""

    path: Optional[str] = None
    """Directory of Parquet shards. Unset: generate the dataset into task.data.cache_dir on first use."""
    cache_dir: str = "~/.cache/raytrain_spot/data"
    """Where generated datasets are kept (one subdirectory per generator setting)."""
    num_samples: int = 8192
    """Samples in the generated dataset (one epoch)."""
    shard_size: int = 1024
    """Samples per Parquet file."""
    row_group_size: int = 128
    """Samples per Parquet row group, the unit of reading and of the local shuffle."""
    image_size: int = 32
    """Side of the generated images; must equal task.model.image_size."""
    max_shapes: int = 2
    """Each image holds 1..max_shapes shapes, each described in the caption."""
    cached_row_groups: int = 64
    """Decoded row groups a worker keeps in memory."""
    eval_samples: int = 192
    """Generated samples the training set does not hold, evaluated every ``eval.every_steps``; 0: none.
    Your own shards (``path``) get none: their held-out set is yours to choose."""

    def __post_init__(self):
        require_positive("task.data", self, "num_samples", "shard_size", "row_group_size", "image_size", "max_shapes",
                         "cached_row_groups")
        require_non_negative("task.data", self, "eval_samples")
        require(self.shard_size % self.row_group_size == 0, "task.data.row_group_size",
                f"{self.row_group_size} does not divide task.data.shard_size={self.shard_size}",
                "make task.data.shard_size a multiple of task.data.row_group_size")
        require(self.max_shapes <= 3, "task.data.max_shapes", f"at most 3 shapes fit a caption, got {self.max_shapes}",
                "set task.data.max_shapes to 1, 2 or 3")
