"""A GPU-like benchmark task: a step that costs device time without burning the shared cores,
and a state of any size that checkpoints and restores like a real model's.

On a GPU the CPU spends a step waiting for the device; here the step waits on a timer
(``micro_batch_s`` per micro-batch), so eight or twelve virtual nodes fit on two cores and a
benchmark measures the framework, not the contention for cores. The state is ``state_gb`` of
real, incompressible tensors (a model's weights, as the checkpoints see them), built at every
start, saved in every checkpoint and loaded at every restore; a small linear classifier is what
trains, so the loss falls and the all-reduce is small, as DDP's is on NVLink next to a step.

    python -m raytrain_spot.run task=timed task.state_gb=2 task.micro_batch_s=0.2
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from raytrain_spot.checkpoint.state import Stateful
from raytrain_spot.config.errors import require, require_non_negative, require_positive
from raytrain_spot.loop.task import TrainingTask

CHUNK_BYTES = 64 << 20
"""The state comes in tensors of at most this size, as a model's comes in layers."""
FEATURES = 32
CLASSES = 4


class LinearlySeparable(torch.utils.data.Dataset):
    """Sample ``i`` is a pure function of (seed, i): features and the class a fixed plane gives them."""

    def __init__(self, seed: int, num_samples: int):
        self.seed, self.num_samples = seed, num_samples
        self.planes = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        features = torch.randn(FEATURES, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + index))
        return features, int((features @ self.planes).argmax())


class ModelState:
    """``gb`` of a model's state as the checkpoint sees it: incompressible tensors of at most
    ``CHUNK_BYTES``, each a pure function of (seed, its index). Not all-reduced (on GPUs its
    gradients' all-reduce is milliseconds of NVLink, on gloo over shared cores it would be the step).

    Drawn when first read, not when built: a restore replaces it unread, as it replaces a GPU
    model's initial weights, whose drawing is device time (milliseconds); here it would be a second
    of the cores per GB in every restart's model build."""

    def __init__(self, gb: float, seed: int):
        self._seed = seed
        remaining = int(gb * 2**30) // 8 * 8
        self._tensors: Dict[str, torch.Tensor] = {}
        while remaining:
            size = min(remaining, CHUNK_BYTES)
            self._tensors[f"{len(self._tensors):05d}"] = torch.empty(size // 8, dtype=torch.int64)
            remaining -= size
        self._undrawn = True

    @property
    def tensors(self) -> Dict[str, torch.Tensor]:
        if self._undrawn:
            self._draw()
        return self._tensors

    def _draw(self) -> None:
        for index, tensor in enumerate(self._tensors.values()):
            generator = torch.Generator().manual_seed(self._seed * 1_000_003 + index)
            # int64 draws fill fastest (about 1 GB/s on one core); the bytes are what counts.
            tensor.random_(-2**62, 2**62, generator=generator)
        self._undrawn = False

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.tensors)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if set(state) != set(self._tensors) or any(state[k].shape != t.shape for k, t in self._tensors.items()):
            raise ValueError(f"the checkpoint's model state has {len(state)} tensors, not the {len(self._tensors)} "
                             "of task.state_gb: resume with the same task.state_gb")
        self._tensors = dict(state)  # the loaded tensors themselves: no second copy of the state
        self._undrawn = False


@dataclass
class TimedStepTask(TrainingTask):
    """A benchmark task shaped like GPU training (see the module's docstring)."""

    state_gb: float = 0.1
    """GiB of model state each rank holds and every checkpoint saves."""
    micro_batch_s: float = 0.05
    """Seconds of (simulated) device time per micro-batch, spent waiting as a CPU waits on a GPU."""
    num_samples: int = 1_000_000
    """Samples in the generated dataset (a run reads each at most once per epoch)."""

    def __post_init__(self):
        require_positive("task", self, "state_gb", "num_samples")
        require_non_negative("task", self, "micro_batch_s")
        require(self.state_gb <= 64, "task.state_gb", f"{self.state_gb} GiB per rank is more than a benchmark needs",
                "set task.state_gb to 64 or less")

    def build_model(self) -> torch.nn.Module:
        self._state = ModelState(self.state_gb, seed=torch.initial_seed())  # seeded by the loop: same on every rank
        return torch.nn.Linear(FEATURES, CLASSES)

    def extra_state(self) -> Dict[str, Stateful]:
        return {"model_state": self._state}

    def build_dataset(self, seed: int) -> LinearlySeparable:
        return LinearlySeparable(seed, self.num_samples)

    def collate(self, samples: Sequence[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])

    def loss(self, model: torch.nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        features, labels = batch
        time.sleep(self.micro_batch_s)
        return F.cross_entropy(model(features), labels, reduction="none")

