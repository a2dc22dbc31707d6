"""Every collective of the training loop, each on the device its process group needs.

The training process group is NCCL on GPUs, and NCCL takes CUDA tensors only (a CPU tensor
fails at the first step, a hang or an error far from its cause). So:

* tensors the ranks reduce go through the training group and must live on the training
  device; ``RankGroup`` checks that on every call and names the tensor's device and the fix;
* Python objects (placements, restore listings, a checkpoint shipped to a rank that has none)
  go through a gloo group of the same ranks: torch's object collectives on NCCL would pickle
  them through GPU memory, a whole checkpoint at a time.

The sharded checkpoint's background saves use a gloo group of their own (checkpoint/manager.py).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist


class CollectiveDeviceError(RuntimeError):
    """A tensor reached a collective on a device its process group cannot use."""


class RankGroup:
    """The worker group's collectives: tensors on ``device`` through the training process
    group, Python objects through ``objects_group`` (None: the training group, which is gloo)."""

    def __init__(self, device: torch.device, objects_group: Optional[dist.ProcessGroup] = None):
        self.device = torch.device(device)
        self._objects_group = objects_group

    @classmethod
    def for_training(cls, device: torch.device) -> "RankGroup":
        """Collective: every rank calls it once after the training group exists."""
        objects_group = None if dist.get_backend() == dist.Backend.GLOO else dist.new_group(backend="gloo")
        return cls(device, objects_group)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place and return it."""
        self.start_all_reduce_sum(tensor).wait()
        return tensor

    def start_all_reduce_sum(self, tensor: torch.Tensor) -> dist.Work:
        """Start summing ``tensor`` over ranks in place; it holds the sum once the returned work's ``wait()`` returns."""
        if tensor.device != self.device:
            raise CollectiveDeviceError(
                f"all_reduce of a tensor on {tensor.device}: the training process group "
                f"({dist.get_backend()}) reduces tensors on the training device {self.device}; "
                f"create it with device={self.device!s}")
        return dist.all_reduce(tensor, async_op=True)

    def wait_for_all(self, timeout_s: float) -> None:
        """Every rank reaches this point within ``timeout_s`` of the first (a gloo barrier with its own
        timeout, not the process group's), or every rank raises naming the ones that did not."""
        dist.monitored_barrier(group=self._objects_group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)

    def all_gather_object(self, obj: Any) -> List[Any]:
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self._objects_group)
        return gathered

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``obj`` from rank ``src`` on every rank (the other ranks' ``obj`` is ignored)."""
        shipped = [obj]
        dist.broadcast_object_list(shipped, src=src, group=self._objects_group)
        return shipped[0]

    def broadcast_state(self, state: Any, src: int) -> Any:
        """A nest of CPU tensors and plain values from rank ``src`` on every rank: the structure as
        an object, then each tensor as itself (one pickled object of a multi-GB state would hold
        further whole copies of it in memory on both sides)."""
        sent = _map_tensors(state, torch.Tensor.contiguous) if self.rank == src else None
        specs = self.broadcast_object(_map_tensors(sent, lambda t: _TensorSpec(t.shape, t.dtype)), src)
        received = sent if self.rank == src else _map_tensors(specs, None)
        _map_tensors(received, lambda tensor: dist.broadcast(tensor, src=src, group=self._objects_group))
        return received


class _TensorSpec:
    """A tensor's place in a nest being shipped: its shape and dtype."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype


def _map_tensors(value: Any, convert) -> Any:
    """``value`` with each tensor replaced by ``convert(tensor)`` (in the nest's order, the same on
    every rank), or (``convert`` None) each ``_TensorSpec`` by an empty tensor of its shape and dtype."""
    if convert is not None and isinstance(value, torch.Tensor):
        return convert(value)
    if convert is None and isinstance(value, _TensorSpec):
        return torch.empty(value.shape, dtype=value.dtype)
    if isinstance(value, dict):
        return {k: _map_tensors(v, convert) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, convert) for v in value)
    return value
