"""The checkpoint manager on the training device, without Ray: a save taken while training goes on
restores exactly, single-file and sharded.

In one process, a world-size-1 process group (NCCL on CUDA, gloo on the CPU) and the manager as
a rank builds it: the model and AdamW on the device train a few steps, ``CheckpointManager.save``
snapshots them (the only stall) and writes in the background while training continues, then a
fresh model and optimizer on the device restore from it and must equal, bit for bit, what the
snapshot held (every parameter and every optimizer moment), in both formats.

    python bench/gpu_checkpoint.py                       # CUDA when present, else the CPU
    python bench/gpu_checkpoint.py --width 4096 --layers 8
    python bench/gpu_checkpoint.py --device cpu --width 64 --layers 2   # what the tests run

Prints one line per format and a JSON line with every figure last; exits non-zero when a restore
differs from the snapshot or finds no checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest  # noqa: E402
from raytrain_spot.checkpoint.state import LoopState, ModelWeights  # noqa: E402
from raytrain_spot.checkpoint.tiers import StoreTier  # noqa: E402
from raytrain_spot.observe.events import EventLog  # noqa: E402
from raytrain_spot.storage.store import LocalStore  # noqa: E402
from raytrain_spot.distributed.collectives import RankGroup  # noqa: E402

RUN = "gpu-checkpoint"


def init_one_rank_group(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1, device_id=device if device.type == "cuda" else None)


def build(width: int, layers: int, device: torch.device, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train(model, optimizer, steps: int, width: int, device: torch.device) -> None:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(16, width, device=device)).square().mean().backward()
        optimizer.step()


def host_copy(model, optimizer) -> dict:
    return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": {i: {k: v.detach().cpu().clone() for k, v in s.items() if torch.is_tensor(v)}
                          for i, s in optimizer.state_dict()["state"].items()}}


def differences(expected: dict, model, optimizer) -> list:
    got = host_copy(model, optimizer)
    wrong = [f"model.{k}" for k, v in expected["model"].items() if not torch.equal(v, got["model"][k])]
    for index, state in expected["optimizer"].items():
        wrong += [f"optimizer.{index}.{k}" for k, v in state.items() if not torch.equal(v, got["optimizer"][index][k])]
    return wrong


def check_format(sharded: bool, args, group: RankGroup, scratch: str) -> dict:
    name = "sharded" if sharded else "single-file"
    root = os.path.join(scratch, name)
    local = StoreTier("local", LocalStore(os.path.join(root, "local")), RUN, 2)
    durable = StoreTier("durable", LocalStore(os.path.join(root, "durable")), RUN, 2)
    device = group.device
    manager = CheckpointManager(RUN, {"run": {"name": RUN}}, local, [durable], writes_local=True, events=EventLog(),
                                scratch_root=os.path.join(root, "scratch"), sharded=sharded, group=group)
    model, optimizer = build(args.width, args.layers, device, seed=0)
    train(model, optimizer, 3, args.width, device)
    expected = host_copy(model, optimizer)
    started = time.perf_counter()
    stall_s = manager.save({"model": ModelWeights(model), "optimizer": optimizer},
                           SaveRequest(LoopState(3, 48), 1, "periodic"), writer=True)
    train(model, optimizer, args.steps_during_save, args.width, device)  # training goes on during the write
    if device.type == "cuda":
        torch.cuda.synchronize()
    manager.wait()
    save_s = time.perf_counter() - started
    fresh, fresh_optimizer = build(args.width, args.layers, device, seed=1)
    train(fresh, fresh_optimizer, 1, args.width, device)  # optimizer state to overwrite
    started = time.perf_counter()
    restored = manager.restore({"model": ModelWeights(fresh), "optimizer": fresh_optimizer}, rank=0)
    restore_s = time.perf_counter() - started
    wrong = ["no checkpoint restored"] if restored is None else differences(expected, fresh, fresh_optimizer)
    figures = {"format": name, "stall_s": round(stall_s, 4), "save_s": round(save_s, 3),
               "restore_s": round(restore_s, 3), "restored_step": restored.loop.step if restored else None,
               "exact": not wrong, "differences": wrong[:5]}
    print(f"{name}: stall {stall_s * 1e3:.1f} ms, save {save_s:.2f} s while training {args.steps_during_save} "
          f"steps, restore {restore_s:.2f} s: {'exact' if not wrong else 'DIFFERS: ' + ', '.join(wrong[:5])}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_checkpoint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--width", type=int, default=2048, help="width of each linear layer (default %(default)s)")
    parser.add_argument("--layers", type=int, default=8, help="linear layers (default %(default)s)")
    parser.add_argument("--steps-during-save", type=int, default=5,
                        help="train steps taken while the save writes (default %(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())
    init_one_rank_group(device)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-checkpoint-") as scratch:
            group = RankGroup.for_training(device)  # object collectives on gloo, as a rank's
            results = [check_format(sharded, args, group, scratch) for sharded in (False, True)]
    finally:
        dist.destroy_process_group()
    print(json.dumps({"device": str(device), "torch": torch.__version__, "width": args.width,
                      "layers": args.layers, "formats": results}))
    return 0 if all(r["exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
