"""The preemption watcher: decisions with fakes, the HTTP poller against the real emulator,
and the watcher process against a real local Ray cluster."""

from __future__ import annotations

import http.client
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

import pytest

from raytrain_spot._ray import draining_nodes
from raytrain_spot.simulator.metadata_server import MetadataEmulator
from raytrain_spot.preemption.drain_decision import (GCE_NOTICE_S, GCE_SHUTDOWN_S, Backoff, DrainDecision, Notice,
                                                     WatcherSettings, decide_drain, notice_window_s)
from raytrain_spot.preemption.gce_metadata import (HttpPreemptedPoller, MetadataUnavailable, PreemptedReading,
                                                   classify_preempted_answer)
from raytrain_spot.preemption.ray_drain import (AliveNode, DrainReply, DrainUnavailable, NodeLookupError,
                                                NodeNotRegistered, RayControlStore, check_node_alive, pick_node_id,
                                                resolve_node_id)
from raytrain_spot.preemption.watcher import PreemptionWatcher, main

T0 = 1_700_000_000.0
NODE = "ab" * 28
FALSE_A = PreemptedReading(preempted=False, etag="etag-a")
TRUE_B = PreemptedReading(preempted=True, etag="etag-b")


# ----------------------------------------------------------------------------------------
# Fakes: the decision logic runs without HTTP, Ray or real time
# ----------------------------------------------------------------------------------------


class FakeClock:
    """Time moves only when someone waits; every wait is recorded."""

    def __init__(self, start: float = T0):
        self.t = start
        self.waits: List[float] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self.t

    def wait(self, wake: threading.Event, seconds: float) -> bool:
        with self._lock:
            self.waits.append(seconds)
            self.t += seconds
        return wake.is_set()


Step = Union[PreemptedReading, MetadataUnavailable, Callable[[], PreemptedReading]]


class FakePoller:
    """Plays a script of readings and failures, then blocks like a long-poll until aborted."""

    def __init__(self, script: Sequence[Step] = (), on_exhausted: Optional[Callable[[], None]] = None):
        self.script = list(script)
        self.calls: List[tuple] = []
        self.on_exhausted = on_exhausted
        self._aborted = threading.Event()

    def read(self, last_etag, wait_s):
        self.calls.append((last_etag, wait_s))
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, MetadataUnavailable):
                raise step
            return step() if callable(step) else step
        if self.on_exhausted is not None:
            self.on_exhausted()
        self._aborted.wait()
        raise MetadataUnavailable("aborted")

    def abort(self):
        self._aborted.set()


class FakeDrainer:
    def __init__(self, script: Sequence[Union[DrainReply, DrainUnavailable, Callable[[], DrainReply]]] = (),
                 clock: Optional[FakeClock] = None):
        self.script = list(script)
        self.decisions: List[DrainDecision] = []
        self.attempt_times: List[float] = []
        self._clock = clock

    def drain(self, decision):
        self.decisions.append(decision)
        if self._clock is not None:
            self.attempt_times.append(self._clock.now())
        step = self.script.pop(0) if self.script else DrainReply(True, "")
        if isinstance(step, DrainUnavailable):
            raise step
        return step() if callable(step) else step


def make_watcher(poller, drainer=None, clock=None, **settings):
    clock = clock or FakeClock()
    drainer = drainer or FakeDrainer()
    watcher = PreemptionWatcher(NODE, poller=poller, drainer=drainer, settings=WatcherSettings(**settings),
                                clock=clock)
    return watcher, drainer, clock


# ----------------------------------------------------------------------------------------
# Decisions
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("notice_s, margin_s, deadline_after_notice_s", [(30, 5, 25), (10, 3, 7), (30, 0, 30)])
def test_deadline_is_margin_before_the_hard_stop(notice_s, margin_s, deadline_after_notice_s):
    decision = decide_drain(Notice("metadata", T0), NODE, WatcherSettings(margin_s=margin_s, notice_s=notice_s))
    assert decision.hard_stop_s == T0 + notice_s
    assert decision.deadline_s == T0 + deadline_after_notice_s
    assert decision.deadline_ms == round((T0 + deadline_after_notice_s) * 1000)
    assert "metadata" in decision.message


