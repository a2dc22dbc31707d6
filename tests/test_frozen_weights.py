"""Frozen parameters (a LoRA base, a frozen vision tower) are rebuilt, not checkpointed: the
checkpoint holds what trains, and a fingerprint that refuses to resume on a different base."""

import os

import pytest
import torch

from raytrain_spot.checkpoint.format import checkpoint_key
from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest
from raytrain_spot.checkpoint.state import FROZEN_FINGERPRINT, LoopState, ModelWeights, StateMismatch
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.storage.store import LocalStore
from tests.conftest import Recorder

pytestmark = pytest.mark.usefixtures("single_rank_group")


def _model(base_seed: int = 0):
    """A large frozen base and a small trained head, like a LoRA model."""
    torch.manual_seed(base_seed)
    base = torch.nn.Linear(256, 256)
    torch.manual_seed(100)
    model = torch.nn.Sequential(base, torch.nn.Linear(256, 4))
    base.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def _train(model, optimizer, steps: int):
    torch.manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 256)).pow(2).mean().backward()
        optimizer.step()


def _manager(tmp_path, sharded: bool):
    durable = StoreTier("durable", LocalStore(str(tmp_path / "durable")), "r", 3)
    return CheckpointManager("r", {}, None, [durable], writes_local=False, events=Recorder(),
                             scratch_root=str(tmp_path / "scratch"), sharded=sharded)


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_only_trained_parameters_are_saved_and_the_run_resumes_exactly(tmp_path, sharded):
    model, optimizer = _model()
    _train(model, optimizer, 3)
    manager = _manager(tmp_path, sharded)
    manager.save({"model": ModelWeights(model), "optimizer": optimizer}, SaveRequest(LoopState(3, 24), 1, "periodic"),
                 writer=True, wait=True)
    directory = LocalStore(str(tmp_path / "durable")).local_path(checkpoint_key("r", 3))
    saved_bytes = sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))
    base_bytes = 256 * 257 * 4
    assert saved_bytes < base_bytes / 4, f"{saved_bytes} bytes saved: the frozen base ({base_bytes} bytes) was too"

    fresh, fresh_optimizer = _model()
    restored = manager.restore({"model": ModelWeights(fresh), "optimizer": fresh_optimizer}, rank=0)
    assert restored.loop.step == 3
    _train(model, optimizer, 2)
    _train(fresh, fresh_optimizer, 2)
    for ours, theirs in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_a_checkpoint_never_resumes_on_another_base(tmp_path, sharded):
    model, optimizer = _model(base_seed=0)
    manager = _manager(tmp_path, sharded)
    manager.save({"model": ModelWeights(model), "optimizer": optimizer}, SaveRequest(LoopState(1, 8), 1, "periodic"),
                 writer=True, wait=True)
    other_base, other_optimizer = _model(base_seed=1)
    with pytest.raises(StateMismatch, match="model directory changed"):
        manager.restore({"model": ModelWeights(other_base), "optimizer": other_optimizer}, rank=0)


def test_freezing_settings_must_match_the_checkpoint():
    model, _ = _model()
    frozen = ModelWeights(model)
    state = frozen.state_dict()
    assert FROZEN_FINGERPRINT in state and "0.weight" not in state and "1.weight" in state
    model.requires_grad_(True)
    with pytest.raises(StateMismatch, match="same freezing settings"):
        ModelWeights(model).load_state_dict(state)
    with pytest.raises(StateMismatch, match="same freezing settings"):
        frozen.load_state_dict(ModelWeights(model).state_dict())


def test_a_model_without_frozen_parameters_saves_its_whole_state_dict():
    model, _ = _model()
    model.requires_grad_(True)
    assert ModelWeights(model).state_dict().keys() == model.state_dict().keys()
