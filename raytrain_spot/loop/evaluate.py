"""Evaluation: the task's evaluation set, every ``eval.every_steps`` and at the run's end.

Every rank evaluates every ``world_size``-th sample (rank r takes r, r + world_size, ...), so each
sample counts once at any world size, and the ranks sum the per-sample losses and counts in one
all-reduce per micro-batch round. The same all-reduce carries whether any rank has heard of a
notice: then the evaluation stops there, unlogged, and the loop goes on to its next step, whose
agreement hands off. Then rank 0 asks the task for a few examples as text (``eval_examples``: an HF
VLM's captions of fixed images). Nothing of it is checkpointed: an evaluation is a read of the weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from raytrain_spot.distributed.collectives import RankGroup
from raytrain_spot.loop.step import split
from raytrain_spot.loop.task import MapDataset, TrainingTask, move_to, per_sample_loss

_LOSS, _COUNT, _INTERRUPTED = range(3)


class Evaluation:
    """One group's evaluations of the task's evaluation set (None: never)."""

    def __init__(self, task: TrainingTask, dataset: Optional[MapDataset], every_steps: int, micro_batch_size: int,
                 group: RankGroup, leaving_ranks: Callable[[int], List[int]],
                 autocast_dtype: Optional[torch.dtype] = None):
        self._task = task
        self._dataset = dataset if every_steps > 0 else None
        self._every_steps = every_steps
        self._micro_batch_size = micro_batch_size
        self._group = group
        self._leaving_ranks = leaving_ranks
        self._autocast_dtype = autocast_dtype

    def due(self, step: int) -> bool:
        return self._dataset is not None and step % self._every_steps == 0

    def run(self, model: torch.nn.Module, step: int) -> Optional["EvalResult"]:
        """Collective: the mean per-sample loss over the whole set at ``step``, or None where a notice
        stopped it (or there is no set)."""
        if self._dataset is None:
            return None
        started = time.time()
        rank, world_size = self._group.rank, self._group.world_size
        size = len(self._dataset)
        chunks = split(list(range(rank, size, world_size)), self._micro_batch_size)
        rounds = math.ceil(math.ceil(size / world_size) / self._micro_batch_size)  # rank 0's count: the most
        totals = torch.zeros(3, dtype=torch.float64, device=self._group.device)
        autocast = (torch.autocast(self._group.device.type, dtype=self._autocast_dtype) if self._autocast_dtype
                    else contextlib.nullcontext())
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast:
                for round_index in range(rounds):
                    local = torch.zeros(3, dtype=torch.float64, device=self._group.device)
                    if round_index < len(chunks):
                        chunk = chunks[round_index]
                        batch = move_to(self._task.collate([self._dataset[row] for row in chunk]), self._group.device)
                        losses = per_sample_loss(self._task.eval_loss(model, batch), len(chunk))
                        local[_LOSS], local[_COUNT] = losses.double().sum(), len(chunk)
                    local[_INTERRUPTED] = float(bool(self._leaving_ranks(step)))
                    summed = self._group.all_reduce_sum(local)
                    if summed[_INTERRUPTED] > 0:
                        return None
                    totals += summed
            examples = self._examples(model) if rank == 0 else []
        finally:
            model.train(was_training)
        return EvalResult(step, float(totals[_LOSS] / totals[_COUNT]), int(totals[_COUNT]), time.time() - started,
                          examples)

    def _examples(self, model: torch.nn.Module) -> List[Dict[str, str]]:
        unwrapped = model.module if isinstance(model, DistributedDataParallel) else model
        return self._task.eval_examples(unwrapped, self._dataset, self._group.device)


@dataclass(frozen=True)
class EvalResult:
    step: int
    loss: float
    """Mean per-sample loss over the evaluation set."""
    samples: int
    """Samples evaluated: the set's size, each counted once."""
    duration_s: float
    examples: List[Dict[str, str]]
    """Rank 0's: the task's ``eval_examples`` (others: none)."""