@pytest.mark.parametrize("source, notice_s, margin_s, hard_stop_after_s, deadline_after_s", [
    # GCE's 120 s advance notice: the metadata notice comes 150 s before the hard stop, SIGTERM
    # (the ACPI soft-off) still 30 s before it.
    ("metadata", 150, 5, 150, 145),
    ("sigterm", 150, 5, 30, 25),
    # No advance notice: both come together, however compressed (the simulator's 4 s).
    ("metadata", 4, 1, 4, 3),
    ("sigterm", 4, 1, 4, 3),
    # A margin wider than the soft-off leaves: the deadline is the notice itself, never before it.
    ("sigterm", 150, 40, 30, 0),
])
def test_the_deadline_follows_the_notice_each_source_implies(source, notice_s, margin_s, hard_stop_after_s,
                                                             deadline_after_s):
    decision = decide_drain(Notice(source, T0), NODE, WatcherSettings(margin_s=margin_s, notice_s=notice_s))
    assert decision.notice_s == notice_window_s(source, WatcherSettings(margin_s=margin_s, notice_s=notice_s))
    assert decision.hard_stop_s == T0 + hard_stop_after_s
    assert decision.deadline_s == T0 + deadline_after_s
    assert f"VM stops at {T0 + hard_stop_after_s:.3f}" in decision.message


def test_the_cli_takes_the_advance_notice_as_notice_s():
    from raytrain_spot.preemption.watcher import _parse_args

    settings = _parse_args(["--margin-s", "5", "--notice-s", "150"]).settings
    assert (settings.notice_s, settings.margin_s, settings.shutdown_s) == (150, 5, GCE_SHUTDOWN_S)
    assert notice_window_s("sigterm", settings) == GCE_SHUTDOWN_S == 30
    assert _parse_args([]).settings.notice_s == GCE_NOTICE_S == 30, "without a flag: GCE's default notice"


@pytest.mark.parametrize("settings, problem", [
    (dict(margin_s=30, notice_s=30), "must be below --notice-s"),
    (dict(margin_s=-1), "must be >= 0"),
    (dict(poll_timeout_s=0.5), "poll-timeout-s"),
])
def test_settings_reject_a_deadline_that_makes_no_sense(settings, problem):
    with pytest.raises(ValueError, match=problem):
        WatcherSettings(**settings)


def test_cli_rejects_bad_settings_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--margin-s", "40"])
    assert exit_info.value.code == 2
    assert "--margin-s (40.0) must be below --notice-s" in capsys.readouterr().err


def test_cli_rejects_a_node_id_that_is_not_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--node-id", "node-2"])
    assert exit_info.value.code == 2
    assert "is not a Ray node id" in capsys.readouterr().err


