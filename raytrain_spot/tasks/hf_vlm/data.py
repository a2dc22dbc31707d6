"""Your image-text data: an image column and a text column, any names, in files of record batches:
Parquet shards, or a Hugging Face ``datasets`` directory as ``Dataset.save_to_disk`` writes it
(Arrow IPC stream files, read memory-mapped with pyarrow alone: ``datasets`` is not needed to train).

An image cell is one image or a list of them (TRL's ``images`` column); an image is encoded bytes
(JPEG, PNG, WebP: whatever Pillow opens), raw HxWx3 uint8 bytes of a known side, a ``{"bytes": ...}``
struct (the ``datasets`` Image feature), or an HxWx3 array of 0..255 integers (nested lists, or the
``datasets`` Array3D feature). A text cell is a caption string, or chat turns
(``[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]``, TRL's ``messages``
column): the last assistant turn is the caption, the turns before it the sample's prompt, their
``{"type": "image"}`` parts where the images go (one per image, in order; turns without them get
the images at the start of the first user turn). ``dataset[i]`` is a ``Sample``: the RGB images,
the caption, and the prompt turns in the Hugging Face chat format. A sample is
known by its row over the files: Parquet shards in name order, a ``datasets`` directory's files in
the order its ``state.json`` lists them (the dataset's own row order).

The whole dataset is checked once per node before training (every row's image decodes, every
text is non-empty, the columns exist). A bad row stops the run naming the file, the row and the
column (``task.data.bad_rows=fail``, the default), or is left out of the sample order and counted
(``skip``): never a silent skip. The check's result is cached next to the generated data, keyed
by the files' names, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytrain_spot.config.errors import require, require_non_negative, require_positive
from raytrain_spot.observe.progress import WorkProgress

logger = logging.getLogger(__name__)


CHECK_VERSION = 2
"""Part of a row check's cache key: raised when the rules of what a good row is change."""


class BadRow(ValueError):
    """A row of the data that cannot be trained on; the message names the file, row and column."""


@dataclass
class ImageTextDataConfig:
    """Where the image-text shards are and how to read them."""

    path: Optional[str] = None
    """Directory of ``*.parquet`` shards or a ``datasets`` ``save_to_disk`` directory (one split): a
    local path, or ``gs://bucket/prefix``, which each node copies once into ``cache_dir`` (verified;
    fetched anew when the objects change). Unset: the generated shapes, written as Parquet shards
    (PNG images, a caption column) into ``task.data.cache_dir`` on first use."""
    image_column: str = "image"
    """Column with the images: one per row, or a list of them (TRL's format: ``images``)."""
    text_column: str = "caption"
    """Column with the text the model learns to write: captions, or chat turns (TRL's format: ``messages``)."""
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
    eval_path: Optional[str] = None
    """Shards to evaluate on (``eval.every_steps``), in the form ``path`` has, local or ``gs://``.
    Unset: with generated data, ``eval_samples`` generated samples the training set does not hold;
    with your own, no evaluation."""
    eval_samples: int = 32
    """Generated samples to evaluate on (when ``path`` and ``eval_path`` are unset); 0: none."""
    eval_examples: int = 3
    """Evaluation samples whose generated captions are logged beside the evaluation loss; 0: none."""

    def __post_init__(self):
        require(self.bad_rows in ("fail", "skip"), "task.data.bad_rows", f"{self.bad_rows!r} is not a policy",
                "use task.data.bad_rows=fail or skip")
        require(bool(self.image_column) and bool(self.text_column), "task.data.image_column",
                "the image and text column names must not be empty", "name the columns of your shards")
        require_positive("task.data", self, "num_samples", "image_size")
        require_non_negative("task.data", self, "eval_samples", "eval_examples")


