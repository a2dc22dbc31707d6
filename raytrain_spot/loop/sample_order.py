"""World-size-independent data order.

Training consumes one global stream of positions 0, 1, 2, ...; position p of epoch
e = p // N is a row of the dataset chosen by a per-epoch shuffle (row groups in random
order, rows shuffled within each group, so reads stay local). A step takes the next
``global_batch_size`` positions and rank r of W takes every W-th of them starting at r.
The only state is the cursor (positions consumed), so a resume at any world size
continues at the exact next sample: none skipped, none repeated.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np


class GlobalSampleOrder:
    def __init__(self, row_group_spans: Sequence[Tuple[int, int]], seed: int):
        self._spans = list(row_group_spans)
        self.num_samples = self._spans[-1][1] if self._spans else 0
        self._seed = seed
        self._epochs: Dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            rng = np.random.default_rng([self._seed, epoch])
            order = [rng.permutation(np.arange(*self._spans[g])) for g in rng.permutation(len(self._spans))]
            if len(self._epochs) >= 2:  # a step spans at most two epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = np.concatenate(order)
        return self._epochs[epoch]

    def rows_at(self, positions: np.ndarray) -> List[int]:
        epochs, offsets = np.divmod(positions, self.num_samples)
        return [int(self.epoch_order(int(e))[o]) for e, o in zip(epochs, offsets)]


def rank_positions(cursor: int, global_batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """The positions rank ``rank`` trains on in the step that starts at ``cursor``."""
    return np.arange(cursor + rank, cursor + global_batch_size, world_size, dtype=np.int64)