def test_backoff_doubles_up_to_its_cap():
    backoff = Backoff(initial_s=0.5, factor=2, max_s=5)
    assert [backoff.delay_s(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 5, 5, 5]
    with pytest.raises(ValueError):
        Backoff(initial_s=0)


@pytest.mark.parametrize("status, flavor, body, expected", [
    (200, "Google", b"TRUE", True),
    (200, "Google", b"FALSE", False),
    (200, "Google", b"TRUE\n", True),
])
def test_only_a_clear_answer_is_read(status, flavor, body, expected):
    assert classify_preempted_answer(status, flavor, body) is expected


@pytest.mark.parametrize("status, flavor, body", [
    (503, "Google", b"TRUE"),
    (500, "Google", b""),
    (404, "Google", b"Not Found"),
    (200, None, b"TRUE"),  # not from a metadata server (a proxy or a captive portal)
    (200, "Google", b"true-ish"),
    (200, "Google", b""),
    (200, "Google", b"<html>TRUE</html>"),
])
def test_errors_and_garbage_are_never_a_notice(status, flavor, body):
    with pytest.raises(MetadataUnavailable):
        classify_preempted_answer(status, flavor, body)


def test_node_lookup_by_ip():
    alive = [AliveNode("h" * 8, "10.0.0.1"), AliveNode("a" * 8, "10.0.0.2"),
             AliveNode("b" * 8, "10.0.0.3"), AliveNode("c" * 8, "10.0.0.3")]
    assert pick_node_id(alive, "10.0.0.2", "gcs:6379") == "a" * 8
    with pytest.raises(NodeNotRegistered, match="pass --node-id"):
        pick_node_id(alive, "10.0.0.9", "gcs:6379")
    with pytest.raises(NodeLookupError, match="2 alive Ray nodes share IP 10.0.0.3") as error:
        pick_node_id(alive, "10.0.0.3", "gcs:6379")
    assert not isinstance(error.value, NodeNotRegistered), "an ambiguous IP must not be waited on"
    # A worker on the head's machine: the head is never the node to drain.
    sharing = [AliveNode("h" * 8, "10.0.0.1", is_head=True), AliveNode("w" * 8, "10.0.0.1")]
    assert pick_node_id(sharing, "10.0.0.1", "gcs:6379") == "w" * 8
    check_node_alive(alive, "a" * 8, "gcs:6379")
    with pytest.raises(NodeNotRegistered, match="check --node-id"):
        check_node_alive(alive, "d" * 8, "gcs:6379")


# ----------------------------------------------------------------------------------------
# The watcher loop with fakes
# ----------------------------------------------------------------------------------------


def test_metadata_true_drains_once_with_the_margin():
    poller = FakePoller([FALSE_A, FALSE_A, TRUE_B])
    watcher, drainer, clock = make_watcher(poller, margin_s=5, notice_s=30, poll_timeout_s=60)
    outcome = watcher.run()
    assert outcome.exit_code == 0 and outcome.drained
    assert drainer.decisions == [outcome.decision]
    assert outcome.decision.node_id == NODE
    assert outcome.decision.notice == Notice("metadata", T0)
    assert outcome.decision.deadline_s == T0 + 25
    # First read at once (a notice may predate the watcher), then long-polls from the last ETag.
    assert poller.calls == [(None, None), ("etag-a", 60), ("etag-a", 60)]
    assert clock.waits == []


def test_sigterm_drains_with_the_time_it_arrived():
    poller = FakePoller()  # the metadata server never answers
    watcher, drainer, clock = make_watcher(poller, margin_s=5, notice_s=30)
    clock.t = T0 + 7
    watcher.notify_sigterm()
    outcome = watcher.run()
    assert outcome.exit_code == 0
    assert drainer.decisions == [outcome.decision]
    assert outcome.decision.notice == Notice("sigterm", T0 + 7)
    assert outcome.decision.deadline_s == T0 + 7 + 25


def test_a_real_sigterm_reaches_a_watcher_waiting_in_run():
    watcher, drainer, _ = make_watcher(FakePoller())
    previous = signal.signal(signal.SIGTERM, lambda *_: watcher.notify_sigterm())
    try:
        threading.Timer(0.2, os.kill, [os.getpid(), signal.SIGTERM]).start()
        outcome = watcher.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert outcome.decision.notice.source == "sigterm"
    assert len(drainer.decisions) == 1


@pytest.mark.parametrize("first", ["sigterm", "metadata"])
def test_both_notices_drain_exactly_once(first, caplog):
    caplog.set_level(logging.INFO, logger="raytrain_spot.preemption.watcher")
    holder = {}

    def metadata_true_after_sigterm():
        holder["watcher"].notify_sigterm()
        return TRUE_B

    def accept_then_sigterm():
        holder["watcher"].notify_sigterm()
        return DrainReply(True, "")

    if first == "sigterm":
        poller, drainer = FakePoller([metadata_true_after_sigterm]), FakeDrainer()
    else:
        poller, drainer = FakePoller([TRUE_B]), FakeDrainer([accept_then_sigterm])
    watcher, _, _ = make_watcher(poller, drainer)
    holder["watcher"] = watcher
    outcome = watcher.run()
    assert len(drainer.decisions) == 1
    assert outcome.decision.notice.source == first
    second = "metadata" if first == "sigterm" else "sigterm"
    assert [r.message for r in caplog.records if "notice ignored" in r.message and f"source={second}" in r.message]
    assert sum("preemption notice -> drain" in r.message for r in caplog.records) == 1


def test_metadata_errors_back_off_and_are_never_a_notice():
    unavailable = MetadataUnavailable("HTTP 503")
    poller = FakePoller([unavailable] * 7 + [FALSE_A, unavailable, TRUE_B])
    watcher, drainer, clock = make_watcher(poller, backoff=Backoff(initial_s=0.5, factor=2, max_s=5))
    outcome = watcher.run()
    # Capped exponential backoff, reset once the server answers again.
    assert clock.waits == [0.5, 1, 2, 4, 5, 5, 5, 0.5]
    assert len(drainer.decisions) == 1
    assert outcome.decision.notice == Notice("metadata", T0 + sum(clock.waits))
    assert poller.calls == [(None, None)] * 8 + [("etag-a", 60.0)] * 2


def test_errors_alone_never_drain():
    holder = {}
    failures = [MetadataUnavailable(reason) for reason in ("HTTP 500", "HTTP 503", "unexpected value b'yes'",
                                                           "TimeoutError: timed out", "ConnectionRefusedError")]
    poller = FakePoller(failures, on_exhausted=lambda: holder["watcher"].stop())
    watcher, drainer, clock = make_watcher(poller)
    holder["watcher"] = watcher
    outcome = watcher.run()
    assert outcome.decision is None and outcome.exit_code == 0
    assert drainer.decisions == []
    assert len(clock.waits) == len(failures)


def test_stop_before_a_notice_does_not_drain():
    watcher, drainer, _ = make_watcher(FakePoller())
    watcher.stop()
    outcome = watcher.run()
    assert outcome.decision is None and outcome.exit_code == 0 and drainer.decisions == []


def test_drain_retries_an_unreachable_gcs():
    clock = FakeClock()
    drainer = FakeDrainer([DrainUnavailable("RpcError"), DrainUnavailable("RpcError"), DrainReply(True, "")], clock)
    watcher, _, _ = make_watcher(FakePoller([TRUE_B]), drainer, clock, backoff=Backoff(0.5, 2, 5))
    outcome = watcher.run()
    assert outcome.drained and outcome.exit_code == 0
    assert drainer.attempt_times == [T0, T0 + 0.5, T0 + 1.5]
    assert all(decision == outcome.decision for decision in drainer.decisions)


def test_drain_gives_up_when_the_vm_would_be_gone():
    clock = FakeClock()
    drainer = FakeDrainer([DrainUnavailable("RpcError")] * 100, clock)
    watcher, _, _ = make_watcher(FakePoller([TRUE_B]), drainer, clock, notice_s=30, margin_s=5,
                                 backoff=Backoff(0.5, 2, 5))
    outcome = watcher.run()
    assert not outcome.drained and outcome.exit_code == 1
    # Attempts at 0, 0.5, 1.5, 3.5, 7.5, 12.5, ..., 27.5 s; the next would be past the hard stop.
    assert drainer.attempt_times[-1] == T0 + 27.5
    assert len(drainer.attempt_times) == 9


def test_with_an_advance_notice_the_drain_is_retried_until_its_later_hard_stop():
    clock = FakeClock()
    drainer = FakeDrainer([DrainUnavailable("RpcError")] * 100, clock)
    watcher, _, _ = make_watcher(FakePoller([TRUE_B]), drainer, clock, notice_s=150, margin_s=5,
                                 backoff=Backoff(0.5, 2, 5))
    outcome = watcher.run()
    assert not outcome.drained and outcome.decision.deadline_s == T0 + 145
    # 0, 0.5, 1.5, 3.5, 7.5, then every 5 s: the last try at 147.5 s, the next would be past 150 s.
    assert drainer.attempt_times[-1] == T0 + 147.5


def test_a_rejected_drain_fails_the_watcher():
    drainer = FakeDrainer([DrainReply(False, "node is dead")])
    watcher, _, _ = make_watcher(FakePoller([TRUE_B]), drainer)
    outcome = watcher.run()
    assert not outcome.drained and outcome.exit_code == 1 and len(drainer.decisions) == 1


# ----------------------------------------------------------------------------------------
# The real HTTP poller against the real emulator (no Ray)
# ----------------------------------------------------------------------------------------


@pytest.fixture
def metadata():
    with MetadataEmulator(["vm-1"]) as emulator:
        yield emulator


def test_http_poller_reads_and_long_polls(metadata):
    poller = HttpPreemptedPoller(metadata.host("vm-1"))
    first = poller.read(None, None)
    assert first.preempted is False and first.etag
    threading.Timer(0.3, metadata.preempt, ["vm-1"]).start()
    start = time.monotonic()
    second = poller.read(first.etag, 10)
    assert second.preempted is True and time.monotonic() - start < 2


@pytest.mark.parametrize("fault", ["refuse", "503", "garbage", "hang", "stall"])
def test_http_poller_turns_every_fault_into_unavailable(metadata, fault):
    poller = HttpPreemptedPoller(metadata.host("vm-1"), answer_slack_s=0.5)
    metadata.preempt("vm-1")  # a fault must not leak the real value either
    if fault == "refuse":
        metadata.go_down()
    elif fault == "503":
        metadata.answer_with(503, "TRUE")
    elif fault == "garbage":
        metadata.answer_with(200, "<html>TRUE</html>")
    elif fault == "hang":
        metadata.go_down(hang=True)
    else:
        metadata.stall(3)
    with pytest.raises(MetadataUnavailable):
        poller.read(None, None)


def test_http_poller_rejects_a_malformed_host_at_once():
    with pytest.raises(http.client.InvalidURL):
        HttpPreemptedPoller("127.0.0.1:metadata")


def test_http_poller_abort_ends_a_long_poll_at_once(metadata):
    poller = HttpPreemptedPoller(metadata.host("vm-1"))
    etag = poller.read(None, None).etag
    threading.Timer(0.3, poller.abort).start()
    start = time.monotonic()
    with pytest.raises(MetadataUnavailable):
        poller.read(etag, 30)
    assert time.monotonic() - start < 2
    with pytest.raises(MetadataUnavailable, match="stopped"):
        poller.read(None, None)


def test_watcher_rides_out_a_misbehaving_server_then_drains_once(metadata):
    """Real poller and clock: 5xx, garbage and an outage never drain; the notice after does."""
    drainer = FakeDrainer()
    watcher = PreemptionWatcher(NODE, poller=HttpPreemptedPoller(metadata.host("vm-1"), answer_slack_s=0.5),
                                drainer=drainer, settings=WatcherSettings(
                                    notice_s=10, margin_s=2, poll_timeout_s=1, backoff=Backoff(0.05, 2, 0.2)))
    result = {}
    runner = threading.Thread(target=lambda: result.update(outcome=watcher.run()))
    runner.start()
    for fault in (lambda: metadata.answer_with(503, "TRUE"), lambda: metadata.answer_with(200, "yes"),
                  metadata.go_down):
        fault()
        time.sleep(0.6)
        assert drainer.decisions == [] and runner.is_alive()
        metadata.come_back()
    preempted_at = time.time()
    metadata.preempt("vm-1")
    runner.join(timeout=10)
    outcome = result["outcome"]
    assert outcome.exit_code == 0 and len(drainer.decisions) == 1
    assert preempted_at <= outcome.decision.notice.at_s < preempted_at + 1.5


def test_an_advance_notice_over_http_drains_for_the_hard_stop_150_s_later(metadata):
    """Real poller, emulator and clock: with --notice-s 150 (GCE's 120 s advance notice) the drain's
    deadline is 145 s after the metadata notice, not 25 s; a SIGTERM after it changes nothing."""
    drainer = FakeDrainer()
    watcher = PreemptionWatcher(NODE, poller=HttpPreemptedPoller(metadata.host("vm-1")), drainer=drainer,
                                settings=WatcherSettings(notice_s=150, margin_s=5, poll_timeout_s=5))
    result = {}
    runner = threading.Thread(target=lambda: result.update(outcome=watcher.run()))
    runner.start()
    time.sleep(0.3)
    preempted_at = time.time()
    metadata.preempt("vm-1")
    runner.join(timeout=10)
    watcher.notify_sigterm()  # GCE's soft-off, 120 s later on a real VM: the drain is already done
    decision = result["outcome"].decision
    assert result["outcome"].drained and drainer.decisions == [decision]
    assert decision.notice.source == "metadata" and preempted_at <= decision.notice.at_s < preempted_at + 1.5
    assert decision.hard_stop_s == decision.notice.at_s + 150
    assert decision.deadline_ms == round((decision.notice.at_s + 145) * 1000)


# ----------------------------------------------------------------------------------------
# Integration: the watcher process, the emulator and a real local Ray cluster
# ----------------------------------------------------------------------------------------

LOOPBACK = "127.0.0.1"
NOTICE_S, MARGIN_S = 10.0, 3.0


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, node_ip_address=LOOPBACK, include_dashboard=False, object_store_memory=80 << 20))
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def cluster_metadata():
    with MetadataEmulator() as emulator:
        yield emulator


