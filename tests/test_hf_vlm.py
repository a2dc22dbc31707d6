"""Hugging Face vision-language models as a task: four families on user-format shards, through a
preemption, against an uninterrupted run; bad data and bad model directories stop before Ray."""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from raytrain_spot.observe.events import read_events  # noqa: E402
from raytrain_spot.tasks.hf_vlm.data import (  # noqa: E402
    BadRow,
    ImageTextDataConfig,
    ImageTextShards,
    checked_rows,
    sample_of,
    shard_files,
)
from raytrain_spot.tasks.hf_vlm.task import HfModelConfig, HuggingFaceVLMTask  # noqa: E402
from raytrain_spot.tasks.hf_vlm.text import IGNORE  # noqa: E402
from raytrain_spot.tasks.vlm.shapes import generate_sample  # noqa: E402
from tests.conftest import assert_clean_audit, ray_internal_lines, run_main  # noqa: E402
from tests.hf_families import END_OF_ANSWER, families, family  # noqa: E402

STEPS = 100
LOSS_TOLERANCE = 0.05  # relative, on the mean loss of the last 10 steps


def write_user_shards(path, num_samples: int, *, image_format: str = "JPEG", bad: dict = None) -> str:
    """Image-caption shards as a user brings them: encoded images, columns named their way."""
    os.makedirs(path, exist_ok=True)
    bad = bad or {}
    for shard, start in enumerate(range(0, num_samples, 256)):
        photos, texts = [], []
        for i in range(start, min(start + 256, num_samples)):
            sample = generate_sample(7, i, 32, max_shapes=2)
            encoded = io.BytesIO()
            Image.fromarray(sample.image).save(encoded, format=image_format, quality=95)
            photos.append(bad.get(i, {}).get("photo", encoded.getvalue()))
            texts.append(bad.get(i, {}).get("text", sample.caption))
        pq.write_table(pa.table({"photo": pa.array(photos, pa.binary()), "text": pa.array(texts, pa.string())}),
                       os.path.join(path, f"part-{shard:03d}.parquet"))
    return str(path)


@pytest.fixture(scope="module")
def user_shards(tmp_path_factory):
    return write_user_shards(tmp_path_factory.mktemp("shards"), 2048)


def overrides(tmp_path, name: str, preset: str, shards: str) -> list:
    return ["+experiment=hf_vlm", f"run.name={name}", f"trainer.max_steps={STEPS}", "trainer.global_batch_size=24",
            "trainer.micro_batch_size=8", "run.log_sample_ids=true", f"task.model.preset={preset}",
            f"task.model.cache_dir={tmp_path}/models", f"task.data.path={shards}", "task.data.image_column=photo",
            "task.data.text_column=text", f"task.data.cache_dir={tmp_path}/data-cache",
            f"checkpoint.local_dir={tmp_path}/node-local", f"checkpoint.head_dir={tmp_path}/head"]


