"""A fresh node's copies from gs:// come before the group's first collective.

Rank 1 plays a fresh node whose model copy takes longer than the process group's timeout, while
rank 0 has its copy cached. Straight into a collective, rank 0 gives up after
``collective_timeout_s``; with ``localize_before_collectives`` it waits in a barrier bounded by
``startup_timeout_s`` and the first collective succeeds.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_spot.config.schema import Config, TrainerConfig
from raytrain_spot.distributed.collectives import RankGroup
from raytrain_spot.loop.worker import localize_before_collectives

COLLECTIVE_TIMEOUT_S = 2
COPY_S = 5


class SlowCopyOnRank1:
    """A task whose ``localize`` takes COPY_S on rank 1 (an uncached node) and nothing on rank 0."""

    def __init__(self, rank: int):
        self.rank = rank
        self.copied_at = None

    def localize(self, seed: int) -> None:
        if self.rank == 1:
            time.sleep(COPY_S)
        self.copied_at = time.time()


def start_group(rank: int, store: str, results, localize_first: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        group = RankGroup.for_training("cpu")
        task = SlowCopyOnRank1(rank)
        cfg = Config(trainer=TrainerConfig(collective_timeout_s=COLLECTIVE_TIMEOUT_S, startup_timeout_s=60))
        if localize_first:
            localize_before_collectives(task, group, cfg)
        else:
            task.localize(cfg.run.seed)  # the copy where it used to be: after the group's first collective
        placements = group.all_gather_object(rank)
        results[rank] = ("ok", placements)
    except Exception as error:  # noqa: BLE001 - the outcome is what the test compares
        results[rank] = ("failed", type(error).__name__)
    finally:
        dist.destroy_process_group()


def run_group(tmp_path, localize_first: bool) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        processes = [ctx.Process(target=start_group, args=(rank, str(tmp_path / "store"), results, localize_first))
                     for rank in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        return dict(results)


@pytest.mark.slow  # the defect itself, for the record: the test below is the guarantee
def test_a_copy_longer_than_the_collective_timeout_times_out_a_peer_already_in_a_collective(tmp_path):
    results = run_group(tmp_path, localize_first=False)
    assert results[0][0] == "failed"


def test_copies_before_the_first_collective_let_a_slow_fresh_node_join(tmp_path):
    results = run_group(tmp_path, localize_first=True)
    assert results == {0: ("ok", [0, 1]), 1: ("ok", [0, 1])}
