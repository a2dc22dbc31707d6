"""Gradient accumulation and DDP give the update of one large batch; the loss falls."""


import gc

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_spot.config.schema import OptimConfig
from raytrain_spot.tasks.vlm.config import CaptionDataConfig, ModelConfig
from raytrain_spot.tasks.vlm.task import VisionLanguageTask
from raytrain_spot.tasks.vlm.parquet import ImageCaptionDataset, ensure_dataset
from raytrain_spot.loop.sample_order import GlobalSampleOrder, rank_positions
from raytrain_spot.loop.optim import build_optimizer, learning_rate
from raytrain_spot.loop.step import split, train_step

MODEL = ModelConfig(vision_layers=1, text_layers=1, dropout=0.0)
TASK = VisionLanguageTask(model=MODEL)


def _sgd(model):
    # Plain SGD: the update is linear in the gradient, so it exposes any difference in it.
    # (Adam's first step is ~lr*sign(g) and would amplify float noise in near-zero gradients.)
    return torch.optim.SGD(model.parameters(), lr=0.5)


def _model(seed=0):
    torch.manual_seed(seed)
    return TASK.build_model()


def _micro_batches(dataset_path, indices, size):
    dataset = ImageCaptionDataset(dataset_path, 32, 2)
    return [(TASK.collate([dataset[i] for i in chunk]), len(chunk)) for chunk in split(indices, size)]


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    return ensure_dataset(CaptionDataConfig(cache_dir=str(tmp_path_factory.mktemp("data")), num_samples=512,
                                     shard_size=256, row_group_size=64), seed=0)


def _one_big_batch_update(dataset_path, indices, grad_clip):
    model = _model()
    optimizer = _sgd(model)
    train_step(model, optimizer, _micro_batches(dataset_path, indices, len(indices)), TASK.loss,
               loss_scale=1 / len(indices), grad_clip=grad_clip)
    return model


@pytest.mark.parametrize("micro_batch_size", [1, 3, 5])
def test_accumulation_matches_one_large_batch(dataset_path, micro_batch_size):
    indices = list(range(10))
    reference = _one_big_batch_update(dataset_path, indices, grad_clip=0.5)
    model = _model()
    optimizer = _sgd(model)
    train_step(model, optimizer, _micro_batches(dataset_path, indices, micro_batch_size), TASK.loss,
               loss_scale=1 / len(indices), grad_clip=0.5)
    before = _model()
    for (name, p), ref, untouched in zip(model.named_parameters(), reference.parameters(), before.parameters()):
        assert not torch.equal(ref, untouched), f"{name} did not move: the check would be vacuous"
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


def _ddp_worker(rank, world_size, init_file, dataset_path, indices, micro_batch_size, result_path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    optimizer = _sgd(model.module)
    mine = [indices[p] for p in rank_positions(0, len(indices), rank, world_size)]
    train_step(model, optimizer, _micro_batches(dataset_path, mine, micro_batch_size), TASK.loss,
               loss_scale=world_size / len(indices), grad_clip=0.5)
    if rank == 0:
        torch.save(model.module.state_dict(), result_path)
    # DDP's reducer keeps the gloo process group alive past destroy_process_group, so its worker
    # thread could drop the last all-reduce (which holds a Python object) while the interpreter
    # finalizes: the thread dies taking the GIL and the process aborts ("terminate called without an
    # active exception", 1 run in 8 here). Without other owners, destroying the group joins the thread.
    del model, optimizer
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size, micro_batch_size", [(2, 2), (3, 2), (4, 1)])
def test_ddp_with_uneven_shards_matches_one_large_batch(dataset_path, tmp_path, world_size, micro_batch_size):
    indices = list(range(10))  # 10 samples over 3 or 4 ranks: shards of different sizes
    result = tmp_path / "rank0.pt"
    mp.start_processes(_ddp_worker, args=(world_size, str(tmp_path / "init"), dataset_path, indices,
                                          micro_batch_size, str(result)),
                       nprocs=world_size, start_method="spawn")
    reference = _one_big_batch_update(dataset_path, indices, grad_clip=0.5).state_dict()
    trained = torch.load(result, weights_only=True)
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


def test_learning_rate_depends_on_samples_only():
    cfg = OptimConfig(lr=1.0, warmup_samples=100, min_lr_ratio=0.1)
    assert learning_rate(0, 1000, cfg) == pytest.approx(0.01)
    assert learning_rate(99, 1000, cfg) == pytest.approx(1.0)
    assert learning_rate(1000, 1000, cfg) == pytest.approx(0.1)
    middle = learning_rate(550, 1000, cfg)
    assert middle == pytest.approx(0.55)


def test_loss_falls_clearly_on_generated_data(dataset_path):
    dataset = ImageCaptionDataset(dataset_path, 32, 2)
    order = GlobalSampleOrder(dataset.row_group_spans(), seed=0)
    model = _model()
    optim_cfg = OptimConfig(lr=3e-3, warmup_samples=256)
    optimizer = build_optimizer(TASK.param_groups(model), optim_cfg)
    batch, steps, losses = 32, 60, []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step * batch, steps * batch, optim_cfg)
        rows = order.rows_at(rank_positions(step * batch, batch, 0, 1))
        micro_batches = [(TASK.collate([dataset[row] for row in rows]), batch)]
        losses.append(train_step(model, optimizer, micro_batches, TASK.loss, 1 / batch, 1.0) / batch)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.45 * first, f"loss went {first:.3f} -> {last:.3f}"
