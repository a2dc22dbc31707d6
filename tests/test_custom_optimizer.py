"""A task's own optimizer and learning-rate schedule (TrainingTask.build_optimizer / learning_rate):
trained, checkpointed and resumed at another world size like the defaults, on a plain gloo group."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from raytrain_spot.checkpoint.format import checkpoint_key
from raytrain_spot.checkpoint.manager import load_checkpoint_state
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.config.schema import OptimConfig
from raytrain_spot.storage.store import LocalStore
from raytrain_spot.loop.optim import build_optimizer, learning_rate
from tests.test_loop import NODES, RUN, FaultInjector, LinearTask, config, losses, of, train_group

STEP_EVERY_SAMPLES = 32
"""The step schedule halves the learning rate every 32 samples (4 steps of the test's batch of 8)."""


@dataclass
class MomentumTask(LinearTask):
    """The loop test's task with SGD + momentum and a step schedule."""

    def build_optimizer(self, model, optim):
        return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=0.9)

    def learning_rate(self, samples_seen, total_samples, optim):
        return optim.lr * 0.5 ** (samples_seen // STEP_EVERY_SAMPLES)


@dataclass
class NotAnOptimizerTask(LinearTask):
    def build_optimizer(self, model, optim):
        return {"lr": optim.lr}


def test_a_tasks_optimizer_and_schedule_train_checkpoint_and_resume_at_another_size_on_the_same_curve(tmp_path):
    steps, cfg = 12, config(max_steps=12)
    reference = train_group(tmp_path, 1, FaultInjector(NODES), cfg, task=MomentumTask(),
                          storage=str(tmp_path / "ref"))
    preempted = train_group(tmp_path, 2, FaultInjector(NODES).notice_at(step=5, rank=1), cfg, task=MomentumTask())
    resumed = train_group(tmp_path, 1, FaultInjector(NODES), cfg, task=MomentumTask())
    assert [r["step"] for r in preempted] == [5, 5] and resumed[0]["outcome"] == "finished"

    lrs = {e["step"]: e["lr"] for r in (preempted[0], resumed[0]) for e in of(r, "step")}
    assert lrs == {step: 0.1 * 0.5 ** ((step - 1) * 8 // STEP_EVERY_SAMPLES) for step in range(1, steps + 1)}
    durable = StoreTier("durable", LocalStore(str(tmp_path / "durable")), RUN, keep_latest_k=5)
    saved = load_checkpoint_state(*durable.fetch(checkpoint_key(RUN, 5), str(tmp_path)))["optimizer"]
    assert all("momentum_buffer" in s for s in saved["state"].values()) and saved["state"], \
        "the checkpoint holds SGD's momentum"

    curve, expected = {**losses(preempted[0]), **losses(resumed[0])}, losses(reference[0])
    assert sorted(curve) == list(range(1, steps + 1))
    norms = {e["step"]: e["grad_norm"] for r in (preempted[0], resumed[0]) for e in of(r, "step")}
    assert all(norm > 0 for norm in norms.values()) and len(set(norms.values())) == steps, \
        "every step logs its own gradient norm"
    assert expected[steps] < 0.5 * expected[1], "the loss must fall for the comparison to mean anything"
    for step in range(1, steps + 1):
        assert math.isclose(curve[step], expected[step], rel_tol=1e-4), f"step {step}: {curve[step]} vs {expected[step]}"


def test_an_optimizer_the_framework_cannot_drive_stops_every_rank_with_the_fix(tmp_path):
    ranks = train_group(tmp_path, 2, FaultInjector(NODES), config(max_steps=3), task=NotAnOptimizerTask())
    assert [r["outcome"] for r in ranks] == ["contract", "contract"]
    assert all("NotAnOptimizerTask.build_optimizer returned a dict" in r["error"] and "Fix:" in r["error"]
               for r in ranks), ranks[0]["error"]


def test_the_default_hooks_are_adamw_and_the_cosine_by_samples_schedule():
    cfg = OptimConfig(lr=0.5, warmup_samples=100, weight_decay=0.02, beta1=0.8, beta2=0.95, min_lr_ratio=0.2)
    task = LinearTask()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    default, direct = task.build_optimizer(model, cfg), build_optimizer(task.param_groups(model), cfg)
    assert type(default) is torch.optim.AdamW
    assert default.state_dict()["param_groups"] == direct.state_dict()["param_groups"]
    assert [g["weight_decay"] for g in default.param_groups] == [0.02, 0.0]
    assert [[id(p) for p in g["params"]] for g in default.param_groups] == \
        [[id(p) for p in g["params"]] for g in direct.param_groups]
    for samples in (0, 50, 99, 100, 400, 1000, 5000):
        assert task.learning_rate(samples, 1000, cfg) == learning_rate(samples, 1000, cfg)


@pytest.mark.parametrize("bad", [float("nan"), -0.1, "0.1"])
def test_a_learning_rate_that_is_not_a_finite_non_negative_number_is_refused_with_the_fix(bad):
    from raytrain_spot.loop.step import set_learning_rate
    from raytrain_spot import TaskContractError

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(TaskContractError, match="MyTask.learning_rate returned .* Fix:"):
        set_learning_rate(optimizer, bad, "MyTask")
    assert set_learning_rate(optimizer, torch.tensor(0.25), "MyTask") == 0.25
    assert [g["lr"] for g in optimizer.param_groups] == [0.25]
