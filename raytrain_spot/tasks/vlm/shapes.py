"""Procedural image-caption pairs: coloured shapes on a 3x3 grid, described in words.

A sample is a pure function of (seed, sample_id), so every node can regenerate the same
dataset and a test can recompute any sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

COLORS = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (240, 220, 40),
    "magenta": (220, 50, 220), "cyan": (40, 220, 220), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
VOCAB: List[str] = [PAD, BOS, EOS, "a", "at", "and", *COLORS, *SHAPES, *SIZES, *ROWS, *COLUMNS]
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}
WORDS_PER_SHAPE = 7  # "a large red circle at top left"


def max_caption_tokens(max_shapes: int) -> int:
    """BOS + shape phrases joined by "and" + EOS."""
    return 2 + max_shapes * WORDS_PER_SHAPE + (max_shapes - 1)


@dataclass(frozen=True)
class Sample:
    sample_id: int
    image: np.ndarray  # uint8, (size, size, 3)
    caption: str


def generate_sample(seed: int, sample_id: int, image_size: int, max_shapes: int) -> Sample:
    rng = np.random.default_rng([seed, sample_id])
    image = rng.integers(0, 24, size=(image_size, image_size, 3), dtype=np.uint8)
    num_shapes = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(len(ROWS) * len(COLUMNS), size=num_shapes, replace=False)
    phrases = []
    for cell in cells:
        row, col = divmod(int(cell), len(COLUMNS))
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        _draw(image, shape, COLORS[color], row, col, size == "large")
        phrases.append(f"a {size} {color} {shape} at {ROWS[row]} {COLUMNS[col]}")
    return Sample(sample_id, image, " and ".join(phrases))


def _draw(image: np.ndarray, shape: str, rgb: Sequence[int], row: int, col: int, large: bool) -> None:
    size = image.shape[0]
    cell = size / 3.0
    cy, cx = (row + 0.5) * cell, (col + 0.5) * cell
    radius = cell * (0.45 if large else 0.25)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        mask = dy**2 + dx**2 <= radius**2
    elif shape == "square":
        mask = (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    elif shape == "triangle":
        mask = (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    else:  # cross
        arm = radius * 0.3
        mask = ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius))
    image[mask] = rgb


def tokenize(caption: str, length: int) -> np.ndarray:
    """Word ids of ``<bos> caption <eos>``, padded to ``length``."""
    ids = [TOKEN_ID[BOS], *(TOKEN_ID[word] for word in caption.split()), TOKEN_ID[EOS]]
    if len(ids) > length:
        raise ValueError(f"caption of {len(ids)} tokens does not fit {length}: {caption!r}")
    return np.array(ids + [TOKEN_ID[PAD]] * (length - len(ids)), dtype=np.int64)