def shard_files(path: str) -> List[str]:
    """The files of record batches under ``path``, in row order."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"task.data.path={path} is not a directory. Fix: point it at a directory of "
                                "*.parquet shards or at a datasets save_to_disk directory")
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise FileNotFoundError(f"task.data.path={path} is a datasets DatasetDict (splits {', '.join(splits)}). "
                                f"Fix: point it at one split's directory, e.g. {os.path.join(path, *splits[:1])}")
    if any(os.path.exists(os.path.join(path, name)) for name in ("state.json", "dataset_info.json")):
        return saved_dataset_files(path)
    files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"task.data.path={path} holds no *.parquet shards and no datasets save_to_disk "
                                "files. Fix: point it at your data, or unset it to train on generated data")
    return files


def saved_dataset_files(path: str) -> List[str]:
    """A ``save_to_disk`` directory's Arrow files in the order ``state.json`` lists them: the dataset's row order."""
    state = os.path.join(path, "state.json")
    if not os.path.exists(state):
        raise FileNotFoundError(f"task.data.path={path} has a dataset_info.json but no state.json. Fix: write the "
                                "dataset again with Dataset.save_to_disk")
    with open(state) as f:
        files = [os.path.join(path, entry["filename"]) for entry in json.load(f)["_data_files"]]
    missing = [os.path.basename(file) for file in files if not os.path.exists(file)]
    if missing or not files:
        raise FileNotFoundError(f"task.data.path={path}: state.json lists {', '.join(missing) or 'no files'}, not "
                                "in the directory. Fix: copy the whole directory, or write it again")
    return files


def file_rows(file: str) -> int:
    """Rows in a Parquet shard (from its footer) or an Arrow IPC stream file (from its batches' headers)."""
    if file.endswith(".parquet"):
        return pq.ParquetFile(file).metadata.num_rows
    with pa.ipc.open_stream(pa.memory_map(file)) as reader:
        return sum(batch.num_rows for batch in reader)


class FileRows:
    """One file's image and text cells by row: a Parquet shard read, or an Arrow IPC stream file
    memory-mapped (the page cache holds it, nothing is copied). A missing column is a BadRow."""

    def __init__(self, cfg: ImageTextDataConfig, file: str):
        if file.endswith(".parquet"):
            parquet = pq.ParquetFile(file)
            names, read = parquet.schema_arrow.names, lambda columns: parquet.read(columns=columns)
        else:
            stream = pa.ipc.open_stream(pa.memory_map(file))
            names, read = stream.schema.names, lambda columns: stream.read_all().select(columns)
        for column, kind in ((cfg.image_column, "image"), (cfg.text_column, "text")):
            if column not in names:
                trl = " (TRL's format: task.data.image_column=images task.data.text_column=messages)" if {
                    "images", "messages"} <= set(names) else ""
                raise BadRow(f"{file}: no column {column!r} (it has {', '.join(names)}). Fix: set "
                             f"task.data.{kind}_column to one of them{trl}")
        self.batches = read([cfg.image_column, cfg.text_column]).to_batches()
        self.starts = np.cumsum([0] + [batch.num_rows for batch in self.batches])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, row: int) -> Tuple[Any, Any]:
        """(image cell, text cell); the batch found by bisection, not by a walk over the batches."""
        index = int(np.searchsorted(self.starts, row, side="right")) - 1
        batch, local = self.batches[index], row - int(self.starts[index])
        return image_cell(batch.column(0)[local]), batch.column(1)[local].as_py()


def image_cell(scalar: pa.Scalar) -> Any:
    """An image cell as Python, but nested lists (raw pixel arrays) as a NumPy array, without a
    Python int per pixel; a list of images (TRL's ``images`` column) as a Python list of them."""
    if isinstance(scalar, pa.ExtensionScalar):  # datasets' Array3D, where `datasets` is imported
        scalar = scalar.value
    if scalar is None or not scalar.is_valid or not is_list(scalar.type):
        return None if scalar is None else scalar.as_py()
    if holds_images(scalar.type):
        return [image_cell(image) for image in scalar.values]
    level, shape = scalar.values, [len(scalar.values)]
    while is_list(level.type):
        lengths = pc.list_value_length(level).to_numpy(zero_copy_only=False)
        if len(lengths) == 0 or (lengths != lengths[0]).any():
            raise ValueError("holds ragged or empty lists, not an HxWx3 pixel array")
        shape.append(int(lengths[0]))
        level = level.flatten()
    return level.to_numpy(zero_copy_only=False).reshape(shape)


def holds_images(list_type: pa.DataType) -> bool:
    """Whether a list type is a list of images (encoded bytes, ``{"bytes": ...}`` structs, or HxWx3
    arrays), not one image's pixels."""
    item, depth = list_type.value_type, 1
    while is_list(storage(item)):
        item, depth = storage(item).value_type, depth + 1
    item = storage(item)
    return depth == 4 or (depth == 1 and (pa.types.is_binary(item) or pa.types.is_large_binary(item)
                                          or pa.types.is_struct(item)))


def storage(arrow_type: pa.DataType) -> pa.DataType:
    """An extension type's storage (``datasets``' Array3D is a list of lists of lists)."""
    return arrow_type.storage_type if isinstance(arrow_type, pa.ExtensionType) else arrow_type


def is_list(arrow_type: pa.DataType) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(
        arrow_type)


