"""The event log of a long run: its size, and what the end-of-run summary costs.

Writes the ``events.jsonl`` of an N-step run (default 1M) through the run's own writer, with the
records a run makes per step (``step``, and with ``--sample-ids`` one rank's ``samples`` record
of the ids it trained on, as ``run.log_sample_ids=true`` makes), a periodic checkpoint every 100
steps, a restart every 100k steps that redoes 50 steps. Then it times ``summarize`` (the main
command's end-of-run summary) and ``write_ledger`` (the goodput and cost ledger, without its
plot) each in a fresh process and reads that process's peak resident memory (``*_peak_rss_mb``,
the interpreter's own ~20 MB and its imports included).

    python bench/bench_event_log.py                       # 1M steps
    python bench/bench_event_log.py --steps 20000 --sample-ids 64

Prints one JSON line: ``steps``, ``file_mb``, ``write_s``, ``summary_s``, ``summary_peak_rss_mb``,
``ledger_s``, ``ledger_peak_rss_mb``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raytrain_spot.observe.events import EVENTS_FILE, EventWriter  # noqa: E402
from raytrain_spot.observe.records import Checkpoint, End, Group, Samples, Start, Step, to_line  # noqa: E402

BATCH = 64
# Each runs in a process of its own, so its peak RSS is its own alone.
SUMMARIZE = """
import json, resource, sys, time
from raytrain_spot.observe.progress import summarize
started = time.perf_counter()
summary = summarize(sys.argv[1], 0.0, "file:///bench")
print(json.dumps({"summary_s": time.perf_counter() - started, "steps": summary["steps"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
LEDGER = """
import json, os, resource, sys, time
from raytrain_spot.cost.ledger import write_ledger
started = time.perf_counter()
summary = write_ledger(os.path.dirname(sys.argv[1]), plot=False)
print(json.dumps({"ledger_s": time.perf_counter() - started, "steps": summary["steps"]["completed"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_log(path: str, steps: int, sample_ids: int, restart_every: int = 100_000, redo: int = 50) -> None:
    """A run's records, as the driver's event writer appends them."""
    writer = EventWriter(path)
    rng = random.Random(0)
    t = 1_000.0
    nodes = [f"node-{rank}" for rank in range(4)]
    writer.write(to_line(Start(run="bench", strategy="spot", embedded=True, dataset=None, min_workers=4,
                               max_workers=4), t))
    step = 0
    restarted_at = set()  # each restart once: the redone steps reach the same step again
    while step < steps:
        step += 1
        t += 0.5
        if step % restart_every == 0 and step > redo and step not in restarted_at:
            restarted_at.add(step)
            writer.write(to_line(Group(world_size=4, step=step - redo, restored_step=step - redo, startup_s={},
                                       nodes=nodes), t))
            step -= redo
        writer.write(to_line(Step(step=step, world_size=4, samples=[(step - 1) * BATCH, step * BATCH],
                                  loss=2.0 / (1 + step / 1e4), lr=3e-4, grad_norm=1.0, duration_s=0.5, data_s=0.01), t))
        if sample_ids:
            writer.write(to_line(Samples(step=step, rank=0,
                                         ids=[rng.randrange(10_000_000) for _ in range(sample_ids)]), t))
        if step % 100 == 0:
            writer.write(to_line(Checkpoint(step=step, tier="head", kind="periodic", stall_s=0.01, duration_s=1.0,
                                            bytes=1 << 20), t))
    writer.write(to_line(End(status="finished", error=None), t))
    writer.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--sample-ids", type=int, default=BATCH // 4,
                        help="ids per samples record (one rank's share of a 64-sample batch on 4 ranks); 0: none")
    parser.add_argument("--dir", default=None, help="where to write the log (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-event-log-", dir=args.dir) as workdir:
        path = os.path.join(workdir, EVENTS_FILE)
        started = time.perf_counter()
        write_log(path, args.steps, args.sample_ids)
        write_s = time.perf_counter() - started
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        summary, ledger = (json.loads(subprocess.run([sys.executable, "-c", script, path], capture_output=True,
                                                     text=True, check=True, cwd=root).stdout)
                           for script in (SUMMARIZE, LEDGER))
        assert summary["steps"] == ledger["steps"] == args.steps, (summary, ledger)
        print(json.dumps({"steps": args.steps, "sample_ids": args.sample_ids,
                          "file_mb": round(os.path.getsize(path) / 1e6, 1), "write_s": round(write_s, 1),
                          "summary_s": round(summary["summary_s"], 2),
                          "summary_peak_rss_mb": round(summary["peak_rss_mb"], 1),
                          "ledger_s": round(ledger["ledger_s"], 2),
                          "ledger_peak_rss_mb": round(ledger["peak_rss_mb"], 1)}))


if __name__ == "__main__":
    main()
