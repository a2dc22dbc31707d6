"""The GPU-like benchmark task (raytrain_spot/tasks/timed.py): its state is real, sized as asked, the
same on every rank, saved and restored whole; its step waits for its device time."""

import time

import pytest
import torch

from raytrain_spot.checkpoint.format import load_state, write_state
from raytrain_spot.config.errors import ConfigError
from raytrain_spot.tasks.timed import CHUNK_BYTES, ModelState, TimedStepTask


def test_the_state_has_the_size_asked_for_in_model_sized_tensors_the_same_for_a_seed():
    state = ModelState(0.15, seed=3)
    assert state.nbytes == int(0.15 * 2**30) // 8 * 8
    assert max(t.nbytes for t in state.tensors.values()) == CHUNK_BYTES and len(state.tensors) == 3
    again, other = ModelState(0.15, seed=3), ModelState(0.15, seed=4)
    assert all(torch.equal(again.tensors[k], t) for k, t in state.tensors.items()), "every rank builds the same"
    assert not torch.equal(other.tensors["00000"], state.tensors["00000"])
    assert all(t[:1000].unique().numel() == 1000 for t in state.tensors.values()), "random draws, not a fill"


def test_the_state_is_saved_and_restored_whole(tmp_path):
    task = TimedStepTask(state_gb=0.01)
    torch.manual_seed(0)
    task.build_model()
    saved = {name: part.state_dict() for name, part in task.extra_state().items()}
    write_state(saved, str(tmp_path / "state.pt"))
    restarted = TimedStepTask(state_gb=0.01)
    torch.manual_seed(1)  # another start's state, until the checkpoint's is loaded
    restarted.build_model()
    restarted.extra_state()["model_state"].load_state_dict(load_state(str(tmp_path / "state.pt"))["model_state"])
    assert all(torch.equal(restarted.extra_state()["model_state"].tensors[k], t)
               for k, t in saved["model_state"].items())
    larger = TimedStepTask(state_gb=0.02)
    larger.build_model()
    with pytest.raises(ValueError, match="task.state_gb"):
        larger.extra_state()["model_state"].load_state_dict(saved["model_state"])


def test_a_restore_replaces_the_state_without_drawing_it(monkeypatch):
    draws = []
    monkeypatch.setattr(ModelState, "_draw", lambda self: draws.append(self))
    saved = {name: torch.full_like(t, 7) for name, t in ModelState(0.01, seed=0)._tensors.items()}
    restored = ModelState(0.01, seed=1)
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved and draws == [], "a restart's build drew a state the restore replaced"
    fresh = ModelState(0.01, seed=1)
    fresh.state_dict()
    assert draws == [fresh], "a fresh start draws its state once it is read"


def test_a_micro_batch_waits_its_device_time_and_gives_a_loss_per_sample():
    task = TimedStepTask(state_gb=0.001, micro_batch_s=0.2)
    model = task.build_model()
    dataset = task.build_dataset(seed=0)
    batch = task.collate([dataset[i] for i in range(16)])
    started = time.perf_counter()
    losses = task.loss(model, batch)
    assert time.perf_counter() - started >= 0.2 and losses.shape == (16,)
    assert dataset[5][1] == dataset[5][1] and torch.equal(dataset[5][0], dataset[5][0]), "a sample is a pure function"


def test_bad_settings_name_the_setting():
    with pytest.raises(ConfigError, match="task.state_gb"):
        TimedStepTask(state_gb=0)
    with pytest.raises(ConfigError, match="task.micro_batch_s"):
        TimedStepTask(micro_batch_s=-1)
