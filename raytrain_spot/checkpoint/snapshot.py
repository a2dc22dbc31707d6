"""Copying the training state into host memory: the only part of a save training waits for.

The state is a nest of dicts/lists holding tensors and plain values (model and optimizer
state dicts, progress). ``HostSnapshot`` keeps one host buffer per tensor and reuses it on
every save (pinned memory when the tensor lives on a GPU, so the device-to-host copy runs
at full bandwidth), so a snapshot allocates nothing once the buffers exist.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

import torch


class HostSnapshot:
    """Reusable host copies of a state nest. ``take`` returns the copy and how long it took."""

    def __init__(self, pin_memory: bool | None = None):
        self._pin_memory = pin_memory
        self._buffers: Dict[str, torch.Tensor] = {}

    def take(self, state: Any) -> Tuple[Any, float]:
        started = time.perf_counter()
        copies: List[Tuple[torch.Tensor, torch.Tensor]] = []
        snapshot = self._copy(state, "", copies)
        if any(source.is_cuda for source, _ in copies):
            torch.cuda.synchronize()
        return snapshot, time.perf_counter() - started

    def _copy(self, value: Any, path: str, copies: List) -> Any:
        if isinstance(value, torch.Tensor):
            buffer = self._buffer(path, value)
            buffer.copy_(value.detach(), non_blocking=value.is_cuda)
            copies.append((value, buffer))
            return buffer
        if isinstance(value, dict):
            return {k: self._copy(v, f"{path}/{k}", copies) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(v, f"{path}/{i}", copies) for i, v in enumerate(value))
        return value

    def _buffer(self, path: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            pin = self._pin_memory if self._pin_memory is not None else like.is_cuda
            buffer = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buffer
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
