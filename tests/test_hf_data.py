"""The Hugging Face task's data in both formats it reads: Parquet shards and a ``datasets``
``save_to_disk`` directory, row by row in the directory's own order, with bad rows named (file,
row, column) or skipped and counted."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

datasets = pytest.importorskip("datasets")

from PIL import Image  # noqa: E402

from raytrain_spot.tasks.hf_vlm.data import (  # noqa: E402
    BadRow,
    ImageTextDataConfig,
    ImageTextShards,
    checked_rows,
    shard_files,
    skipped_rows,
)
from raytrain_spot.observe import progress  # noqa: E402
from raytrain_spot.tasks.vlm.shapes import generate_sample  # noqa: E402
from tests.hf_families import families  # noqa: E402

ROWS = 30
FILES = 3


@pytest.fixture(autouse=True)
def quiet_datasets():
    datasets.disable_progress_bars()


def shapes(i: int) -> np.ndarray:
    return generate_sample(7, i, 16, max_shapes=2).image


def png(pixels: np.ndarray) -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    return encoded.getvalue()


def shuffled_rows(bad: dict = None):
    """(PNG bytes, caption) rows in an order that is neither generation nor caption order."""
    order = np.random.default_rng(3).permutation(ROWS)
    samples = [generate_sample(7, int(i), 16, max_shapes=2) for i in order]
    rows = [(png(s.image), s.caption) for s in samples]
    for row, image in (bad or {}).items():
        rows[row] = (image, rows[row][1])
    return rows


def save_to_disk(path, rows) -> str:
    """The rows as a ``datasets`` directory with the Image feature, in FILES Arrow files."""
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": image, "path": None} for image, _ in rows],
                                          "caption": [caption for _, caption in rows]}, features=features)
    dataset.save_to_disk(str(path), num_shards=FILES)
    return str(path)


def parquet_shards(path, rows) -> str:
    """The same rows as Parquet shards of ``{"bytes", "path"}`` structs, in row groups of 4 (batches to find)."""
    os.makedirs(path)
    per_file = ROWS // FILES
    for shard in range(FILES):
        chunk = rows[shard * per_file:(shard + 1) * per_file]
        pq.write_table(pa.table({"image": [{"bytes": image, "path": None} for image, _ in chunk],
                                 "caption": [caption for _, caption in chunk]}),
                       os.path.join(path, f"part-{shard}.parquet"), row_group_size=4)
    return str(path)


@pytest.mark.parametrize("write", [save_to_disk, parquet_shards])
def test_dataset_i_is_the_directorys_row_i(tmp_path, write):
    rows = shuffled_rows()
    path = write(tmp_path / "data", rows)
    dataset = ImageTextShards(ImageTextDataConfig(path=path, cache_dir=str(tmp_path / "cache")), path)
    assert len(dataset) == ROWS
    assert dataset.row_group_spans() == [(0, 10), (10, 20), (20, 30)], "one span per file"
    reference = datasets.load_from_disk(path) if write is save_to_disk else None
    for i in range(ROWS):
        (image,), caption, prompt = dataset[i]
        assert prompt == ({"role": "user", "content": [{"type": "image"}]},)
        assert caption == rows[i][1]
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(rows[i][0])).convert("RGB")))
        if reference is not None:
            assert caption == reference[i]["caption"]
            assert np.array_equal(np.asarray(image), np.asarray(reference[i]["image"].convert("RGB")))


def test_a_bad_image_is_named_by_file_row_and_column_or_skipped_and_counted(tmp_path):
    rows = shuffled_rows(bad={13: b"not an image"})
    path = save_to_disk(tmp_path / "data", rows)
    with pytest.raises(BadRow, match=r"data-00001-of-00003\.arrow: row 3: column 'image' .*Fix:"):
        checked_rows(ImageTextDataConfig(path=path, cache_dir=str(tmp_path / "c1")), path, shard_files(path))
    skip = ImageTextDataConfig(path=path, bad_rows="skip", cache_dir=str(tmp_path / "c2"))
    dataset = ImageTextShards(skip, path)
    assert len(dataset) == ROWS - 1 and 13 not in dataset.rows
    assert skipped_rows(skip, path) == 1
    assert dataset[13].caption == rows[14][1], "the good rows close up over the skipped one"


def test_checking_every_row_before_ray_starts_prints_how_far_it_is(tmp_path, monkeypatch, caplog):
    """Checking a million rows takes minutes: the driver says how far it is instead of going quiet."""
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)  # a line at every row: 30 rows stand for many
    path = parquet_shards(tmp_path / "data", shuffled_rows())
    with caplog.at_level(logging.INFO, logger=checked_rows.__module__):
        checked_rows(ImageTextDataConfig(path=path, cache_dir=str(tmp_path / "c")), path, shard_files(path))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"checking the rows of {path}:")]
    assert lines[0].startswith(f"checking the rows of {path}: 1/30 rows (3%) | elapsed 0:00:0")
    assert lines[-2].startswith(f"checking the rows of {path}: 30/30 rows (100%)")
    assert lines[-1].startswith(f"checking the rows of {path}: done, 30 rows in ")


def test_a_missing_column_is_named_with_the_columns_there_are(tmp_path):
    path = save_to_disk(tmp_path / "data", shuffled_rows())
    with pytest.raises(BadRow, match=r"data-00000-of-00003\.arrow: no column 'text' \(it has image, caption\)\. "
                                     r"Fix: set task\.data\.text_column"):
        checked_rows(ImageTextDataConfig(path=path, text_column="text", cache_dir=str(tmp_path / "c")), path,
                     shard_files(path))


def test_chat_turns_give_each_sample_its_prompt_and_caption(tmp_path):
    turns = [[{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": "a red circle"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "and this?"},
              {"role": "assistant", "content": "blue"}, {"role": "user", "content": "size?"},
              {"role": "assistant", "content": "large"}],
             [{"role": "user", "content": "no answer"}]]
    features = datasets.Features({"image": datasets.Image(),
                                  "caption": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]})
    datasets.Dataset.from_dict({"image": [{"bytes": png(shapes(i)), "path": None} for i in range(3)],
                                "caption": turns}, features=features).save_to_disk(str(tmp_path / "chat"))
    with pytest.raises(BadRow, match=r"row 2: column 'caption' holds chat turns without an assistant turn"):
        ImageTextShards(ImageTextDataConfig(cache_dir=str(tmp_path / "c")), str(tmp_path / "chat"))
    dataset = ImageTextShards(ImageTextDataConfig(cache_dir=str(tmp_path / "c2"), bad_rows="skip"),
                              str(tmp_path / "chat"))
    image, text = {"type": "image"}, lambda words: {"type": "text", "text": words}
    assert [sample[1:] for sample in dataset] == [
        ("a red circle", ({"role": "user", "content": [image, text("what is it?")]},)),
        ("large", ({"role": "system", "content": [text("be brief")]},
                   {"role": "user", "content": [image, text("and this?")]},
                   {"role": "assistant", "content": [text("blue")]}, {"role": "user", "content": [text("size?")]}))]


def test_raw_pixel_arrays_as_array3d_or_nested_lists(tmp_path):
    pixels = shapes(0)
    features = datasets.Features({"image": datasets.Array3D(pixels.shape, "uint8"),
                                  "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [pixels], "caption": ["a"]}, features=features).save_to_disk(
        str(tmp_path / "array3d"))
    (tmp_path / "lists").mkdir()
    pq.write_table(pa.table({"image": [pixels.tolist()], "caption": ["a"]}), str(tmp_path / "lists" / "a.parquet"))
    for name in ("array3d", "lists"):
        path = str(tmp_path / name)
        (image,), *_ = ImageTextShards(ImageTextDataConfig(path=path, cache_dir=str(tmp_path / "c")), path)[0]
        assert np.array_equal(np.asarray(image), pixels), name
    ragged = tmp_path / "ragged"
    ragged.mkdir()
    pq.write_table(pa.table({"image": [[[[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]]], "caption": ["a"]}),
                   str(ragged / "a.parquet"))
    with pytest.raises(BadRow, match="row 0: column 'image' holds ragged"):
        checked_rows(ImageTextDataConfig(path=str(ragged), cache_dir=str(tmp_path / "c")), str(ragged),
                     shard_files(str(ragged)))


def test_a_dataset_dict_directory_names_its_splits(tmp_path):
    split = datasets.Dataset.from_dict({"image": [png(shapes(0))], "caption": ["a"]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(FileNotFoundError, match=r"DatasetDict \(splits train, test\)\. Fix: .*dict/train"):
        shard_files(str(tmp_path / "dict"))
    train = str(tmp_path / "dict" / "train")
    assert len(ImageTextShards(ImageTextDataConfig(cache_dir=str(tmp_path / "c")), train)) == 1, "a split reads"


def trl_rows():
    """Rows in TRL's vision-language format: an ``images`` list and ``messages`` turns whose
    ``{"type": "image"}`` parts stand for the images, in order; one row with two images."""
    image, text = {"type": "image", "text": None}, lambda words: {"type": "text", "text": words}
    rows = []
    for i in range(4):
        images = [png(shapes(i))] + ([png(shapes(10 + i))] if i == 1 else [])
        rows.append({"images": images, "messages": [
            {"role": "user", "content": [image] * len(images) + [text("what is it?")]},
            {"role": "assistant", "content": [text(generate_sample(7, i, 16, max_shapes=2).caption)]}]})
    return rows


def write_trl(path, rows, how: str) -> str:
    if how == "parquet":
        os.makedirs(path)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(path, "train-00000.parquet"))
    else:
        features = datasets.Features({"images": datasets.List(datasets.Image()), "messages": datasets.List(
            {"role": datasets.Value("string"), "content": datasets.List(
                {"type": datasets.Value("string"), "text": datasets.Value("string")})})})
        datasets.Dataset.from_list([{**row, "images": [{"bytes": b, "path": None} for b in row["images"]]}
                                    for row in rows], features=features).save_to_disk(str(path))
    return str(path)


TRL = dict(image_column="images", text_column="messages")


@pytest.mark.parametrize("how", ["parquet", "save_to_disk"])
def test_trl_images_and_messages_rows_give_samples_with_every_image(tmp_path, how):
    rows = trl_rows()
    path = write_trl(tmp_path / "trl", rows, how)
    dataset = ImageTextShards(ImageTextDataConfig(path=path, cache_dir=str(tmp_path / "c"), **TRL), path)
    assert len(dataset) == 4
    for i, row in enumerate(rows):
        images, caption, prompt = dataset[i]
        assert caption == row["messages"][1]["content"][0]["text"]
        assert [np.asarray(image).tolist() for image in images] == [
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).tolist() for b in row["images"]]
        assert prompt == ({"role": "user", "content": [{"type": "image"}] * len(images)
                           + [{"type": "text", "text": "what is it?"}]},)


@pytest.mark.parametrize("preset", families())
def test_a_trl_sample_with_two_images_trains_with_both(tmp_path, preset):
    from raytrain_spot.tasks.hf_vlm.task import HfModelConfig, HuggingFaceVLMTask

    path = write_trl(tmp_path / "trl", trl_rows(), "parquet")
    task = HuggingFaceVLMTask(model=HfModelConfig(preset=preset, cache_dir=str(tmp_path / "m")),
                              data=ImageTextDataConfig(path=path, cache_dir=str(tmp_path / "c"), **TRL))
    task.prepare(0)
    dataset = task.build_dataset(0)
    batch = task.collate([dataset[0], dataset[1]])
    (image_id,) = task.processor().image_token_ids  # the token an image's features replace
    per_sample = (batch["input_ids"] == image_id).sum(dim=1).tolist()
    assert per_sample[1] == 2 * per_sample[0] > 0, "the second sample's two images both go in"


@pytest.mark.parametrize("preset", families())
def test_images_of_other_sizes_collate_with_the_processor_s_own_tensors_and_train(tmp_path, preset):
    """Qwen2.5-VL's processor returns every image's patches as rows of one flat ``pixel_values`` and an
    ``image_grid_thw`` row per image, an image's token count following its size: the batch is the
    processor's, concatenated over the micro-batch's images, never stacked per sample."""
    import torch

    from raytrain_spot.tasks.hf_vlm.data import sample_of
    from raytrain_spot.tasks.hf_vlm.task import HfModelConfig, HuggingFaceVLMTask

    task = HuggingFaceVLMTask(model=HfModelConfig(preset=preset, cache_dir=str(tmp_path)))
    square, tall = (Image.fromarray(generate_sample(7, i, side, max_shapes=2).image).resize((32, side))
                    for i, side in ((0, 32), (1, 48)))
    samples = [sample_of([square], "a red circle"), sample_of([tall], "a blue square"),
               sample_of([tall, square], "a red circle and a blue square")]
    batch = task.collate(samples)
    (image_id,) = task.processor().image_token_ids
    tokens = (batch["input_ids"] == image_id).sum(dim=1).tolist()
    if "image_grid_thw" in batch:
        grid = batch["image_grid_thw"]
        merge = task.processor().image_processor.merge_size
        assert grid.shape == (4, 3) and batch["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())
        assert tokens == [int(grid[0].prod()) // merge ** 2, int(grid[1].prod()) // merge ** 2,
                          int(grid[2:].prod(dim=1).sum()) // merge ** 2]
        assert tokens[1] > tokens[0], "a larger image has more tokens"
    assert tokens[2] == tokens[0] + tokens[1] > 0
    torch.manual_seed(0)
    losses = task.loss(task.build_model(), batch)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    losses.sum().backward()


@pytest.mark.parametrize("problem, message", [
    ("placeholders", r"row 2: column 'messages' has 1 image placeholder\(s\) \({'type': 'image'}\) but column "
                     r"'images' holds 2 image\(s\)"),
    ("bad image", r"row 1: column 'images' image 1 of 2 .*Fix:"),
    ("no images", r"row 3: column 'images' holds an empty list of images"),
])
def test_a_trl_row_that_does_not_add_up_is_named(tmp_path, problem, message):
    rows = trl_rows()
    if problem == "placeholders":
        rows[2]["images"].append(png(shapes(20)))
    elif problem == "bad image":
        rows[1]["images"][1] = b"not an image"
    else:
        rows[3]["images"] = []
    path = write_trl(tmp_path / "trl", rows, "parquet")
    with pytest.raises(BadRow, match=message):
        checked_rows(ImageTextDataConfig(path=path, cache_dir=str(tmp_path / "c"), **TRL), path, shard_files(path))


def test_trl_data_read_with_the_default_columns_says_which_to_set(tmp_path):
    path = write_trl(tmp_path / "trl", trl_rows(), "save_to_disk")
    with pytest.raises(BadRow, match=r"no column 'image' \(it has images, messages\)\. Fix: set "
                                     r"task\.data\.image_column .*task\.data\.image_column=images "
                                     r"task\.data\.text_column=messages"):
        checked_rows(ImageTextDataConfig(path=path, cache_dir=str(tmp_path / "c")), path, shard_files(path))


def test_a_list_of_pixel_arrays_is_a_list_of_images(tmp_path):
    pixels = [shapes(0), shapes(1)]
    features = datasets.Features({"images": datasets.List(datasets.Array3D(pixels[0].shape, "uint8")),
                                  "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"images": [pixels], "caption": ["a"]}, features=features).save_to_disk(
        str(tmp_path / "arrays"))
    images, *_ = ImageTextShards(ImageTextDataConfig(image_column="images", cache_dir=str(tmp_path / "c")),
                                 str(tmp_path / "arrays"))[0]
    assert [np.asarray(image).tolist() for image in images] == [p.tolist() for p in pixels]
