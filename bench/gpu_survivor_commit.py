"""A survivor's commit on the device while its training stream is blocked (loop/survivor_commit.py).

When a peer loses power, a surviving rank's training stream waits on an NCCL collective that never
completes; its state must still be copied out. One GPU cannot form a two-rank NCCL group, so the
blocked collective is stood in for by a kernel that spins on the training stream for
``--blocked-s`` seconds, enqueued after the optimizer step, as the next step's all-reduce is. The
real ``SurvivorCommit`` then snapshots from a thread (on a stream of its own, after the step's
event) and commits to a local tier. Checked: the commit ends while the training stream is still
busy, and the committed state is the state of the step, bit for bit.

    python bench/gpu_survivor_commit.py                           # CUDA when present
    python bench/gpu_survivor_commit.py --device cpu --width 64   # the CPU (what the tests run)

Prints a JSON line with the figures last; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raytrain_spot.checkpoint.format import (STATE_FILE, checkpoint_key, load_state, read_manifest,  # noqa: E402
                                             stored_key)
from raytrain_spot.checkpoint.manager import CheckpointManager  # noqa: E402
from raytrain_spot.checkpoint.state import LoopState, ModelWeights  # noqa: E402
from raytrain_spot.checkpoint.tiers import StoreTier  # noqa: E402
from raytrain_spot.loop.survivor_commit import RecordReplay, StepGuard, SurvivorCommit  # noqa: E402
from raytrain_spot.observe.events import EventLog  # noqa: E402
from raytrain_spot.storage.store import LocalStore  # noqa: E402

RUN = "survivor-commit"
SPIN_CYCLES_PER_S = 2e9  # above any GPU's clock: the spin lasts at least --blocked-s


def main() -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_survivor_commit.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=4096, help="hidden width of the MLP (default %(default)s)")
    parser.add_argument("--layers", type=int, default=8, help="layers (default %(default)s)")
    parser.add_argument("--blocked-s", type=float, default=20.0,
                        help="how long the training stream stays blocked (default %(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    parts = {"model": ModelWeights(model), "optimizer": optimizer}
    loop = LoopState()
    guard = StepGuard(device)
    for _ in range(2):
        model(torch.randn(16, args.width, device=device)).square().mean().backward()
        with guard.moving():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            loop.samples_seen += 16
    expected = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
    if device.type == "cuda":
        torch.cuda._sleep(int(args.blocked_s * SPIN_CYCLES_PER_S))  # the collective that never completes

    marks = {}
    with tempfile.TemporaryDirectory() as storage:
        tier = StoreTier("durable", LocalStore(storage), RUN, keep_latest_k=2)
        checkpoints = CheckpointManager(RUN, {}, None, [tier], writes_local=False, events=EventLog(),
                                        scratch_root=os.path.join(storage, "scratch"))
        commit = SurvivorCommit(checkpoints, parts, loop, guard, ["survivor", "lost"], rank=0,
                                mark=lambda rank, status: marks.update({rank: status}), events=EventLog(),
                                replay=RecordReplay(None, 16, 2, EventLog(), sample_ids=False))
        started = time.perf_counter()
        thread = threading.Thread(target=commit, args=({"lost"},), daemon=True)
        thread.start()
        thread.join(timeout=max(args.blocked_s / 2, 5.0))
        commit_s = time.perf_counter() - started
        still_blocked = device.type == "cuda" and not torch.cuda.current_stream(device).query()
        store = LocalStore(storage)
        key = checkpoint_key(RUN, loop.step)
        committed = not thread.is_alive() and marks.get(0) == f"committed:{loop.step}"
        matches = False
        if committed:
            manifest = read_manifest(store, key)
            state = load_state(store.local_path(stored_key(key, STATE_FILE, manifest.files[STATE_FILE])))
            matches = all(torch.equal(state["model"][name], value) for name, value in expected.items())
    state_gb = sum(v.numel() * v.element_size() for v in expected.values()) / 1e9
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "state_gb_model": round(state_gb, 3), "commit_s": round(commit_s, 3), "committed": committed,
               "training_stream_still_blocked": still_blocked, "state_matches": matches, "marks": marks}
    print(f"survivor commit of step {loop.step} ({state_gb:.2f} GB of weights, with AdamW's moments): "
          f"{commit_s:.2f} s, committed={committed}, state matches={matches}, "
          f"training stream still blocked={still_blocked if device.type == 'cuda' else 'n/a (CPU)'}")
    print(json.dumps(figures))
    if device.type == "cuda":
        torch.cuda.synchronize()  # let the spin end before the process does
    dist.destroy_process_group()
    ok = committed and matches and (still_blocked or device.type != "cuda")
    if not ok:
        print("FAIL: the survivor's commit did not end, or not with the step's state, while the stream was blocked",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
