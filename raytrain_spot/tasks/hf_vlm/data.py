"""Your image-text data as Parquet shards: one image column, one text column, any names.

Images are encoded bytes (JPEG, PNG, WebP: whatever Pillow opens), raw HxWx3 uint8 bytes of a
known side, or ``{"bytes": ...}`` structs (the Hugging Face ``datasets`` image feature); text is a
caption string. A sample is known by its row over the shards in name order.

The whole dataset is checked once per node before training (every row's image decodes, every
text is non-empty, the columns exist). A bad row stops the run naming the shard, the row and the
column (``task.data.bad_rows=fail``, the default), or is left out of the sample order and counted
(``skip``): never a silent skip. The check's result is cached next to the generated data, keyed
by the shards' names, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq

from raytrain_spot.config.errors import require, require_positive

logger = logging.getLogger(__name__)


class BadRow(ValueError):
    """A row of the data that cannot be trained on; the message names the shard, row and column."""


@dataclass
class ImageTextDataConfig:
    """Where the image-text shards are and how to read them."""

    path: Optional[str] = None
    """Directory of ``*.parquet`` shards. Unset: the generated shapes, written in this same format
    (PNG images, a caption column) into ``task.data.cache_dir`` on first use."""
    image_column: str = "image"
    """Column with the images."""
    text_column: str = "caption"
    """Column with the text the model learns to write."""
    prompt: str = ""
    """Text before the caption in every sample (e.g. ``Describe the image.``); not trained on."""
    bad_rows: str = "fail"
    """A row whose image does not decode or whose text is empty: ``fail`` stops the run naming it,
    ``skip`` leaves it out of the sample order and counts it in the start event."""
    raw_image_size: int = 0
    """Images stored as raw HxWx3 uint8 bytes: their side (0: images are encoded files)."""
    cache_dir: str = "~/.cache/raytrain_spot/hf_data"
    """Where generated data and each dataset's row check are kept."""
    num_samples: int = 4096
    """Samples of the generated data (when ``path`` is unset)."""
    image_size: int = 32
    """Side of the generated images."""

    def __post_init__(self):
        require(self.bad_rows in ("fail", "skip"), "task.data.bad_rows", f"{self.bad_rows!r} is not a policy",
                "use task.data.bad_rows=fail or skip")
        require(bool(self.image_column) and bool(self.text_column), "task.data.image_column",
                "the image and text column names must not be empty", "name the columns of your shards")
        require_positive("task.data", self, "num_samples", "image_size")


def shard_files(path: str) -> List[str]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"task.data.path={path} is not a directory. Fix: point it at a directory of "
                                "*.parquet shards")
    files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"task.data.path={path} holds no *.parquet shards. Fix: point it at your shards, "
                                "or unset it to train on generated data")
    return files


def decode_image(value, raw_image_size: int):
    """A Pillow RGB image from a cell; raises ValueError when it is not an image."""
    from PIL import Image

    if isinstance(value, dict):  # the `datasets` Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise ValueError(f"holds {type(value).__name__}, not image bytes")
    if raw_image_size:
        expected = raw_image_size * raw_image_size * 3
        if len(value) != expected:
            raise ValueError(f"holds {len(value)} bytes, not {raw_image_size}x{raw_image_size}x3 raw pixels")
        return Image.fromarray(np.frombuffer(value, dtype=np.uint8).reshape(raw_image_size, raw_image_size, 3))
    with Image.open(io.BytesIO(value)) as image:
        return image.convert("RGB")