@pytest.fixture
def busy_node(ray_cluster, request):
    """A fresh worker node running an actor: a drained node with nothing on it shuts itself
    down at once, while a busy one stays, draining, until the VM would die."""
    import ray

    label = f"spot-{request.node.name}"
    label = re.sub(r"[^A-Za-z0-9-]", "-", label)
    node = ray_cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK, object_store_memory=80 << 20,
                                resources={label: 2})

    @ray.remote(num_cpus=0, resources={label: 1})
    class Holder:
        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    holder = Holder.remote()
    assert ray.get(holder.node_id.remote(), timeout=60) == node.node_id
    yield node, label
    ray.kill(holder)
    ray_cluster.remove_node(node, allow_graceful=False)


class WatcherProcess:
    def __init__(self, cluster, node, metadata_host: str, log_path: Path, notice_s: float = NOTICE_S):
        self.log_path = log_path
        env = {**os.environ, "GCE_METADATA_HOST": metadata_host}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raytrain_spot.preemption.watcher", "--address", cluster.address, "--node-id", node.node_id,
             "--notice-s", str(notice_s), "--margin-s", str(MARGIN_S), "--poll-timeout-s", "5"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, pattern: str, timeout_s: float = 60, count: int = 1) -> str:
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            text = self.log()
            if len(re.findall(pattern, text)) >= count:
                return text
            assert self.proc.poll() is None, f"watcher exited {self.proc.returncode} early:\n{text}"
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} x{count} in the watcher's log within {timeout_s} s:\n{self.log()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def start_watcher(ray_cluster, tmp_path) -> Iterator[Callable[..., WatcherProcess]]:
    started: List[WatcherProcess] = []

    def start(node, metadata_host: str, notice_s: float = NOTICE_S) -> WatcherProcess:
        watcher = WatcherProcess(ray_cluster, node, metadata_host, tmp_path / f"watcher-{len(started)}.log", notice_s)
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        watcher.close()


