"""The event log: per-step records go to the event-log actor in batches, in order with the rest; a samples
record is written with its ids packed and read back as they were."""

import os
import random
import time

import pytest
import ray

from raytrain_spot.observe.events import EVENTS_FILE, EventFeed, EventLog, EventWriter, read_events, start_event_log
from raytrain_spot.observe.records import Handoff, Step


@pytest.fixture(scope="module")
def event_actor(tmp_path_factory):
    ray.init(num_cpus=1, include_dashboard=False)
    run_dir = str(tmp_path_factory.mktemp("run"))
    yield start_event_log(run_dir), os.path.join(run_dir, EVENTS_FILE)
    ray.shutdown()


def step_record(step):
    return Step(step=step, world_size=1, samples=[step - 1, step], loss=1.0, lr=0.1, grad_norm=1.0, duration_s=0.1,
                data_s=0.0)


def written(actor, path):
    ray.get(actor.flush.remote())
    return [(e["ev"], e.get("step")) for e in read_events(path)] if os.path.exists(path) else []


def test_step_records_wait_for_the_next_record_sent_at_once_and_arrive_before_it(event_actor):
    actor, path = event_actor
    log = EventLog(actor, batch_s=3600)
    for step in (1, 2, 3):
        log.emit_soon(step_record(step))
    assert written(actor, path) == []
    log.emit(Handoff(reason="regrow", step=3, world_size=1, grow_to=2))
    assert written(actor, path) == [("step", 1), ("step", 2), ("step", 3), ("handoff", 3)]


def test_a_batch_goes_once_its_oldest_record_is_batch_s_old_and_send_empties_it(event_actor):
    actor, path = event_actor
    before = len(written(actor, path))
    log = EventLog(actor, batch_s=0.2)
    log.emit_soon(step_record(10))
    time.sleep(0.3)
    log.emit_soon(step_record(11))
    assert written(actor, path)[before:] == [("step", 10), ("step", 11)]
    log.emit_soon(step_record(12))
    log.send()
    assert written(actor, path)[before:] == [("step", 10), ("step", 11), ("step", 12)]


def test_a_samples_record_is_written_packed_and_read_back_as_the_ids_a_rank_trained_on(tmp_path):
    """Seen: 200k steps of one rank's sample ids made a 299 MB log, each id in decimal digits."""
    rng = random.Random(0)
    row_group = rng.sample(range(4_000_000, 4_004_096), 4_096)  # the rows of one shuffled row group
    ids = row_group[:256] + [row_group[0]]  # a repeated sample must stay visible to the audit
    path = str(tmp_path / EVENTS_FILE)
    writer = EventWriter(path)
    writer.write({"t": 1.0, "ev": "samples", "step": 7, "rank": 1, "ids": ids})
    writer.write({"t": 2.0, "ev": "samples", "step": 8, "rank": 1, "ids": []})
    writer.flush()
    lines = open(path).read().splitlines()
    assert len(lines[0]) < 2.5 * len(ids), f"{len(lines[0])} bytes for {len(ids)} ids"
    records = read_events(path)
    assert [(r["step"], r["rank"], r["ids"]) for r in records] == [(7, 1, sorted(ids)), (8, 1, [])]
    sink = Recording()
    with EventFeed(path, [sink], poll_s=3600):
        pass
    assert [r["ids"] for r in sink.records] == [sorted(ids), []]


def test_a_samples_record_with_garbled_ids_is_skipped_like_a_garbled_line(tmp_path):
    path = tmp_path / EVENTS_FILE
    path.write_text('{"t": 1, "ev": "samples", "step": 1, "rank": 0, "ids_packed": "a"}\n{"t": 2, "ev": "end"}\n')
    assert [r["ev"] for r in read_events(str(path))] == ["end"]


class Recording:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def tick(self):
        pass

    def close(self):
        pass
