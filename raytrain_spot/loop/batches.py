"""This rank's batches, loaded ahead of the steps that train them.

The loop asks for the batches of its steps in order, from the cursor it resumed at. With
``trainer.data_workers`` > 0, torch DataLoader worker processes read, process and collate them
(what HF Trainer's ``dataloader_num_workers`` does), up to two steps ahead per worker, while the
training thread computes: an HF processor's image tiling no longer runs on the thread that keeps
the device busy. With 0 the training thread loads each step's batch while the previous step's
agreement all-reduce is in flight.

Loading ahead changes no sample: a step's rows are a function of its cursor alone
(loop/sample_order.py), the loader hands steps back in order, and the cursor advances only when a
step has trained. A handoff drops what was loaded ahead; the next group loads it again from the
checkpoint's cursor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from raytrain_spot.loop.sample_order import GlobalSampleOrder, rank_positions
from raytrain_spot.loop.step import split
from raytrain_spot.loop.task import TrainingTask, move_to

STEPS_AHEAD_PER_WORKER = 2
"""Steps each loader process keeps ready (torch's default prefetch_factor)."""


@dataclass
class Batch:
    """This rank's share of one step."""

    rows: List[int]
    micro_batches: List[tuple]
    """(collated batch on the training device, number of samples) per micro-batch."""
    data_s: float
    """Seconds the training thread spent on it: waiting for the loader and the copy to the device
    (with loader processes, ~0 while they keep ahead)."""


class StepRows(Dataset):
    """Item k: this rank's rows of the k-th step from ``cursor``, collated per micro-batch on the CPU."""

    def __init__(self, task: TrainingTask, dataset, order: GlobalSampleOrder, cursor: int, steps: int,
                 global_batch: int, micro_batch: int, rank: int, world_size: int):
        self.task, self.dataset, self.order = task, dataset, order
        self.cursor, self.steps = cursor, steps
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, k: int) -> Tuple[List[int], List[tuple]]:
        positions = rank_positions(self.cursor + k * self.global_batch, self.global_batch, self.rank, self.world_size)
        rows = self.order.rows_at(positions)
        return rows, [(self.task.collate([self.dataset[row] for row in chunk]), len(chunk))
                      for chunk in split(rows, self.micro_batch)]


def as_loaded(item: Any) -> Any:
    """The loader's collate: a StepRows item is collated already."""
    return item


class StepBatches:
    """This rank's batches of ``steps`` steps from ``cursor``, in order. Close it (it is a context
    manager) to stop its loader processes."""

    def __init__(self, rows: StepRows, workers: int, device: torch.device, seed: int):
        self._device = device
        # Forked, not spawned: a spawned loader process would import torch and the task again and
        # unpickle the dataset at every group start, which a restart would wait for. The loader's
        # own generator: its processes' seeds come from run.seed, not from (and without advancing)
        # the training's random stream.
        loader = DataLoader(rows, batch_size=None, collate_fn=as_loaded, num_workers=workers,
                            prefetch_factor=STEPS_AHEAD_PER_WORKER if workers else None,
                            multiprocessing_context="fork" if workers else None,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
        self._iterator = iter(loader)

    def next(self) -> Optional[Batch]:
        """The next step's batch on the training device; None after the last step."""
        started = time.time()
        item = next(self._iterator, None)
        if item is None:
            return None
        rows, micro_batches = item
        return Batch(rows, [(move_to(batch, self._device), size) for batch, size in micro_batches],
                     time.time() - started)

    def close(self) -> None:
        shutdown = getattr(self._iterator, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "StepBatches":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