def drain_line(log: str) -> dict:
    """The numbers of the watcher's one decision line."""
    lines = [line for line in log.splitlines() if "preemption notice -> drain" in line]
    assert len(lines) == 1, log
    assert log.count("drain accepted") == 1, log
    return dict(re.findall(r"(\w+)=([\w.]+)", lines[0]))


def draining_deadline_ms(node_id: str) -> Optional[int]:

    return draining_nodes().get(node_id)


@pytest.mark.cluster
def test_node_lookup_against_the_real_gcs(ray_cluster):
    gcs = RayControlStore(ray_cluster.address)
    alive = gcs.alive_nodes()
    head = ray_cluster.head_node.node_id
    assert AliveNode(head, LOOPBACK, is_head=True) in alive
    assert resolve_node_id(gcs, head, wait_s=0) == head
    with pytest.raises(NodeNotRegistered):
        resolve_node_id(gcs, "cd" * 28, wait_s=0)
    workers = [node.node_id for node in alive if not node.is_head]
    if len(workers) > 1:  # every virtual worker node shares 127.0.0.1: discovery must refuse to guess
        with pytest.raises(NodeLookupError, match="share IP 127.0.0.1"):
            resolve_node_id(gcs, None, wait_s=0)
    else:  # the head is never the one: a lone worker beside it is
        assert resolve_node_id(gcs, None, wait_s=0) == (workers[0] if workers else head)


