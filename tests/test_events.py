"""The event log's per-step records go to the event-log actor in batches, in order with the rest."""

import os
import time

import pytest
import ray

from raytrain_spot.observe.events import EVENTS_FILE, EventLog, read_events, start_event_log


@pytest.fixture(scope="module")
def event_actor(tmp_path_factory):
    ray.init(num_cpus=1, include_dashboard=False)
    run_dir = str(tmp_path_factory.mktemp("run"))
    yield start_event_log(run_dir), os.path.join(run_dir, EVENTS_FILE)
    ray.shutdown()


def written(actor, path):
    ray.get(actor.flush.remote())
    return [(e["ev"], e.get("step")) for e in read_events(path)] if os.path.exists(path) else []


def test_step_records_wait_for_the_next_record_sent_at_once_and_arrive_before_it(event_actor):
    actor, path = event_actor
    log = EventLog(actor, batch_s=3600)
    for step in (1, 2, 3):
        log.emit_soon("step", step=step)
    assert written(actor, path) == []
    log.emit("handoff", step=3)
    assert written(actor, path) == [("step", 1), ("step", 2), ("step", 3), ("handoff", 3)]


def test_a_batch_goes_once_its_oldest_record_is_batch_s_old_and_send_empties_it(event_actor):
    actor, path = event_actor
    before = len(written(actor, path))
    log = EventLog(actor, batch_s=0.2)
    log.emit_soon("step", step=10)
    time.sleep(0.3)
    log.emit_soon("step", step=11)
    assert written(actor, path)[before:] == [("step", 10), ("step", 11)]
    log.emit_soon("step", step=12)
    log.send()
    assert written(actor, path)[before:] == [("step", 10), ("step", 11), ("step", 12)]
