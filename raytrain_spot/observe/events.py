"""The run's event log: ``events.jsonl`` in the Hydra run directory, one JSON object per line.

Every line has ``t`` (unix seconds) and ``ev``, the record's kind. The schema, a class per kind
with its fields, is observe/records.py: ``EventLog.emit`` takes such a record.

A ``samples`` record is written with its ids packed, as most of a long run's log is these
records: ``ids_packed`` is the ids in ascending order as differences from the one before (the
first from 0), each an unsigned LEB128 varint, the bytes in URL-safe base64 without padding.
Ids a few apart take one or two bytes instead of the decimal digits of each; a repeated id (a
difference of 0) stays, so an audit still sees it. ``read_events`` and ``iter_events`` unpack
it back into ``ids``.

One writer, an actor on the driver's node, appends every line, so the file is ordered by
arrival. Workers and the driver send records without waiting for them; the per-step records
(``step``, ``samples``) in batches, up to half a second late (``EventLog``).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Union

from raytrain_spot.observe.records import EventRecord, Samples, Step, to_line

EVENTS_FILE = "events.jsonl"
FEED_STATE_FILE = "events.feed.json"
"""Beside the log: how far the driver's event feed read it, and its sinks' totals at that point."""
FEED_STATE_FORMAT = 1
_FINGERPRINT_BYTES = 4096
logger = logging.getLogger(__name__)


def pack_ids(ids: Sequence[int]) -> str:
    """Sample ids as ``ids_packed``: ascending differences as LEB128 varints, URL-safe base64."""
    packed, previous = bytearray(), 0
    for sample_id in sorted(ids):
        if sample_id < 0:
            raise ValueError(f"sample id {sample_id} is negative; sample ids are dataset row numbers")
        delta, previous = sample_id - previous, sample_id
        while delta >= 0x80:
            packed.append(delta & 0x7F | 0x80)
            delta >>= 7
        packed.append(delta)
    return base64.urlsafe_b64encode(bytes(packed)).rstrip(b"=").decode()


def unpack_ids(packed: str) -> List[int]:
    data = base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4))
    ids, value, delta, shift = [], 0, 0, 0
    for byte in data:
        delta |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            value += delta
            ids.append(value)
            delta, shift = 0, 0
    return ids


class EventWriter:
    """Appends records to a JSON-lines file. Runs inside the event-log actor."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._file = open(path, "a", buffering=1)
        self._last_step: Optional[int] = None

    def write(self, record: Dict[str, Any]) -> None:
        record.setdefault("t", time.time())
        if record.get("ev") == Step.ev:
            self._last_step = record["step"]
        if record.get("ev") == Samples.ev and "ids" in record:
            record = {**record, "ids_packed": pack_ids(record["ids"])}
            del record["ids"]
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def write_many(self, records: List[Dict[str, Any]]) -> None:
        for record in records:
            self.write(record)

    def flush(self) -> None:
        self._file.flush()

    def last_step(self) -> Optional[int]:
        """The step of the newest step record written by this writer; None before the first."""
        return self._last_step


def start_event_log(run_dir: str):
    """Start the event-log actor on this (the driver's) node; return its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(num_cpus=0, max_concurrency=1)(EventWriter)
    return actor_cls.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(os.path.join(run_dir, EVENTS_FILE))


class EventLog:
    """Sends event records to the event-log actor; a no-op without one (unit tests).

    ``emit`` sends at once; ``emit_soon`` is for the records of every step, which go in one call
    per ``batch_s``: an actor call per step is sender CPU on the training step. A record sent at once
    takes the batched ones before it, so one process's records arrive in the order it made them.
    Batched records of a process that is killed (no notice) are lost with it, at most ``batch_s``.
    """

    def __init__(self, actor=None, batch_s: float = 0.5):
        self._actor = actor
        self._batch_s = batch_s
        self._batched: List[Dict[str, Any]] = []
        self._lock = threading.Lock()  # the checkpoint manager emits from its background thread

    def __reduce__(self):
        return EventLog, (self._actor, self._batch_s)  # another process (an actor) batches its own records

    def emit(self, record: EventRecord) -> None:
        if self._actor is not None:
            with self._lock:
                self._batched.append(to_line(record, time.time()))
                self._send()

    def emit_soon(self, record: EventRecord) -> None:
        if self._actor is not None:
            with self._lock:
                self._batched.append(to_line(record, time.time()))
                if self._batched[-1]["t"] - self._batched[0]["t"] >= self._batch_s:
                    self._send()

    def send(self) -> None:
        """Send the batched records now, without waiting for them to be written."""
        if self._actor is not None:
            with self._lock:
                self._send()

    def flush(self) -> None:
        """Wait until every record made so far is written."""
        if self._actor is not None:
            import ray

            self.send()
            ray.get(self._actor.flush.remote())

    def last_step(self) -> Optional[int]:
        """The step of the newest step record the event log has written (None: none, or no event log)."""
        if self._actor is None:
            return None
        import ray

        return ray.get(self._actor.last_step.remote())

    def _send(self) -> None:
        if self._batched:
            self._actor.write_many.remote(self._batched)
            self._batched = []


def read_events(path: str) -> List[Dict[str, Any]]:
    """All records of an events.jsonl file; a torn last line (a crash mid-write) is ignored."""
    return list(iter_events(path))


def iter_events(path: str, start: int = 0) -> Iterator[Dict[str, Any]]:
    """The records from byte ``start`` on, one at a time, a ``samples`` record's ids unpacked."""
    with open(path) as f:
        f.seek(start)
        for line in f:
            if not line.endswith("\n"):
                return
            record = parse_line(line)
            if record is not None:
                yield record


