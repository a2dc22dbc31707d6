import itertools

import numpy as np
import pytest
import torch

from raytrain_spot.tasks.vlm.config import CaptionDataConfig
from raytrain_spot.tasks.vlm.parquet import DATASET_MANIFEST, ImageCaptionDataset, ensure_dataset
from raytrain_spot.loop.sample_order import GlobalSampleOrder, rank_positions
from raytrain_spot.tasks.vlm.shapes import COLORS, SHAPES, TOKEN_ID, VOCAB, generate_sample, max_caption_tokens, tokenize


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    cfg = CaptionDataConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), num_samples=300, shard_size=128,
                     row_group_size=32)
    return ensure_dataset(cfg, seed=3), cfg


def test_samples_are_a_function_of_seed_and_id():
    a, b = generate_sample(1, 42, 32, 2), generate_sample(1, 42, 32, 2)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    c = generate_sample(2, 42, 32, 2)
    assert not np.array_equal(a.image, c.image)


def test_caption_describes_the_drawn_shapes():
    sample = generate_sample(0, 7, 32, 3)
    phrases = sample.caption.split(" and ")
    assert 1 <= len(phrases) <= 3
    for phrase in phrases:
        words = phrase.split()
        assert words[0] == "a" and words[2] in COLORS and words[3] in SHAPES and words[4] == "at"
        color = np.array(COLORS[words[2]])
        assert (sample.image.reshape(-1, 3) == color).all(axis=1).sum() > 0, f"no {words[2]} pixel for {phrase}"


def test_tokenize_pads_and_round_trips():
    caption = generate_sample(0, 1, 32, 3).caption
    ids = tokenize(caption, max_caption_tokens(3))
    words = [VOCAB[i] for i in ids if i != TOKEN_ID["<pad>"]]
    assert words == ["<bos>", *caption.split(), "<eos>"]
    with pytest.raises(ValueError):
        tokenize(caption, 3)


def test_parquet_dataset_round_trip(dataset_dir):
    path, cfg = dataset_dir
    dataset = ImageCaptionDataset(path, cfg.image_size, cfg.max_shapes)
    assert len(dataset) == cfg.num_samples
    indices = [0, 31, 32, 299, 150]
    for index in indices:
        image, tokens = dataset[index]
        assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
        expected = generate_sample(3, index, cfg.image_size, cfg.max_shapes)  # the generator writes sample i at row i
        assert np.array_equal(tokens.numpy(), tokenize(expected.caption, max_caption_tokens(cfg.max_shapes)))
        pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(pixels, expected.image)
    with pytest.raises(IndexError):
        dataset[cfg.num_samples]


def test_generation_is_idempotent_and_atomic(dataset_dir, tmp_path):
    path, cfg = dataset_dir
    assert ensure_dataset(cfg, seed=3) == path  # found, not regenerated
    half_written = tmp_path / "partial"
    half_written.mkdir()
    with pytest.raises(FileNotFoundError, match="task.data.path"):
        ensure_dataset(CaptionDataConfig(path=str(half_written)), seed=0)
    assert (tmp_path / "partial" / DATASET_MANIFEST).exists() is False


def _consume(order, start, stop, global_batch, world_size):
    """Row ids each rank sees for the steps starting at cursors start..stop."""
    seen = []
    for cursor in range(start, stop, global_batch):
        for rank in range(world_size):
            seen.extend(order.rows_at(rank_positions(cursor, global_batch, rank, world_size)))
    return seen


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_sample_exactly_once_per_epoch(world_size):
    spans = [(0, 32), (32, 64), (64, 96), (96, 120)]
    order = GlobalSampleOrder(spans, seed=5)
    global_batch = 12
    seen = _consume(order, 0, 120, global_batch, world_size)
    assert sorted(seen) == list(range(120))


def test_epochs_reshuffle_and_each_is_complete():
    order = GlobalSampleOrder([(0, 16), (16, 40)], seed=1)
    first = order.rows_at(np.arange(0, 40))
    second = order.rows_at(np.arange(40, 80))
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != second


@pytest.mark.parametrize("resume_cursor_steps", [0, 1, 3, 7])
def test_resume_at_any_cursor_with_any_world_size(resume_cursor_steps):
    """Stop after some steps at one world size, resume at every other: same stream, no gaps or repeats."""
    spans = [(0, 50), (50, 100), (100, 130)]
    global_batch = 10
    reference = GlobalSampleOrder(spans, seed=9).rows_at(np.arange(0, 200))
    cursor = resume_cursor_steps * global_batch
    for before, after in itertools.product([1, 2, 3, 4], repeat=2):
        order = GlobalSampleOrder(spans, seed=9)
        head = _consume(order, 0, cursor, global_batch, before)
        resumed = GlobalSampleOrder(spans, seed=9)  # a fresh process after the restart
        tail = _consume(resumed, cursor, 200, global_batch, after)
        assert sorted(head + tail) == sorted(reference)
        assert sorted(tail) == sorted(reference[cursor:])
