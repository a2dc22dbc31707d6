"""Copying the training state into host memory: the only part of a save training waits for.

The state is a nest of dicts/lists holding tensors and plain values (model and optimizer
state dicts, the loop state). ``HostSnapshot`` keeps one host buffer per tensor and reuses it on
every save (pinned memory when the tensor lives on a GPU, so the device-to-host copy runs
at full bandwidth), so a snapshot allocates nothing once the buffers exist.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, List, Optional, Tuple

import torch


class HostSnapshot:
    """Reusable host copies of a state nest. ``take`` returns the copy and how long it took.

    Buffers are matched to tensors by their order in the nest, which is the same on every
    save of the same model and optimizer; all tensors are copied in one batched call, so a
    model with hundreds of small tensors pays little Python overhead per tensor.
    """

    def __init__(self, pin_memory: bool | None = None):
        self._pin_memory = pin_memory
        self._buffers: List[torch.Tensor] = []

    def take(self, state: Any, after: Optional["torch.cuda.Event"] = None) -> Tuple[Any, float]:
        """``after``: copy on a stream of its own once this event has completed, and wait for that
        stream alone. A survivor's snapshot (loop/survivor_commit.py) is taken so while its training
        stream waits on a collective that never completes: the copy must neither queue behind it nor
        wait for it."""
        started = time.perf_counter()
        sources: List[torch.Tensor] = []
        snapshot = self._with_buffers(state, sources)
        if sources:
            on_gpu = any(source.is_cuda for source in sources)
            side = torch.cuda.Stream() if on_gpu and after is not None else None
            with torch.no_grad(), torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                if side is not None:
                    side.wait_event(after)
                torch._foreach_copy_(self._buffers[:len(sources)], sources, non_blocking=True)
            if side is not None:
                side.synchronize()
            elif on_gpu:
                torch.cuda.synchronize()
        return snapshot, time.perf_counter() - started

    def reserve(self, state: Any) -> None:
        """Make (and fault in) the buffers ``state`` needs now, so the first save of a worker
        group stalls for the copy alone, not for the allocation of its memory and its page faults."""
        sources: List[torch.Tensor] = []
        self._with_buffers(state, sources)
        for buffer in self._buffers[:len(sources)]:
            if not buffer.is_pinned():  # pinned memory is resident as allocated
                buffer.view(-1).view(torch.uint8)[::4096].zero_()  # a write per page faults each in

    def _with_buffers(self, value: Any, sources: List[torch.Tensor]) -> Any:
        """The nest with each tensor replaced by its buffer; the tensors go to ``sources``."""
        if isinstance(value, torch.Tensor):
            buffer = self._buffer(len(sources), value)
            sources.append(value)
            return buffer
        if isinstance(value, dict):
            return {k: self._with_buffers(v, sources) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._with_buffers(v, sources) for v in value)
        return value

    def _buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        if index < len(self._buffers):
            buffer = self._buffers[index]
            if buffer.shape == like.shape and buffer.dtype == like.dtype:
                return buffer
        pin = self._pin_memory if self._pin_memory is not None else like.is_cuda
        buffer = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
        if index < len(self._buffers):
            self._buffers[index] = buffer
        else:
            self._buffers.append(buffer)
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)


def tensors_in(state: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a state nest, in the nest's order."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from tensors_in(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from tensors_in(value)