def train(tmp_path, name: str, *extra: str, preset: str, shards: str):
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")
    result = run_main(*overrides(tmp_path, name, preset, shards), *extra, cwd=str(tmp_path),
                      env={"RAY_TMPDIR": ray_tmp}, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert ray_internal_lines(result.stdout + result.stderr) == []
    assert_clean_audit(name, f"file://{tmp_path}/outputs/storage", f"{tmp_path}/head", f"{tmp_path}/node-local",
                       STEPS, ray_tmp)
    return read_events(str(tmp_path / "outputs" / name / "events.jsonl"))


def samples_by_step(events) -> dict:
    final = {}
    for record in events:
        if record["ev"] == "samples":
            final.setdefault(record["step"], {})[record["rank"]] = record["ids"]
    return {step: sorted(i for ids in ranks.values() for i in ids) for step, ranks in final.items()}


def final_loss(events) -> float:
    loss = {e["step"]: e["loss"] for e in events if e["ev"] == "step"}
    return sum(loss[s] for s in range(STEPS - 9, STEPS + 1)) / 10


@pytest.mark.cluster
@pytest.mark.chaos
# One family in the default suite keeps it under its time budget; the others run with -m slow.
@pytest.mark.parametrize("preset", ["tiny-llava", *(family(preset, pytest.mark.slow) for preset in
                                                    ("tiny-idefics3", "tiny-gemma3", "tiny-qwen2.5-vl"))])
def test_a_hugging_face_vlm_trains_through_a_preemption_like_an_uninterrupted_run(tmp_path, preset, user_shards):
    (tmp_path / "plain").mkdir()
    (tmp_path / "spot").mkdir()
    reference = train(tmp_path / "plain", "plain", preset=preset, shards=user_shards)
    # The handoff at once (no warm-up hold, which could train on to the run's last step): the resume is the point.
    # Its batches come from a loader process (the reference's from the training thread): the same samples.
    events = train(tmp_path / "spot", "spot", "+chaos=events", "chaos.notice_s=4", "chaos.margin_s=1",
                   "elastic.notice_standby_wait_s=0", "trainer.data_workers=1",
                   "chaos.events=[{action:preempt,node:1,at_step:10},{action:restore,after_s:1}]",
                   preset=preset, shards=user_shards)
    steps = [e["step"] for e in events if e["ev"] == "step"]
    assert len(steps) == len(set(steps)) == STEPS, "a step was redone"
    assert [g["world_size"] for g in events if g["ev"] == "group"][:2] == [3, 2]
    assert [e for e in events if e["ev"] == "restore_mismatch"] == []
    assert samples_by_step(events) == samples_by_step(reference), "some step trained on other samples"
    losses = [e["loss"] for e in reference if e["ev"] == "step"]
    assert losses[-1] < 0.8 * losses[0], "the model must learn for the comparison to mean anything"
    assert final_loss(events) == pytest.approx(final_loss(reference), rel=LOSS_TOLERANCE)


@pytest.mark.parametrize("preset", families())
def test_the_loss_counts_the_caption_and_its_end_only_one_loss_per_sample(tmp_path, preset, user_shards):
    import torch

    task = HuggingFaceVLMTask(model=HfModelConfig(preset=preset, cache_dir=str(tmp_path)),
                              data=ImageTextDataConfig(path=user_shards, image_column="photo", text_column="text",
                                                       cache_dir=str(tmp_path), prompt="describe"))
    task.prepare(0)
    dataset = task.build_dataset(0)
    torch.manual_seed(0)
    model = task.build_model()
    # Each sample's own prompt too, as chat turns give (words of the tiny tokenizer's vocabulary).
    samples = [sample_of(sample.images, [{"role": "user", "content": " ".join(["red large"] * i)},
                                         {"role": "assistant", "content": sample.caption}], "describe")
               for i, sample in enumerate(dataset[j] for j in range(4))]
    batch = task.collate(samples)
    tokenizer = task.processor().tokenizer
    for row in range(4):
        kept = batch["labels"][row][batch["labels"][row] != IGNORE].tolist()
        assert tokenizer.decode(kept).split() == samples[row].caption.split() + [END_OF_ANSWER[preset]], \
            "exactly the caption and its end are trained on"
    losses = task.loss(model, batch)
    assert losses.shape == (4,) and torch.isfinite(losses).all()


def test_bad_rows_are_named_or_skipped_and_counted(tmp_path):
    shards = write_user_shards(tmp_path / "bad", 300, bad={5: {"photo": b"not an image"}, 270: {"text": ""}})
    cfg = ImageTextDataConfig(path=shards, image_column="photo", text_column="text", cache_dir=str(tmp_path / "c1"))
    with pytest.raises(BadRow, match=r"part-000.parquet: row 5: column 'photo' .*Fix:"):
        checked_rows(cfg, shards, shard_files(shards))
    skip = ImageTextDataConfig(path=shards, image_column="photo", text_column="text", bad_rows="skip",
                               cache_dir=str(tmp_path / "c2"))
    dataset = ImageTextShards(skip, shards)
    assert len(dataset) == 298 and 5 not in dataset.rows and 270 not in dataset.rows
    assert dataset[5].caption == generate_sample(7, 6, 32, max_shapes=2).caption, "row 6 is the sixth good sample"
    with pytest.raises(BadRow, match="no column 'caption' .*task.data.text_column"):
        checked_rows(ImageTextDataConfig(path=shards, image_column="photo", cache_dir=str(tmp_path / "c3")), shards,
                     shard_files(shards))


def test_raw_pixel_images_and_png_are_read_too(tmp_path):
    shards = write_user_shards(tmp_path / "png", 10, image_format="PNG")
    (image,), *_ = ImageTextShards(ImageTextDataConfig(path=shards, image_column="photo", text_column="text",
                                                      cache_dir=str(tmp_path)), shards)[3]
    assert np.array_equal(np.asarray(image), generate_sample(7, 3, 32, max_shapes=2).image)
    raw = tmp_path / "raw"
    raw.mkdir()
    pixels = generate_sample(7, 0, 32, max_shapes=2).image
    pq.write_table(pa.table({"image": [pixels.tobytes()], "caption": ["a"]}), str(raw / "a.parquet"))
    (image,), *_ = ImageTextShards(ImageTextDataConfig(path=str(raw), raw_image_size=32, cache_dir=str(tmp_path)),
                               str(raw))[0]
    assert np.array_equal(np.asarray(image), pixels)
    structs = tmp_path / "datasets-style"
    structs.mkdir()
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    pq.write_table(pa.table({"image": [{"bytes": encoded.getvalue(), "path": None}], "caption": ["a"]}),
                   str(structs / "a.parquet"))
    (image,), *_ = ImageTextShards(ImageTextDataConfig(path=str(structs), cache_dir=str(tmp_path)), str(structs))[0]
    assert np.array_equal(np.asarray(image), pixels), "the datasets Image feature's {bytes, path} struct"


@pytest.mark.parametrize("problem, fix", [
    ("model", "task.model.path: {path} has no config.json"),
    ("data", "row 2: column 'photo'"),
])
def test_a_bad_model_directory_or_shard_stops_before_ray(tmp_path, problem, fix):
    shards = write_user_shards(tmp_path / "shards", 8, bad={2: {"photo": b"\x89PNG broken"}} if problem == "data" else {})
    empty = tmp_path / "empty-model"
    empty.mkdir()
    args = ["+experiment=hf_vlm", f"task.data.path={shards}", "task.data.image_column=photo",
            "task.data.text_column=text", f"task.data.cache_dir={tmp_path}/c", f"task.model.cache_dir={tmp_path}/m"]
    if problem == "model":
        args.append(f"task.model.path={empty}")
    result = run_main(*args, cwd=str(tmp_path), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert fix.format(path=empty) in result.stderr and "Fix:" in result.stderr
    assert "checkpoints in" not in result.stdout, "the run's first line comes once the cluster is up"


def mismatched_model_dir(path, problem: str) -> str:
    """The tiny LLaVA's directory with a processor that does not belong to its model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoProcessor, PreTrainedTokenizerFast

    from raytrain_spot.tasks.hf_vlm.presets import write_preset

    write_preset("tiny-llava", str(path))
    processor = AutoProcessor.from_pretrained(str(path))
    if problem == "image size":
        processor.image_processor.size = {"shortest_edge": 48}
        processor.image_processor.crop_size = {"height": 48, "width": 48}
    elif problem == "image tokens":
        processor.patch_size = 16
    else:
        words = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        processor.tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>")
    processor.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("problem, message", [
    ("image size", "makes 48x48 images, but the vision tower in its config.json takes 32x32"),
    ("image tokens", "writes 4 image tokens for an image, but the model's config.json yields 16 image features"),
    ("tokenizer", "has no <image> token"),
])
def test_a_processor_that_does_not_fit_its_model_is_named_before_ray(tmp_path, user_shards, problem, message):
    from raytrain_spot.config.errors import ConfigError

    model_dir = mismatched_model_dir(tmp_path / "model", problem)
    task = HuggingFaceVLMTask(model=HfModelConfig(path=model_dir),
                              data=ImageTextDataConfig(path=user_shards, image_column="photo", text_column="text",
                                                       cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=f"task.model.path: .*{model_dir}.*{message}.*Fix:"):
        task.prepare(0)


def test_the_task_groups_file_lists_every_setting_at_its_default():
    import dataclasses

    import yaml

    from tests.conftest import CONF_DIR

    listed = yaml.safe_load(open(os.path.join(CONF_DIR, "task", "hf_vlm.yaml")))
    task = HuggingFaceVLMTask()
    assert listed == {"_target_": f"{HuggingFaceVLMTask.__module__}.HuggingFaceVLMTask",
                      **{f.name: dataclasses.asdict(getattr(task, f.name)) for f in dataclasses.fields(task)}}


def weighted_model_dir(path, preset: str = "tiny-llava") -> str:
    """A model directory with weights, as a downloaded pretrained model is (a preset, trained nowhere)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from raytrain_spot.tasks.hf_vlm.presets import write_preset

    write_preset(preset, str(path))
    torch.manual_seed(1234)
    AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(str(path))).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("lora", [0, 2])
def test_a_pretrained_model_trains_in_train_mode_so_checkpointing_and_dropout_act(tmp_path, user_shards, lora):
    """``from_pretrained`` returns a model in eval mode, where checkpointed layers keep their activations
    and dropout (LoRA's too) is off: the step must train it in train mode."""
    import torch

    from raytrain_spot.config.schema import OptimConfig
    from raytrain_spot.tasks.hf_vlm.task import LoraConfig
    from raytrain_spot.loop.optim import build_optimizer
    from raytrain_spot.loop.step import train_step

    task = HuggingFaceVLMTask(model=HfModelConfig(path=weighted_model_dir(tmp_path / "model"),
                                                  gradient_checkpointing=True),
                              data=ImageTextDataConfig(path=user_shards, image_column="photo", text_column="text",
                                                       cache_dir=str(tmp_path)),
                              lora=LoraConfig(r=lora, dropout=0.1))
    task.prepare(0)
    model = task.build_model()
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert len(checkpointed) >= 4 and (dropouts or not lora), "the layers under test"
    seen = []

    def loss(m, batch):
        seen.append([layer.training for layer in checkpointed + dropouts])
        return task.loss(m, batch)

    dataset = task.build_dataset(0)
    batch = task.collate([dataset[i] for i in range(4)])
    train_step(model, build_optimizer(task.param_groups(model), OptimConfig()), [(batch, 4)], loss, 0.25, 1.0)
    assert seen and all(seen[0]), f"{seen[0].count(False)} of {len(seen[0])} layers trained in eval mode"
