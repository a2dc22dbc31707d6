"""The end-of-run summary reads the event log in one streaming pass: its memory does not grow with the log."""

import os
import tracemalloc

from raytrain_spot.observe.events import EventWriter
from raytrain_spot.observe.progress import summarize
from tests.conftest import load_bench

bench = load_bench("bench_event_log")


def test_the_summary_of_a_run_with_restarts_counts_each_step_once(tmp_path):
    path = str(tmp_path / "events.jsonl")
    writer = EventWriter(path)
    writer.write({"t": 5.0, "ev": "step", "step": 99, "world_size": 8, "samples": [0, 8], "loss": 9.0})  # before
    t = 10.0
    for step in [*range(1, 11), *range(6, 16), *range(3, 5)]:  # two restarts: steps 6-10 and 3-4 redone
        t += 1
        writer.write({"t": t, "ev": "step", "step": step, "world_size": 2 if step > 10 else 4,
                      "samples": [(step - 1) * 8, step * 8], "loss": 1.0 / step})
        if step % 5 == 0:
            writer.write({"t": t, "ev": "checkpoint", "step": step, "tier": "durable" if step == 10 else "head"})
    writer.write({"t": t, "ev": "checkpoint_failed", "step": 15})
    writer.flush()
    summary = summarize(path, since=10.0, storage="file:///s")
    assert summary["steps"] == 4 and summary["steps_this_invocation"] == 15
    assert summary["first_loss"] == 1.0 and summary["final_loss"] == 0.25 and summary["samples"] == 32
    assert summary["world_sizes"] == [2, 4]
    assert summary["checkpoints_written"] == 3 and summary["latest_checkpoint_step"] == 15
    assert summary["durable_checkpoint_step"] == 10 and summary["failed_saves"] == 1


def test_summarizing_a_long_log_takes_memory_that_does_not_grow_with_it(tmp_path):
    """Seen: 200k steps of one rank's sample records, a 299 MB log, 1.5 GB to summarize."""
    path = str(tmp_path / "events.jsonl")
    bench.write_log(path, steps=5_000, sample_ids=16)
    assert os.path.getsize(path) > 1.5e6
    tracemalloc.start()
    try:
        summary = summarize(path, 0.0, "file:///s")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["steps"] == 5_000 and summary["steps_this_invocation"] == 5_000
    assert peak < 0.5e6, f"{peak / 1e6:.1f} MB to summarize a {os.path.getsize(path) / 1e6:.0f} MB log"