def decode_image(value, raw_image_size: int):
    """A Pillow RGB image from a cell; raises ValueError when it is not an image."""
    from PIL import Image

    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.shape[2] != 3 or value.dtype.kind not in "ui" or not value.size:
            raise ValueError(f"holds a {'x'.join(map(str, value.shape))} {value.dtype} array, not HxWx3 pixels")
        if value.min() < 0 or value.max() > 255:
            raise ValueError("holds pixel values outside 0..255")
        return Image.fromarray(value.astype(np.uint8))
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
    """Map-style access to the good rows of the files: ``dataset[i]`` is a ``Sample``."""

    def __init__(self, cfg: ImageTextDataConfig, path: str):
        self.cfg = cfg
        self.files = shard_files(path)
        self.rows = checked_rows(cfg, path, self.files)
        self._offsets = np.cumsum([0] + [file_rows(f) for f in self.files])
        self._open: Tuple[int, Optional[FileRows]] = (-1, None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        shard = int(np.searchsorted(self._offsets, row, side="right")) - 1
        if self._open[0] != shard:  # rows come in a shuffle within spans: keep the last file open
            self._open = (shard, FileRows(self.cfg, self.files[shard]))
        image, text = self._open[1][row - int(self._offsets[shard])]
        return row_sample(self.cfg, image, text)

    def row_group_spans(self) -> List[Tuple[int, int]]:
        """One span per file, so a step's reads stay within few files."""
        spans, start = [], 0
        for shard in range(len(self.files)):
            stop = int(np.searchsorted(self.rows, self._offsets[shard + 1], side="left"))
            if stop > start:
                spans.append((start, stop))
            start = stop
        return spans


class HeldOutShapes:
    """Generated shapes the training set does not hold (ids after its last), as ``Sample``s."""

    def __init__(self, cfg: ImageTextDataConfig, seed: int, size: int):
        self._cfg, self._seed, self._size = cfg, seed, size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> "Sample":
        from PIL import Image

        from raytrain_spot.tasks.vlm.shapes import generate_sample

        if not 0 <= index < self._size:
            raise IndexError(f"sample {index} is outside the evaluation set's {self._size}")
        drawn = generate_sample(self._seed, self._cfg.num_samples + index, self._cfg.image_size, max_shapes=2)
        return sample_of([Image.fromarray(drawn.image)], drawn.caption, self._cfg.prompt)


class Sample(NamedTuple):
    """One training sample: the images, the caption the model learns, and the turns before it
    (Hugging Face chat format, ``{"type": "image"}`` parts where the images go, in order)."""

    images: Tuple[Any, ...]
    caption: str
    prompt: Tuple[Dict[str, Any], ...]


def sample_of(images: Sequence[Any], text, data_prompt: str = "") -> Sample:
    """A Sample of RGB images and a caption string or chat turns (as a text cell holds them)."""
    prompt, caption = conversation(text, len(images), data_prompt, "image")
    return Sample(tuple(images), caption, prompt)


def row_sample(cfg: ImageTextDataConfig, image_cell_value, text) -> Sample:
    """A row as a Sample; raises BadCell naming the column whose cell is not what it should be."""
    try:
        images = decode_images(image_cell_value, cfg.raw_image_size)
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for a bad file
        raise BadCell(cfg.image_column, str(error)) from None
    try:
        prompt, caption = conversation(text, len(images), cfg.prompt, cfg.image_column)
    except ValueError as error:
        raise BadCell(cfg.text_column, str(error)) from None
    return Sample(images, caption, prompt)


class BadCell(ValueError):
    """A cell that cannot be trained on; ``column`` names it."""

    def __init__(self, column: str, problem: str):
        super().__init__(f"column {column!r} {problem}")
        self.column = column


def decode_images(value, raw_image_size: int) -> Tuple[Any, ...]:
    """The RGB images of an image cell: one image, or a list of them (TRL's ``images`` column)."""
    if not isinstance(value, list):
        return (decode_image(value, raw_image_size),)
    if not value:
        raise ValueError("holds an empty list of images")
    images = []
    for i, image in enumerate(value):
        try:
            images.append(decode_image(image, raw_image_size))
        except Exception as error:  # noqa: BLE001 - Pillow raises many types for a bad file
            raise ValueError(f"image {i} of {len(value)} {error}") from None
    return tuple(images)


def conversation(text, image_count: int, data_prompt: str, image_column: str) -> Tuple[Tuple[dict, ...], str]:
    """(the turns before the caption, the caption) from a text cell: a caption string, or chat turns
    ``[{"role": ..., "content": ...}, ...]`` whose last assistant turn is the caption. Turns without
    ``{"type": "image"}`` parts get the images at the start of the first user turn; ``data_prompt``
    (``task.data.prompt``) goes before the first user turn's text. Raises ValueError naming what the
    cell holds instead."""
    if isinstance(text, str):
        if not text.strip():
            raise ValueError("is empty")
        turns, caption = [{"role": "user", "content": []}], text.strip()
    else:
        if not (isinstance(text, list) and text and all(isinstance(t, dict) and {"role", "content"} <= t.keys()
                                                        for t in text)):
            raise ValueError(f"holds {type(text).__name__}, neither a caption string nor chat turns "
                             "[{role, content}, ...]")
        replies = [i for i, turn in enumerate(text) if turn["role"] == "assistant"]
        if not replies:
            raise ValueError("holds chat turns without an assistant turn (the caption to learn)")
        caption = turn_text(text[replies[-1]]["content"])
        if not caption:
            raise ValueError("holds chat turns whose last assistant turn is empty")
        turns = [{"role": turn["role"], "content": content_parts(turn["content"])} for turn in text[:replies[-1]]]
    placeholders = sum(part["type"] == "image" for turn in turns for part in turn["content"])
    if placeholders and placeholders != image_count:
        raise ValueError(f"has {placeholders} image placeholder(s) ({{'type': 'image'}}) but column {image_column!r} "
                         f"holds {image_count} image(s): one placeholder per image, in order")
    users = [turn for turn in turns if turn["role"] == "user"]
    if not users:
        turns.append({"role": "user", "content": []})
        users = turns[-1:]
    first = users[0]["content"]
    if not placeholders:
        first[:0] = [{"type": "image"}] * image_count
    if data_prompt:
        at = next((i for i, part in enumerate(first) if part["type"] == "text"), len(first))
        first.insert(at, {"type": "text", "text": data_prompt})
    return tuple(turns), caption


def content_parts(content) -> List[Dict[str, str]]:
    """A turn's content as Hugging Face chat parts: ``{"type": "text", "text": ...}`` and
    ``{"type": "image"}`` (a string is one text part; empty texts and other parts are left out)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content.strip()}] if content.strip() else []
    parts = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and part.get("type") == "image":
            parts.append({"type": "image"})
        elif isinstance(part, dict) and part.get("type") == "text" and (part.get("text") or "").strip():
            parts.append({"type": "text", "text": part["text"].strip()})
    return parts


def turn_text(content) -> str:
    """A turn's text: its text parts, joined by spaces."""
    return " ".join(part["text"] for part in content_parts(content) if part["type"] == "text")


def checked_rows(cfg: ImageTextDataConfig, path: str, files: List[str]) -> np.ndarray:
    """Indices of the rows that can be trained on (all of them, or the run stops, under ``fail``)."""
    fingerprint = hashlib.sha256(json.dumps(
        [CHECK_VERSION, cfg.image_column, cfg.text_column, cfg.raw_image_size, cfg.bad_rows,
         [(os.path.basename(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]]).encode()).hexdigest()[:16]
    cache = os.path.join(os.path.expanduser(cfg.cache_dir), "checked", f"{fingerprint}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return np.array(json.load(f)["good_rows"], dtype=np.int64)
    good, bad, row = [], [], 0
    with WorkProgress(f"checking the rows of {path}", sum(file_rows(f) for f in files), "rows",
                      logger.info) as progress:
        for file in files:
            rows = FileRows(cfg, file)
            for local in range(len(rows)):
                problem = None
                try:
                    row_sample(cfg, *rows[local])
                except BadCell as error:
                    problem = str(error)
                except ValueError as error:  # the image cell's lists are not pixels (image_cell)
                    problem = f"column {cfg.image_column!r} {error}"
                if problem is None:
                    good.append(row)
                elif cfg.bad_rows == "fail":
                    raise BadRow(f"{file}: row {local}: {problem}. Fix: repair or drop the row, or set "
                                 "task.data.bad_rows=skip to leave such rows out (they are counted)")
                else:
                    bad.append(f"{os.path.basename(file)}:{local}")
                row += 1
                progress.update(row)
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
    return sum(file_rows(f) for f in files) - len(checked_rows(cfg, path, files))


def generated_data_dir(cfg: ImageTextDataConfig, seed: int) -> str:
    """The generated shapes as image-text shards (PNG bytes, captions), written on first use."""
    from PIL import Image

    from raytrain_spot.tasks.vlm.shapes import generate_sample

    digest = hashlib.sha256(json.dumps([seed, cfg.num_samples, cfg.image_size]).encode()).hexdigest()[:12]
    path = os.path.join(os.path.expanduser(cfg.cache_dir), f"shapes-png-{digest}")
    if os.path.isdir(path):
        return path
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