@pytest.mark.cluster
def test_metadata_notice_drains_the_node_with_the_deadline(busy_node, cluster_metadata, start_watcher):
    import ray

    node, label = busy_node
    cluster_metadata.add_node("vm-notice")
    watcher = start_watcher(node, cluster_metadata.host("vm-notice"))
    watcher.wait_for_log("watching node=")
    assert draining_deadline_ms(node.node_id) is None
    preempted_at = time.time()
    cluster_metadata.preempt("vm-notice")
    assert watcher.proc.wait(timeout=30) == 0, watcher.log()
    numbers = drain_line(watcher.log())
    assert numbers["source"] == "metadata" and numbers["node"] == node.node_id
    notice_at = float(numbers["notice_at"])
    assert preempted_at - 0.001 <= notice_at < preempted_at + 2, watcher.log()  # the log rounds to ms
    deadline_ms = draining_deadline_ms(node.node_id)
    assert deadline_ms is not None, "the node should be draining in the GCS"
    assert abs(deadline_ms - (notice_at + NOTICE_S - MARGIN_S) * 1000) < 5
    # What Ray Train relies on: a draining node gets no new work, even where it has room.
    @ray.remote(num_cpus=0, resources={label: 1})
    def probe_task() -> None:
        pass

    probe = probe_task.remote()
    ready, _ = ray.wait([probe], timeout=2)
    assert not ready, "Ray scheduled new work on a draining node"
    ray.cancel(probe)


