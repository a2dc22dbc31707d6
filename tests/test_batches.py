"""A rank's batches, loaded ahead by loader processes or on the training thread: the same rows in
the same order either way, and with loader processes the collating happens outside the training
process."""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from raytrain_spot.loop.batches import StepBatches, StepRows
from raytrain_spot.loop.sample_order import GlobalSampleOrder, rank_positions
from raytrain_spot import TrainingTask

SEED, GLOBAL_BATCH, MICRO_BATCH = 3, 10, 3


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 37

    def __getitem__(self, index):
        return index


class PidTask(TrainingTask):
    """Collates a micro-batch as its row numbers and the id of the process that collated it."""

    def build_model(self):
        return torch.nn.Linear(1, 1)

    def build_dataset(self, seed):
        return Rows()

    def collate(self, samples):
        return {"rows": torch.tensor(samples), "pid": torch.tensor(os.getpid())}

    def loss(self, model, batch):
        return torch.zeros(len(batch["rows"]))


def batches(workers: int, cursor: int, steps: int, rank: int, world_size: int) -> StepBatches:
    order = GlobalSampleOrder([(0, 20), (20, 37)], SEED)
    rows = StepRows(PidTask(), Rows(), order, cursor, steps, GLOBAL_BATCH, MICRO_BATCH, rank, world_size)
    return StepBatches(rows, workers, torch.device("cpu"), SEED)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_step_gets_the_rows_its_cursor_names_in_order_and_then_none(workers):
    order = GlobalSampleOrder([(0, 20), (20, 37)], SEED)
    cursor, steps, rank, world_size = 30, 6, 1, 3  # crosses an epoch boundary
    with batches(workers, cursor, steps, rank, world_size) as loaded:
        got = [loaded.next() for _ in range(steps)]
        assert loaded.next() is None
    for k, batch in enumerate(got):
        expected = order.rows_at(rank_positions(cursor + k * GLOBAL_BATCH, GLOBAL_BATCH, rank, world_size))
        assert batch.rows == expected
        assert [b["rows"].tolist() for b, _ in batch.micro_batches] == [expected[i:i + MICRO_BATCH]
                                                                        for i in range(0, len(expected), MICRO_BATCH)]
        assert [size for _, size in batch.micro_batches] == [len(b["rows"]) for b, _ in batch.micro_batches]


def test_loader_processes_collate_outside_the_training_process_and_zero_collates_in_it():
    with batches(2, 0, 4, 0, 2) as ahead, batches(0, 0, 4, 0, 2) as inline:
        ahead_pids = {int(b["pid"]) for _ in range(4) for b, _ in ahead.next().micro_batches}
        inline_pids = {int(b["pid"]) for _ in range(4) for b, _ in inline.next().micro_batches}
    assert os.getpid() not in ahead_pids and len(ahead_pids) == 2, "both loader processes, not this one"
    assert inline_pids == {os.getpid()}


def test_closing_stops_the_loader_processes_a_handoff_leaves_behind():
    before = {p.pid for p in psutil.Process().children()}
    loaded = batches(2, 0, 50, 0, 1)
    loaded.next()
    started = [p for p in psutil.Process().children() if p.pid not in before]
    assert len(started) == 2
    loaded.close()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started)