def parse_line(line: Union[str, bytes]) -> Optional[Dict[str, Any]]:
    """One complete line of the log as its record (a ``samples`` record's ids unpacked); None if garbled."""
    try:
        record = json.loads(line)
        if "ids_packed" in record:
            record["ids"] = unpack_ids(record.pop("ids_packed"))
    except ValueError:  # JSONDecodeError, or ids that are not base64
        return None
    return record


def last(events: List[Dict[str, Any]], ev: str) -> Optional[Dict[str, Any]]:
    return next((e for e in reversed(events) if e["ev"] == ev), None)


class RecordSink(Protocol):
    """What an ``EventFeed`` drives: records in order, a tick after every poll, a close at the end."""

    def write(self, record: Dict[str, Any]) -> None: ...

    def tick(self) -> Any: ...

    def close(self) -> None: ...


class EventFeed:
    """Follows ``events.jsonl`` in a thread; every new record goes to every sink, then each sink ticks.

    The driver's sinks are the progress printer, live monitoring and the alert runner. A resumed
    run's totals include the invocations before it without reading the log again: after every
    poll that read records the feed saves its offset and the ``totals`` of the sinks that keep
    them (``state()`` / ``load_state()``, as ``RunningTotals``) in ``events.feed.json``, and a new
    feed on the same log goes on from there. A state that does not match the log (the log is
    shorter, or its bytes before the offset changed) or does not parse is ignored: the feed then
    reads the log from its start.
    """

    def __init__(self, events_path: str, sinks: Sequence[RecordSink], poll_s: float = 1.0):
        self._path, self._sinks, self._poll_s = events_path, list(sinks), poll_s
        self._state_path = os.path.join(os.path.dirname(events_path), FEED_STATE_FILE)
        self._offset = self._resume()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="event-feed", daemon=True)

    @property
    def offset(self) -> int:
        """Bytes of the log handed to the sinks so far."""
        return self._offset

    def __enter__(self) -> "EventFeed":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        for sink in self._sinks:
            sink.close()

    def _follow(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.poll()

    def poll(self) -> None:
        """Hand every complete new line to the sinks, save how far they got, then let each sink tick once."""
        if os.path.exists(self._path):
            read_from = self._offset
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                while (line := f.readline()).endswith(b"\n"):
                    self._offset = f.tell()
                    record = parse_line(line)
                    if record is None:
                        continue
                    for sink in self._sinks:
                        self._call(sink, "write", record)
            if self._offset != read_from:
                self._save()
        for sink in self._sinks:
            self._call(sink, "tick")

    def _totals(self) -> List[Any]:
        return [getattr(sink, "totals", None) for sink in self._sinks]

    def _fingerprint(self, offset: int) -> Optional[str]:
        """Digest of the log's last bytes before ``offset``; None when the log is shorter than that."""
        try:
            with open(self._path, "rb") as f:
                f.seek(max(0, offset - _FINGERPRINT_BYTES))
                tail = f.read(min(offset, _FINGERPRINT_BYTES))
        except FileNotFoundError:
            return None
        return hashlib.sha256(tail).hexdigest() if len(tail) == min(offset, _FINGERPRINT_BYTES) else None

    def _save(self) -> None:
        state = {"format": FEED_STATE_FORMAT, "offset": self._offset, "fingerprint": self._fingerprint(self._offset),
                 "totals": [None if totals is None else totals.state() for totals in self._totals()]}
        temporary = f"{self._state_path}.tmp"
        try:
            with open(temporary, "w") as f:
                json.dump(state, f, separators=(",", ":"))
            os.replace(temporary, self._state_path)  # a crash mid-write leaves the previous state whole
        except OSError:
            logger.exception("event feed: could not save its state to %s", self._state_path)

    def _resume(self) -> int:
        """The offset a saved state lets this feed start at, its sinks' totals restored; else 0."""
        try:
            with open(self._state_path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as error:
            logger.warning("event feed: %s unreadable (%s); reading %s from its start", self._state_path, error,
                           self._path)
            return 0
        totals = self._totals()
        try:
            offset, saved = int(state["offset"]), state["totals"]
            matches = (state["format"] == FEED_STATE_FORMAT and len(saved) == len(totals)
                       and all((a is None) == (b is None) for a, b in zip(saved, totals))
                       and state["fingerprint"] is not None and self._fingerprint(offset) == state["fingerprint"])
        except (KeyError, TypeError, ValueError):
            matches = False
        if not matches:
            logger.warning("event feed: %s does not match %s; reading the log from its start", self._state_path,
                           self._path)
            return 0
        pairs = [(sink_totals, sink_state) for sink_totals, sink_state in zip(totals, saved) if sink_totals is not None]
        try:
            for sink_totals, sink_state in pairs:  # every state loads on a copy before any sink changes
                copy.copy(sink_totals).load_state(sink_state)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            logger.warning("event feed: %s holds totals that do not load (%s); reading %s from its start",
                           self._state_path, error, self._path)
            return 0
        for sink_totals, sink_state in pairs:
            sink_totals.load_state(sink_state)
        return offset

    @staticmethod
    def _call(sink: RecordSink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception:  # a failing sink must not stop the others or the run
            logger.exception("event feed: %s.%s failed", type(sink).__name__, method)