@pytest.mark.cluster
def test_watcher_survives_a_dead_metadata_server_then_drains(busy_node, cluster_metadata, start_watcher):
    node, _ = busy_node
    cluster_metadata.add_node("vm-outage")
    cluster_metadata.go_down(node="vm-outage")
    watcher = start_watcher(node, cluster_metadata.host("vm-outage"))
    watcher.wait_for_log("metadata read failed .*not a notice; retry", count=2)
    assert draining_deadline_ms(node.node_id) is None
    cluster_metadata.come_back("vm-outage")
    watcher.wait_for_log("metadata server answers again", timeout_s=15)
    cluster_metadata.preempt("vm-outage")
    assert watcher.proc.wait(timeout=30) == 0, watcher.log()
    numbers = drain_line(watcher.log())
    assert numbers["source"] == "metadata"
    assert abs(draining_deadline_ms(node.node_id) - (float(numbers["notice_at"]) + NOTICE_S - MARGIN_S) * 1000) < 5


@pytest.mark.cluster
def test_sigterm_drains_the_node_and_exits_cleanly(busy_node, cluster_metadata, start_watcher):
    node, _ = busy_node
    cluster_metadata.add_node("vm-sigterm")
    watcher = start_watcher(node, cluster_metadata.host("vm-sigterm"))
    watcher.wait_for_log("watching node=")
    sent_at = time.time()
    watcher.proc.send_signal(signal.SIGTERM)
    assert watcher.proc.wait(timeout=30) == 0, watcher.log()
    numbers = drain_line(watcher.log())
    assert numbers["source"] == "sigterm"
    assert sent_at - 0.001 <= float(numbers["notice_at"]) < sent_at + 2, watcher.log()  # the log rounds to ms
    assert abs(draining_deadline_ms(node.node_id) - (float(numbers["notice_at"]) + NOTICE_S - MARGIN_S) * 1000) < 5


@pytest.mark.cluster
@pytest.mark.parametrize("source, deadline_after_notice_s", [("metadata", 150 - MARGIN_S), ("sigterm", 30 - MARGIN_S)])
def test_an_advance_notice_reaches_the_gcs_as_its_deadline(busy_node, cluster_metadata, start_watcher, source,
                                                          deadline_after_notice_s):
    """The watcher process with --notice-s 150: the GCS holds a deadline 150 s after a metadata
    notice, minus the margin, and 30 s after a SIGTERM (the soft-off), minus the margin."""
    node, _ = busy_node
    name = f"vm-advance-{source}"
    cluster_metadata.add_node(name)
    watcher = start_watcher(node, cluster_metadata.host(name), notice_s=150)
    text = watcher.wait_for_log("watching node=")
    assert "notice_s=150.0 sigterm_notice_s=30.0" in text
    if source == "metadata":
        cluster_metadata.preempt(name)
    else:
        watcher.proc.send_signal(signal.SIGTERM)
    assert watcher.proc.wait(timeout=30) == 0, watcher.log()
    numbers = drain_line(watcher.log())
    assert numbers["source"] == source
    expected_ms = (float(numbers["notice_at"]) + deadline_after_notice_s) * 1000
    assert abs(draining_deadline_ms(node.node_id) - expected_ms) < 5
