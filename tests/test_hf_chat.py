"""Samples as the model's chat format has them: the processor's chat template when it has one (the
user turn with the images and the prompt, the assistant turn the caption), the raw form when not;
the loss on the answer and its end-of-turn token, so a model trained here stops where it should."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from raytrain_spot.config.errors import ConfigError  # noqa: E402
from raytrain_spot.config.schema import OptimConfig  # noqa: E402
from raytrain_spot.tasks.hf_vlm.data import ImageTextDataConfig, sample_of  # noqa: E402
from raytrain_spot.tasks.hf_vlm.task import HfModelConfig, HuggingFaceVLMTask  # noqa: E402
from raytrain_spot.tasks.hf_vlm.text import IGNORE  # noqa: E402
from raytrain_spot.tasks.vlm.shapes import generate_sample  # noqa: E402
from raytrain_spot.loop.optim import build_optimizer  # noqa: E402
from raytrain_spot.loop.step import train_step  # noqa: E402
from tests.hf_families import families  # noqa: E402

MAX_NEW_TOKENS = 12


def task_for(tmp_path, preset: str, **model) -> HuggingFaceVLMTask:
    return HuggingFaceVLMTask(model=HfModelConfig(preset=preset, cache_dir=str(tmp_path), **model),
                              data=ImageTextDataConfig(prompt="describe", cache_dir=str(tmp_path)))


def shapes_samples(count: int):
    drawn = [generate_sample(3, i, 32, max_shapes=1) for i in range(count)]
    return [sample_of([Image.fromarray(s.image)], s.caption, "describe") for s in drawn]


def test_a_processor_with_a_chat_template_gets_conversations_and_the_answer_ends_with_its_end_of_turn(tmp_path):
    task = task_for(tmp_path, "tiny-idefics3")
    sample = shapes_samples(1)[0]
    batch = task.collate([sample])
    tokenizer = task.processor().tokenizer
    written = tokenizer.decode(batch["input_ids"][0])
    assert written.startswith("<|im_start|> User: <fake_token_around_image>") and "<|im_start|> Assistant:" in written
    trained = tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE])
    assert trained.split() == sample.caption.split() + ["<end_of_utterance>"]
    assert written.split()[-len(trained.split()) - 2:-len(trained.split())] == ["<|im_start|>", "Assistant:"], \
        "the answer comes right after the template's generation prompt"

    raw = task_for(tmp_path, "tiny-idefics3", chat_template=False).collate([sample])
    assert "User:" not in tokenizer.decode(raw["input_ids"][0]), "task.model.chat_template=false: the raw form"
    assert tokenizer.decode(raw["labels"][0][raw["labels"][0] != IGNORE]).split() == sample.caption.split() + ["</s>"]


@pytest.mark.parametrize("preset", families())  # chat templates (all but LLaVA's); none (the raw form)
def test_a_model_trained_here_writes_the_caption_and_stops(tmp_path, preset):
    task = task_for(tmp_path, preset)
    torch.manual_seed(0)
    model = task.build_model()
    samples = shapes_samples(2)
    assert samples[0].caption != samples[1].caption
    batch = task.collate(samples)
    optimizer = build_optimizer(task.param_groups(model), OptimConfig(lr=2e-2, weight_decay=0.0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend for the cores
    try:
        for _ in range(80):  # 60 suffice for both presets
            train_step(model, optimizer, [(batch, 2)], task.loss, 0.5, 1.0)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    for sample in samples:
        inputs = task.prompt_inputs(sample.images, "")
        with torch.no_grad():
            written = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                     eos_token_id=list(task.sample_text().stop_ids))
        assert written.shape[1] - inputs["input_ids"].shape[1] == len(sample.caption.split()) + 1, \
            "it writes the caption and its end token, then stops"
        assert task.caption(model, sample.images, "") == sample.caption


def test_a_chat_template_that_does_not_write_the_prompt_first_is_named_before_ray(tmp_path):
    task = task_for(tmp_path, "tiny-idefics3")
    # The generation prompt differs from how an assistant turn starts: the answer cannot be told apart.
    task.processor().chat_template = task.processor().chat_template.replace(
        "<|im_start|>Assistant:{% endif %}", "<|im_start|>Reply:{% endif %}")
    task._sample_text = None
    image = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ConfigError, match=r"task.model.chat_template: the processor in .*does not write a "
                                          r"conversation as the prompt .*Fix: set task.model.chat_template=false"):
        task.check_inputs(task.model_dir(), sample_of([image], "a red circle"))
