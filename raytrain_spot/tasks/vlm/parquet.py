"""Image-caption datasets as Parquet shards: writing the generated set, reading rows by index.

A dataset directory holds ``shard-NNNNN.parquet`` files with columns ``image`` (raw uint8
HxWx3 bytes) and ``caption`` (string); the generator also writes ``sample_id`` (int64, equal
to the row). A sample is known by its row over the sorted files, which is what the exactly-once
audit logs. ``dataset.json`` is written last, so a directory without it is an interrupted
generation and is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raytrain_spot.tasks.vlm.config import CaptionDataConfig
from raytrain_spot.tasks.vlm.shapes import generate_sample, max_caption_tokens, tokenize

logger = logging.getLogger(__name__)

DATASET_MANIFEST = "dataset.json"
GENERATOR_VERSION = 1


def generated_dataset_dir(cfg: CaptionDataConfig, seed: int) -> str:
    settings = dict(version=GENERATOR_VERSION, seed=seed, num_samples=cfg.num_samples, image_size=cfg.image_size,
                    max_shapes=cfg.max_shapes, shard_size=cfg.shard_size, row_group_size=cfg.row_group_size)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(cfg.cache_dir), f"shapes-{digest}")


def ensure_dataset(cfg: CaptionDataConfig, seed: int) -> str:
    """Path of the dataset to train on, generating it first if it is not there yet."""
    if cfg.path is not None:
        if not os.path.exists(os.path.join(cfg.path, DATASET_MANIFEST)) and not _parquet_files(cfg.path):
            raise FileNotFoundError(
                f"task.data.path={cfg.path} holds no Parquet shards. Fix: point task.data.path at a directory of "
                "shard-*.parquet files, or unset it to generate the shapes dataset."
            )
        return cfg.path
    path = generated_dataset_dir(cfg, seed)
    if not os.path.exists(os.path.join(path, DATASET_MANIFEST)):
        write_generated_dataset(path, cfg, seed)
    return path


def write_generated_dataset(path: str, cfg: CaptionDataConfig, seed: int) -> None:
    """Generate into a temporary sibling directory, then rename it into place (atomic)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".generating-", dir=parent)
    try:
        for shard, start in enumerate(range(0, cfg.num_samples, cfg.shard_size)):
            ids = range(start, min(start + cfg.shard_size, cfg.num_samples))
            samples = [generate_sample(seed, i, cfg.image_size, cfg.max_shapes) for i in ids]
            table = pa.table({
                "sample_id": pa.array([s.sample_id for s in samples], pa.int64()),
                "image": pa.array([s.image.tobytes() for s in samples], pa.binary()),
                "caption": pa.array([s.caption for s in samples], pa.string()),
            })
            pq.write_table(table, os.path.join(staging, f"shard-{shard:05d}.parquet"),
                           row_group_size=cfg.row_group_size)
        with open(os.path.join(staging, DATASET_MANIFEST), "w") as f:
            json.dump({"generator": "shapes", "version": GENERATOR_VERSION, "seed": seed,
                       "num_samples": cfg.num_samples, "image_size": cfg.image_size,
                       "max_shapes": cfg.max_shapes}, f)
        try:
            os.rename(staging, path)
            logger.info("Generated %d samples into %s", cfg.num_samples, path)
        except OSError:
            pass  # another process finished the same dataset first; its copy is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _parquet_files(path: str) -> List[str]:
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".parquet"))


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int
    start: int  # global index of its first row
    num_rows: int


def as_pixels(image: np.ndarray) -> torch.Tensor:
    """An HxWx3 uint8 image as the model reads it: float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class HeldOutShapes:
    """Generated samples the training set does not hold (sample ids after its last), for evaluation:
    the same generator and seed, so they are the same on every rank and in every run."""

    def __init__(self, cfg: CaptionDataConfig, seed: int, size: int):
        self._cfg, self._seed, self._size = cfg, seed, size
        self._caption_tokens = max_caption_tokens(cfg.max_shapes)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self._size:
            raise IndexError(f"sample {index} is outside the evaluation set's {self._size}")
        sample = generate_sample(self._seed, self._cfg.num_samples + index, self._cfg.image_size, self._cfg.max_shapes)
        return as_pixels(sample.image), torch.from_numpy(tokenize(sample.caption, self._caption_tokens))


class ImageCaptionDataset:
    """Random access to rows by global index, decoding whole row groups into a bounded cache."""

    def __init__(self, path: str, image_size: int, max_shapes: int, cached_row_groups: int = 64):
        self.image_size = image_size
        self.caption_tokens = max_caption_tokens(max_shapes)
        self.row_groups: List[RowGroup] = []
        start = 0
        for file in _parquet_files(path):
            metadata = pq.ParquetFile(file).metadata
            for index in range(metadata.num_row_groups):
                rows = metadata.row_group(index).num_rows
                self.row_groups.append(RowGroup(file, index, start, rows))
                start += rows
        if not self.row_groups:
            raise FileNotFoundError(f"no Parquet rows under {path}")
        self._starts = np.array([g.start for g in self.row_groups])
        self._cache: "OrderedDict[int, Tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        self._cache_size = cached_row_groups

    def __len__(self) -> int:
        last = self.row_groups[-1]
        return last.start + last.num_rows

    def row_group_spans(self) -> List[Tuple[int, int]]:
        return [(g.start, g.start + g.num_rows) for g in self.row_groups]

    def _row_group(self, group: int) -> Tuple[np.ndarray, np.ndarray]:
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        meta = self.row_groups[group]
        table = pq.ParquetFile(meta.file).read_row_group(meta.index, columns=["image", "caption"])
        size = self.image_size
        images = np.stack([np.frombuffer(b, dtype=np.uint8).reshape(size, size, 3)
                           for b in table.column("image").to_pylist()])
        tokens = np.stack([tokenize(c, self.caption_tokens) for c in table.column("caption").to_pylist()])
        self._cache[group] = (images, tokens)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return self._cache[group]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The image as float [3, H, W] in [-1, 1] and the caption's token ids [T]."""
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        if index < 0 or group < 0 or index >= len(self):
            raise IndexError(f"sample {index} is outside the dataset's {len(self)} rows")
        images, tokens = self._row_group(group)
        row = index - self.row_groups[group].start
        return as_pixels(images[row]), torch.from_numpy(tokens[row])
