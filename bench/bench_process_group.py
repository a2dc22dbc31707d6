"""How long a worker group's torch process group takes to form when rank 0 comes late.

Ray Train's torch backend has every rank call ``init_process_group`` with rank 0's address at
once, and rank 0 opens the rendezvous store only as it joins: a rank that connects first backs
off. raytrain-spot's backend (raytrain_spot/distributed/process_group.py) has rank 0 open the
store first, then every rank joins through it. Each repeat starts ``--world-size`` processes that
join at one agreed instant, rank 0 ``late_s`` after the others, the one way or the other, and
times the setup from rank 0's arrival to the last rank's return (what remains once rank 0 is
there; the lateness itself is the same both ways). Medians; gloo on loopback.

    python bench/bench_process_group.py      # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LATE_S = [0.0, 0.01, 0.1, 0.3]
WAYS = ["ray", "store-first"]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def join(way: str, rank: int, world_size: int, port: int, at: float, late_s: float, joined, rank_0s_port) -> None:
    """One rank, in its own process: ``joined`` gets when it returned (and, store-first, rank 0's port
    for the parent to hand to the others through ``rank_0s_port``)."""
    import torch.distributed as dist

    from raytrain_spot.distributed.process_group import init_through_store, open_store

    if way == "store-first" and rank == 0:  # the backend's first call, before any rank joins
        _, port = open_store(world_size, timeout_s=60, address=LOOPBACK)
        joined.put(("port", port))
    elif way == "store-first":
        port = rank_0s_port.get(timeout=60)
    time.sleep(max(0.0, at - time.time()) + (late_s if rank == 0 else 0.0))
    if way == "ray":  # Ray's _setup_torch_process_group, with init_method="tcp"
        dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
    else:
        init_through_store("gloo", rank, world_size, LOOPBACK, port, timeout_s=60)
    joined.put((rank, time.time()))
    dist.destroy_process_group()


def measure_once(way: str, world_size: int, late_s: float) -> float:
    context = multiprocessing.get_context("spawn")
    joined, rank_0s_port = context.Queue(), context.Queue()
    at = time.time() + 5.0  # every process is up and imported by then
    port = free_port()
    processes = [context.Process(target=join, args=(way, rank, world_size, port, at, late_s, joined, rank_0s_port))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    returns = []
    while len(returns) < world_size:
        what, value = joined.get(timeout=90)
        if what == "port":
            for _ in range(world_size - 1):
                rank_0s_port.put(value)
        else:
            returns.append(value)
    for process in processes:
        process.join()
    return max(returns) - (at + late_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for late_s in LATE_S:
        for way in WAYS:
            times = [measure_once(way, args.world_size, late_s) for _ in range(args.repeats)]
            results[f"{way} late_s={late_s}"] = round(statistics.median(times), 3)
            print(f"{way:12s} rank 0 late by {late_s:4.2f} s: setup {statistics.median(times):.3f} s after it "
                  f"(median of {args.repeats}; max {max(times):.3f} s)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
