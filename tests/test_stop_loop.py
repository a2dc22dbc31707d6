"""A stop asked of the run reaches every rank through the step's agreement, on a plain gloo group:
rank 0 alone hears it (as in a run, loop/stop.py), every rank ends after the same step with the
run's final checkpoint, and a resume goes on from it."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_spot.checkpoint.format import checkpoint_key, read_manifest
from raytrain_spot.checkpoint.manager import CheckpointManager
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.storage.store import LocalStore
from raytrain_spot.distributed.collectives import RankGroup
from raytrain_spot.loop.strategy import SPOT
from raytrain_spot.loop.worker import Phases, run_group
from raytrain_spot.loop.runtime import WorkerRuntime
from tests.conftest import Recorder
from tests.test_loop import NODES, RUN, FaultInjector, LinearTask, config, of


class StopAfter:
    """Rank 0's stop request, there from the moment ``step`` steps have been asked about."""

    def __init__(self, step: int):
        self.step, self.asked = step, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked >= self.step


def _spawned_rank(rank, world_size, init_file, storage, stop_at, max_steps, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        group = RankGroup(torch.device("cpu"))
        cfg = config(max_steps=max_steps)
        events, reports = Recorder(), []
        checkpoints = CheckpointManager(RUN, cfg.to_dict(), None,
                                        [StoreTier("durable", LocalStore(storage), RUN, keep_latest_k=5)],
                                        writes_local=False, events=events, scratch_root=f"{storage}/../scratch-{rank}",
                                        group=group)
        stop = StopAfter(stop_at) if stop_at else (lambda: False)
        faults = FaultInjector(NODES)
        runtime = WorkerRuntime(group, NODES[:world_size], report=reports.append, signals=faults,
                                stop_requested=stop if rank == 0 else (lambda: False))
        policy = SPOT.group_policy(cfg, faults, NODES[:world_size], events.emit, None)
        run_group(cfg, LinearTask(), runtime, policy, checkpoints, events, Phases())
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"events": events.records, "reports": reports}, f, default=str)
    finally:
        dist.destroy_process_group()


def train_group(tmp_path, name: str, world_size: int, stop_at: int, max_steps: int) -> list:
    out = tmp_path / name
    out.mkdir()
    mp.start_processes(_spawned_rank, args=(world_size, str(out / "pg"), str(tmp_path / "durable"), stop_at,
                                            max_steps, str(out)), nprocs=world_size, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def test_a_stop_heard_by_rank_0_ends_every_rank_after_the_same_step_with_a_final_checkpoint(tmp_path):
    ranks = train_group(tmp_path, "stopped", 2, stop_at=4, max_steps=20)
    assert of(ranks[1], "stopped") == [], "rank 0 records the stop"
    assert [e["step"] for e in of(ranks[0], "stopped")] == [4]
    assert max(e["step"] for e in of(ranks[0], "step")) == 4, "no step after the stop"
    assert [r["reports"][-1] for r in ranks] == [4, 4], "every rank joined the report of the stopped step"
    manifest = read_manifest(LocalStore(str(tmp_path / "durable")), checkpoint_key(RUN, 4))
    assert (manifest.kind, manifest.reason) == ("final", "stop")

    resumed = train_group(tmp_path, "resumed", 2, stop_at=0, max_steps=8)
    assert of(resumed[0], "group")[0]["restored_step"] == 4
    assert [e["step"] for e in of(resumed[0], "step")] == [5, 6, 7, 8]
