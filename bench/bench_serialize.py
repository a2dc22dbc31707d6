"""What serializing a checkpoint costs one core: ``write_state`` against a plain ``torch.save``.

``write_state`` (raytrain_spot/checkpoint/format.py) computes the file's CRC32C while
``torch.save`` writes it. The checksum takes read-only bytes, so each chunk torch hands over is
copied for it: the way it was first written, a whole tensor at once, and as it is now, 1 MB at a
time (pieces that stay in the CPU's cache). Same state (the timed task's, ``--state-gb``), same
process, a file on this node's disk (not synced); the best of ``--repeats``. With ``--writers N``,
N processes write their own copy at once (``write_state``), as the nodes that stay do at a handoff
when they share one machine, each timed alone.

    python bench/bench_serialize.py --state-gb 0.5                        # ~30 seconds
    python bench/bench_serialize.py --state-gb 2 --writers 2 [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import google_crc32c  # noqa: E402
import torch  # noqa: E402

from raytrain_spot.checkpoint.format import write_state  # noqa: E402
from raytrain_spot.tasks.timed import ModelState  # noqa: E402


class WholeChunkChecksum(io.RawIOBase):
    """The first way: each chunk copied whole into bytes for the checksum."""

    def __init__(self, f):
        self._f, self.crc = f, google_crc32c.Checksum()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self.crc.update(data)
        return self._f.write(data)


def whole_chunk_checksum(state, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, WholeChunkChecksum(f))


def plain(state, path: str) -> None:
    torch.save(state, path)


def write_state_now(state, path: str) -> None:
    write_state(state, path)


def best_s(write, state, directory: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        path = os.path.join(directory, "state.pt")
        started = time.perf_counter()
        write(state, path)
        best = min(best, time.perf_counter() - started)
        os.remove(path)
    return best


def one_writer(state_gb: float, directory: str, repeats: int, started_together, times) -> None:
    torch.set_num_threads(1)
    state = ModelState(state_gb, seed=os.getpid()).state_dict()
    started_together.wait()
    times.put(best_s(write_state_now, state, tempfile.mkdtemp(dir=directory), repeats))


def concurrent_writers(writers: int, state_gb: float, directory: str, repeats: int) -> list:
    context = multiprocessing.get_context("spawn")
    started_together, times = context.Barrier(writers), context.Queue()
    processes = [context.Process(target=one_writer, args=(state_gb, directory, repeats, started_together, times))
                 for _ in range(writers)]
    for process in processes:
        process.start()
    results = sorted(times.get(timeout=600) for _ in processes)
    for process in processes:
        process.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-gb", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=os.path.expanduser("~/.cache"), help="where the files go (a disk)")
    parser.add_argument("--writers", type=int, default=1, help="processes writing their own copy at once")
    args = parser.parse_args()
    if args.writers > 1:
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            times = concurrent_writers(args.writers, args.state_gb, directory, args.repeats)
        print(f"{args.writers} writers at once, write_state of {args.state_gb:g} GB each to {args.dir}: "
              + ", ".join(f"{t:.2f} s" for t in times) + f" (each its best of {args.repeats})")
        return
    torch.set_num_threads(1)
    state = ModelState(args.state_gb, seed=0).state_dict()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for name, write in (("torch.save, no checksum", plain), ("checksum over whole chunks (before)",
                                                                  whole_chunk_checksum),
                            ("write_state, checksum over 1 MB pieces", write_state_now)):
            print(f"{name}: {best_s(write, state, directory, args.repeats):.3f} s for {args.state_gb:g} GB "
                  f"(best of {args.repeats})", flush=True)


if __name__ == "__main__":
    main()
