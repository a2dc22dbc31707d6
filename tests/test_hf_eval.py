"""A Hugging Face VLM evaluates like any task: generated samples the training set does not hold (or
your own shards), its loss without gradients, and the captions it writes for a few of them as text."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from raytrain_spot.tasks.hf_vlm.data import ImageTextDataConfig  # noqa: E402
from raytrain_spot.tasks.hf_vlm.task import HfModelConfig, HuggingFaceVLMTask  # noqa: E402
from raytrain_spot.tasks.vlm.shapes import generate_sample  # noqa: E402


def task_for(tmp_path, eval_samples: int = 5) -> HuggingFaceVLMTask:
    return HuggingFaceVLMTask(model=HfModelConfig(preset="tiny-idefics3", cache_dir=str(tmp_path)),
                              data=ImageTextDataConfig(prompt="describe", cache_dir=str(tmp_path), num_samples=64,
                                                       eval_samples=eval_samples, eval_examples=2))


def test_generated_data_is_evaluated_on_samples_the_training_set_does_not_hold(tmp_path):
    task = task_for(tmp_path)
    train, held_out = task.build_dataset(7), task.build_eval_dataset(7)
    assert len(held_out) == 5
    assert [held_out[i].caption for i in range(5)] == [generate_sample(7, 64 + i, 32, max_shapes=2).caption
                                                       for i in range(5)]
    assert held_out[0].caption == generate_sample(7, 64, 32, max_shapes=2).caption != train[0].caption
    model = task.build_model()
    model.eval()
    with torch.no_grad():
        losses = task.eval_loss(model, task.collate([held_out[i] for i in range(3)]))
        examples = task.eval_examples(model, held_out, torch.device("cpu"))
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert [row["reference"] for row in examples] == [held_out[0].caption, held_out[1].caption]
    assert all(isinstance(row["generated"], str) for row in examples)


def test_your_own_data_is_evaluated_only_on_an_evaluation_set_you_name(tmp_path):
    own = task_for(tmp_path)
    own.data.path = own.data_dir(7)  # the generated shards, as if they were yours
    assert own.build_eval_dataset(7) is None, "no held-out set is guessed from your data"
    own.data.eval_path = own.data.path
    assert len(own.build_eval_dataset(7)) == 64
    assert task_for(tmp_path, eval_samples=0).build_eval_dataset(7) is None
