"""The event log of a long run: the end-of-run summary and the ledger read it in one streaming pass, the live
feed goes on from its saved offset, and the running totals take memory that does not grow with the log."""

import json
import os
import tracemalloc

import pytest

from raytrain_spot.cost.ledger import write_ledger
from raytrain_spot.cost.live import RunningTotals
from raytrain_spot.cost.pricing import PriceCatalog
from raytrain_spot.observe.events import EVENTS_FILE, FEED_STATE_FILE, EventFeed, EventWriter, iter_events
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
    assert os.path.getsize(path) > 1e6
    tracemalloc.start()
    try:
        summary = summarize(path, 0.0, "file:///s")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["steps"] == 5_000 and summary["steps_this_invocation"] == 5_000
    assert peak < 0.5e6, f"{peak / 1e6:.1f} MB to summarize a {os.path.getsize(path) / 1e6:.0f} MB log"


def _run_records(steps: int, first_step: int = 1, t: float = 1_000.0):
    """A session's records: nodes join, steps of 0.5 s, a checkpoint every 10 steps."""
    yield {"t": t, "ev": "start", "run": "r", "min_workers": 1}
    yield {"t": t, "ev": "add", "node": "n1", "node_type": "local-cpu-spot", "pricing": "spot", "gpus": 0}
    for step in range(first_step, first_step + steps):
        t += 0.5
        yield {"t": t, "ev": "step", "step": step, "world_size": 1, "samples": [(step - 1) * 8, step * 8],
               "loss": 1.0, "lr": 1e-3, "duration_s": 0.4 + step % 3 * 0.01}
        if step % 10 == 0:
            yield {"t": t, "ev": "checkpoint", "step": step, "tier": "head", "kind": "periodic", "stall_s": 0.01}
    yield {"t": t + 1, "ev": "kill", "node": "n1", "with_notice": True}


class TotalsSink:
    """A sink that keeps running totals over the whole log, as monitoring and the alerts do."""

    def __init__(self):
        self.totals = RunningTotals(PriceCatalog.load())
        self.records = 0

    def write(self, record):
        self.totals.feed(record)
        self.records += 1

    def tick(self):
        pass

    def close(self):
        pass


def _append(path, records):
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def _whole_log_totals(path):
    totals = RunningTotals(PriceCatalog.load())
    for record in iter_events(str(path)):
        totals.feed(record)
    return totals


def test_a_restarted_feed_goes_on_from_its_saved_offset_with_the_totals_of_the_log_before_it(tmp_path):
    path = tmp_path / EVENTS_FILE
    _append(path, _run_records(30))
    first = TotalsSink()
    with EventFeed(str(path), [first], poll_s=3600):
        pass
    assert first.records == 36
    _append(path, _run_records(25, first_step=21, t=2_000.0))  # the next driver resumes from step 20's checkpoint
    resumed = TotalsSink()
    with EventFeed(str(path), [resumed], poll_s=3600) as feed:
        pass
    assert resumed.records == 30, "the restarted feed read the records before its offset again"
    assert feed.offset == os.path.getsize(path)
    whole = _whole_log_totals(path)
    assert resumed.totals.state() == whole.state()
    assert resumed.totals.completed_steps() == 45 and resumed.totals.redone_steps == 10
    assert resumed.totals.cost_usd(2_020.0) == whole.cost_usd(2_020.0) > 0


@pytest.mark.parametrize("change", ["shorter", "rewritten", "corrupt state"])
def test_a_feed_state_that_does_not_match_the_log_is_ignored_and_the_log_read_from_its_start(tmp_path, change):
    path = tmp_path / EVENTS_FILE
    _append(path, _run_records(30))
    with EventFeed(str(path), [TotalsSink()], poll_s=3600):
        pass
    records = list(iter_events(str(path)))
    if change == "shorter":  # a new log under the same run directory
        path.write_text("".join(json.dumps(r) + "\n" for r in records[:5]))
    elif change == "rewritten":  # as long, other bytes
        path.write_text(path.read_text().replace('"n1"', '"n2"'))
    else:
        (tmp_path / FEED_STATE_FILE).write_text('{"format": 1, "offset": 12')
    sink = TotalsSink()
    with EventFeed(str(path), [sink], poll_s=3600):
        pass
    assert sink.records == len(list(iter_events(str(path))))
    assert sink.totals.state() == _whole_log_totals(path).state()


def test_running_totals_take_memory_that_does_not_grow_with_the_steps():
    """Seen: one duration kept per step, a dict of every step of the run."""
    totals = RunningTotals(PriceCatalog.load())
    tracemalloc.start()
    try:
        for record in _run_records(200_000):
            totals.feed(record)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert totals.completed_steps() == 200_000
    assert totals.productive_s == pytest.approx(sum(0.4 + s % 3 * 0.01 for s in range(1, 200_001)))
    assert peak < 0.2e6, f"{peak / 1e6:.1f} MB for the running totals of 200k steps"


def test_a_redone_step_counts_its_last_execution_and_one_behind_the_latest_checkpoint_its_redo():
    totals = RunningTotals(PriceCatalog.load())
    for record in _run_records(25):  # checkpoints at steps 10 and 20
        totals.feed(record)
    productive = totals.productive_s
    for record in _run_records(10, first_step=21, t=2_000.0):  # steps 21-25 redone from step 20
        totals.feed(record)
    assert totals.redone_steps == 5 and totals.completed_steps() == 30
    assert totals.productive_s == pytest.approx(productive + sum(0.4 + s % 3 * 0.01 for s in range(26, 31)))
    for record in _run_records(5, first_step=16, t=3_000.0):  # step 20's checkpoint unreadable: back to 15
        totals.feed(record)
    assert totals.redone_steps == 10 and totals.completed_steps() == 30
    assert totals.productive_s == pytest.approx(productive + sum(0.4 + s % 3 * 0.01 for s in range(26, 31)))


def test_the_ledger_holds_none_of_the_logs_sample_records(tmp_path):
    """Seen: the ledger loaded the whole log, every rank's sample ids of every step included."""
    peaks = {}
    for sample_ids in (0, 256):
        run_dir = tmp_path / f"ids-{sample_ids}"
        bench.write_log(str(run_dir / EVENTS_FILE), steps=3_000, sample_ids=sample_ids)
        tracemalloc.start()
        try:
            summary = write_ledger(str(run_dir), PriceCatalog.load(), plot=False)
            peaks[sample_ids] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert summary["steps"]["completed"] == 3_000 and summary["samples"] == 3_000 * bench.BATCH
    assert peaks[256] < 1.1 * peaks[0], f"{peaks[256] / 1e6:.1f} MB with sample records, {peaks[0] / 1e6:.1f} without"


def test_the_ledgers_memory_does_not_grow_with_the_runs_length(tmp_path):
    """Seen: 1.5 GB of peak memory for the ledger of a 1M-step log, as the end of every run writes it."""
    bench.write_log(str(tmp_path / EVENTS_FILE), steps=60_000, sample_ids=0, restart_every=20_000)
    tracemalloc.start()
    try:
        summary = write_ledger(str(tmp_path), PriceCatalog.load(), plot=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["steps"] == {"completed": 60_000, "executions": 60_150, "redone": 150}
    assert summary["time_s"]["wasted_progress"] == pytest.approx(150 * 0.5)  # restarts at 20k, 40k and 60k
    assert peak < 8e6, f"{peak / 1e6:.1f} MB for the ledger of a 60k-step log"