class ImageTextShards:
    """Map-style access to the good rows of the shards: ``dataset[i]`` is (RGB image, text)."""

    def __init__(self, cfg: ImageTextDataConfig, path: str):
        self.cfg = cfg
        self.files = shard_files(path)
        self.rows = checked_rows(cfg, path, self.files)
        self._offsets = np.cumsum([0] + [pq.ParquetFile(f).metadata.num_rows for f in self.files])
        self._open: Tuple[int, Optional[object]] = (-1, None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        shard = int(np.searchsorted(self._offsets, row, side="right")) - 1
        if self._open[0] != shard:  # rows come in a shuffle within spans: keep the last shard's table
            self._open = (shard, pq.read_table(self.files[shard], columns=[self.cfg.image_column,
                                                                           self.cfg.text_column]))
        table = self._open[1]
        local = row - int(self._offsets[shard])
        image = decode_image(table.column(self.cfg.image_column)[local].as_py(), self.cfg.raw_image_size)
        return image, str(table.column(self.cfg.text_column)[local].as_py())

    def row_group_spans(self) -> List[Tuple[int, int]]:
        """One span per shard, so a step's reads stay within few shards."""
        spans, start = [], 0
        for shard in range(len(self.files)):
            stop = int(np.searchsorted(self.rows, self._offsets[shard + 1], side="left"))
            if stop > start:
                spans.append((start, stop))
            start = stop
        return spans


def checked_rows(cfg: ImageTextDataConfig, path: str, files: List[str]) -> np.ndarray:
    """Indices of the rows that can be trained on (all of them, or the run stops, under ``fail``)."""
    fingerprint = hashlib.sha256(json.dumps(
        [cfg.image_column, cfg.text_column, cfg.raw_image_size, cfg.bad_rows,
         [(os.path.basename(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]]).encode()).hexdigest()[:16]
    cache = os.path.join(os.path.expanduser(cfg.cache_dir), "checked", f"{fingerprint}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return np.array(json.load(f)["good_rows"], dtype=np.int64)
    good, bad, row = [], [], 0
    for file in files:
        names = pq.ParquetFile(file).schema_arrow.names
        for column in (cfg.image_column, cfg.text_column):
            if column not in names:
                raise BadRow(f"{file}: no column {column!r} (it has {', '.join(names)}). Fix: set "
                             f"task.data.{'image' if column == cfg.image_column else 'text'}_column to one of them")
        table = pq.read_table(file, columns=[cfg.image_column, cfg.text_column])
        for local, (image, text) in enumerate(zip(table.column(cfg.image_column).to_pylist(),
                                                  table.column(cfg.text_column).to_pylist())):
            problem = None
            try:
                decode_image(image, cfg.raw_image_size)
            except Exception as error:  # noqa: BLE001 - Pillow raises many types for a bad file
                problem = f"column {cfg.image_column!r} {error}"
            if problem is None and not (isinstance(text, str) and text.strip()):
                problem = f"column {cfg.text_column!r} is empty"
            if problem is None:
                good.append(row)
            elif cfg.bad_rows == "fail":
                raise BadRow(f"{file}: row {local}: {problem}. Fix: repair or drop the row, or set "
                             "task.data.bad_rows=skip to leave such rows out (they are counted)")
            else:
                bad.append(f"{os.path.basename(file)}:{local}")
            row += 1
    if bad:
        logger.warning("Leaving out %d bad rows of %s (task.data.bad_rows=skip): %s%s", len(bad), path,
                       ", ".join(bad[:5]), " ..." if len(bad) > 5 else "")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(cache), delete=False) as f:
        json.dump({"good_rows": good, "bad_rows": bad}, f)
    os.replace(f.name, cache)
    return np.array(good, dtype=np.int64)


def skipped_rows(cfg: ImageTextDataConfig, path: str) -> int:
    """How many rows the check left out (after ``checked_rows`` ran on this node)."""
    files = shard_files(path)
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files) - len(checked_rows(cfg, path, files))


def generated_data_dir(cfg: ImageTextDataConfig, seed: int) -> str:
    """The generated shapes as image-text shards (PNG bytes, captions), written on first use."""
    from PIL import Image

    from raytrain_spot.tasks.vlm.shapes import generate_sample

    digest = hashlib.sha256(json.dumps([seed, cfg.num_samples, cfg.image_size]).encode()).hexdigest()[:12]
    path = os.path.join(os.path.expanduser(cfg.cache_dir), f"shapes-png-{digest}")
    if os.path.isdir(path):
        return path
    import pyarrow as pa

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".generating-", dir=parent)
    per_shard = 1024
    for shard, start in enumerate(range(0, cfg.num_samples, per_shard)):
        images, captions = [], []
        for i in range(start, min(start + per_shard, cfg.num_samples)):
            sample = generate_sample(seed, i, cfg.image_size, max_shapes=2)
            encoded = io.BytesIO()
            Image.fromarray(sample.image).save(encoded, format="PNG")
            images.append(encoded.getvalue())
            captions.append(sample.caption)
        pq.write_table(pa.table({cfg.image_column: pa.array(images, pa.binary()),
                                 cfg.text_column: pa.array(captions, pa.string())}),
                       os.path.join(staging, f"shard-{shard:05d}.parquet"))
    try:
        os.rename(staging, path)
    except OSError:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)  # another process generated it first
    return path
