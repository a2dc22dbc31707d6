"""The torch process group of each Ray Train worker group: its store listening before anyone joins.

Ray Train's torch backend has every worker call ``init_process_group`` at once with a ``tcp://``
or ``env://`` address, and rank 0 opens the rendezvous store only as it joins: a worker that
connects before it listens backs off, and the group forms 0.36-0.70 s after a rank 0 that came
10-300 ms late, against 3-5 ms once the store listens first (``python bench/bench_process_group.py``).
``StoreFirstTorchConfig`` is Ray's own extension point (a ``TorchConfig`` whose ``backend_cls`` is
Ray's torch backend with another ``on_start``): rank 0 opens the store, then every rank joins
through it in one call. Shutdown, the device context and everything else stay Ray's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Tuple

import ray
import ray.util
import torch.distributed as dist
from ray.train.torch import TorchConfig

from raytrain_spot._ray import TorchBackend, set_torch_distributed_env_vars

_listening: Optional[dist.TCPStore] = None
"""Rank 0's store, held for its process group's life (the group's own store handle wraps it)."""


def open_store(world_size: int, timeout_s: float, address: Optional[str] = None) -> Tuple[str, int]:
    """Rank 0: a rendezvous store listening on a free port of ``address`` (default: this node's); its address."""
    global _listening
    address = address or ray.util.get_node_ip_address()
    _listening = dist.TCPStore(address, 0, world_size, is_master=True, wait_for_workers=False,
                               timeout=timedelta(seconds=timeout_s))
    return address, _listening.port


def join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                       timeout_s: float) -> None:
    """Every rank: the environment torch's launchers set (``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...,
    which libraries such as Accelerate read), then the default process group through rank 0's store."""
    set_torch_distributed_env_vars()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    if backend == "nccl":  # as Ray's setup: a timed-out NCCL collective raises instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    init_through_store(backend, world_rank, world_size, address, port, timeout_s)


def init_through_store(backend: str, world_rank: int, world_size: int, address: str, port: int,
                       timeout_s: float) -> None:
    """The default process group, through the store rank 0 opened (``open_store``) in this process."""
    timeout = timedelta(seconds=timeout_s)
    store = (_listening if world_rank == 0 else
             dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout))
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class StoreFirstTorchBackend(TorchBackend):
    def on_start(self, worker_group, backend_config: "StoreFirstTorchConfig") -> None:
        address, port = worker_group.execute_single(0, open_store, world_size=len(worker_group),
                                                    timeout_s=backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(
            rank, join_process_group, backend=backend_config.backend, world_rank=rank, world_size=len(worker_group),
            address=address, port=port, timeout_s=backend_config.timeout_s) for rank in range(len(worker_group))])


@dataclass
class StoreFirstTorchConfig(TorchConfig):
    """Ray's ``TorchConfig`` with the store-first setup; ``backend`` is required (gloo or nccl)."""

    def __post_init__(self):
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"StoreFirstTorchConfig sets up gloo or nccl, not {self.backend!r}")

    @property
    def backend_cls(self):
        return StoreFirstTorchBackend
