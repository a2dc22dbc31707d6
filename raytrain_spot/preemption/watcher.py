"""The per-node preemption watcher: a GCE preemption notice becomes one Ray drain.

GCE announces a Spot preemption in two ways: the metadata value ``instance/preempted`` turns
``TRUE``, and the guest's ACPI soft-off sends SIGTERM to processes; the VM stops hard 30 s after
the soft-off. By default both come together, 30 s before the hard stop. A Spot VM created with
``scheduling.preemptionNoticeDuration`` (preview) gets the metadata notice that much earlier:
with 120 s, ``preempted`` turns TRUE 150 s before the hard stop, and SIGTERM still comes 30 s
before it. Ray 2.60 reads neither on GCE, so this process, one per worker node, turns whichever
comes first into a drain of its own Ray node with reason PREEMPTION and a deadline ``margin_s``
before the hard stop that notice implies. Ray Train sees the drain and tells every rank through
``ray.train.get_preemption_info()``.

Run it as a process: a systemd service of its own on a GCP worker (``raytrain-watcher``, started by
the cluster YAML's worker start commands; its stop at the soft-off is the SIGTERM notice), one per
virtual node in the local Spot simulator::

    python -m raytrain_spot.preemption.watcher --margin-s 5 [--notice-s 30] [--node-id HEX] [--address HOST:PORT]

``--notice-s`` is the metadata notice: 30, or 30 + the node type's ``preemptionNoticeDuration``
(150 for 120 s); ``python -m raytrain_spot.cluster.check`` checks that the two agree.

or in-process: ``build_watcher(...)`` wires the production parts, ``PreemptionWatcher`` takes
injected ones (poller, drainer, clock) so its decisions are testable without a cluster.
The parts: ``drain_decision`` (the notice and its drain deadline), ``gce_metadata`` (reading
``instance/preempted``), ``ray_drain`` (finding and draining the node in Ray's GCS).

Rules it keeps: only an explicit ``TRUE`` from the metadata server (or SIGTERM) is a notice;
errors, 5xx, garbage and timeouts are retried with capped exponential backoff and never
become one; the node is drained exactly once whatever fires how often; it exits 0 once the
drain is accepted.
"""

from __future__ import annotations

import argparse
import logging
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal, Optional, Protocol, Sequence, Union

from raytrain_spot.preemption.drain_decision import (GCE_SHUTDOWN_S, DrainDecision, Notice, WatcherSettings,
                                                     decide_drain, notice_window_s)
from raytrain_spot.preemption.gce_metadata import (DEFAULT_METADATA_HOST, PREEMPTED_PATH, HttpPreemptedPoller,
                                                   MetadataUnavailable, PreemptedPoller, metadata_host_from_env)
from raytrain_spot.preemption.ray_drain import (DrainUnavailable, Drainer, RayControlStore, discover_gcs_address,
                                                resolve_node_id)

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DRAIN_FAILED = 1
EXIT_STARTUP_FAILED = 2


class Clock(Protocol):
    def now(self) -> float:
        """Unix seconds."""

    def wait(self, wake: threading.Event, seconds: float) -> bool:
        """Sleep up to ``seconds``; return early (True) once ``wake`` is set."""


class SystemClock:
    def now(self) -> float:
        return time.time()

    def wait(self, wake: threading.Event, seconds: float) -> bool:
        return wake.wait(seconds)


_STOP: Literal["stop"] = "stop"
InboxItem = Union[Notice, Literal["stop"]]


@dataclass(frozen=True)
class WatchOutcome:
    decision: Optional[DrainDecision]
    """None: stopped before any notice."""
    drained: bool

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.decision is None or self.drained else EXIT_DRAIN_FAILED


class PreemptionWatcher:
    """Waits for the first notice (metadata or SIGTERM), drains the node once, returns.

    ``notify_sigterm()`` and ``stop()`` may be called from a signal handler: they only put an
    item into a ``queue.SimpleQueue``, whose ``put`` is reentrant.
    """

    def __init__(self, node_id: str, *, poller: PreemptedPoller, drainer: Drainer,
                 settings: WatcherSettings = WatcherSettings(), clock: Clock = SystemClock(),
                 inbox: Optional[queue.SimpleQueue[InboxItem]] = None):
        self.node_id = node_id
        self.settings = settings
        self._poller = poller
        self._drainer = drainer
        self._clock = clock
        # Passing an inbox lets a process queue a SIGTERM that arrives while it is still starting.
        self._inbox: queue.SimpleQueue[InboxItem] = inbox if inbox is not None else queue.SimpleQueue()
        self._stopping = threading.Event()

    def notify_sigterm(self) -> None:
        self._inbox.put(Notice("sigterm", self._clock.now()))

    def stop(self) -> None:
        """End run() without draining (unless a notice is already being handled)."""
        self._inbox.put(_STOP)

    def run(self) -> WatchOutcome:
        poll_thread = threading.Thread(target=self._poll_metadata, name="preempted-poller", daemon=True)
        poll_thread.start()
        first = self._inbox.get()
        try:
            if not isinstance(first, Notice):
                logger.info("watcher stopped before any notice: node=%s, no drain", self.node_id)
                return WatchOutcome(decision=None, drained=False)
            decision = decide_drain(first, self.node_id, self.settings)
            now = self._clock.now()
            logger.info("preemption notice -> drain: node=%s source=%s notice_at=%.3f notice_s=%.1f margin_s=%.1f "
                        "deadline=%.3f (%.1f s from now) hard_stop=%.3f", decision.node_id, first.source,
                        first.at_s, decision.notice_s, decision.margin_s, decision.deadline_s,
                        decision.deadline_s - now, decision.hard_stop_s)
            return WatchOutcome(decision=decision, drained=self._drain(decision))
        finally:
            self._stopping.set()
            self._poller.abort()
            poll_thread.join()
            self._log_ignored_notices()

    def _poll_metadata(self) -> None:
        """Long-poll ``instance/preempted`` until it reads TRUE or the watcher stops."""
        last_etag: Optional[str] = None
        answered_once = False
        failures = 0
        while not self._stopping.is_set():
            try:
                # The first read does not wait, so a notice that came before the watcher started
                # is seen at once; later reads long-poll for a change from the last ETag.
                reading = self._poller.read(last_etag, self.settings.poll_timeout_s if answered_once else None)
            except MetadataUnavailable as error:
                if self._stopping.is_set():
                    return
                failures += 1
                delay = self.settings.backoff.delay_s(failures)
                logger.warning("metadata read failed (%s): not a notice; retry %d in %.1f s",
                               error, failures, delay)
                if self._clock.wait(self._stopping, delay):
                    return
                continue
            if failures:
                logger.info("metadata server answers again after %d failed reads", failures)
                failures = 0
            answered_once = True
            if reading.preempted:
                self._inbox.put(Notice("metadata", self._clock.now()))
                return
            last_etag = reading.etag

    def _drain(self, decision: DrainDecision) -> bool:
        """Drain, retrying unreachable GCS until the VM's hard stop makes it pointless."""
        never = threading.Event()
        attempts = 0
        while True:
            attempts += 1
            try:
                reply = self._drainer.drain(decision)
            except DrainUnavailable as error:
                delay = self.settings.backoff.delay_s(attempts)
                if self._clock.now() + delay >= decision.hard_stop_s:
                    logger.error("drain of node %s failed %d times (%s); giving up: the VM stops at %.3f",
                                 decision.node_id, attempts, error, decision.hard_stop_s)
                    return False
                logger.warning("drain of node %s failed (%s); retry %d in %.1f s",
                               decision.node_id, error, attempts, delay)
                self._clock.wait(never, delay)
                continue
            if reply.accepted:
                logger.info("drain accepted: node=%s deadline_ms=%d attempts=%d",
                            decision.node_id, decision.deadline_ms, attempts)
                return True
            logger.error("drain of node %s rejected by the GCS: %s", decision.node_id, reply.rejection)
            return False

    def _log_ignored_notices(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Notice):
                logger.info("notice ignored: node=%s source=%s at=%.3f (one drain per node)",
                            self.node_id, item.source, item.at_s)


def build_watcher(*, node_id: Optional[str] = None, gcs_address: Optional[str] = None,
                  metadata_host: Optional[str] = None, settings: WatcherSettings = WatcherSettings(),
                  inbox: Optional[queue.SimpleQueue[InboxItem]] = None) -> PreemptionWatcher:
    """A watcher wired to the real metadata server and GCS. Raises NodeLookupError, or Ray's
    error when the GCS cannot be reached.

    In a process that also starts Ray nodes (the local simulator), pass ``gcs_address``:
    discovery may turn token authentication on for the whole process, and raylets started
    from it afterwards would then disagree with the cluster.
    """
    gcs = RayControlStore(gcs_address or discover_gcs_address())
    return PreemptionWatcher(resolve_node_id(gcs, node_id), poller=HttpPreemptedPoller(metadata_host or
                                                                                       metadata_host_from_env()),
                             drainer=gcs, settings=settings, inbox=inbox)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m raytrain_spot.preemption.watcher",
        description="Turn this VM's GCE preemption notice (metadata 'preempted' or SIGTERM) into one Ray "
                    "drain with reason PREEMPTION, then exit. Metadata host: $GCE_METADATA_HOST "
                    f"(default {DEFAULT_METADATA_HOST}).")
    parser.add_argument("--margin-s", type=float, default=WatcherSettings.margin_s,
                        help="drain deadline this many seconds before the hard stop (default %(default)s)")
    parser.add_argument("--notice-s", type=float, default=WatcherSettings.notice_s,
                        help="seconds from the metadata notice to the hard stop (default %(default)s, GCE's; "
                             "30 + the VM's scheduling.preemptionNoticeDuration with an advance notice, e.g. 150). "
                             f"SIGTERM always means {GCE_SHUTDOWN_S:.0f} s (or --notice-s, if shorter)")
    parser.add_argument("--poll-timeout-s", type=float, default=WatcherSettings.poll_timeout_s,
                        help="timeout_sec of each metadata long-poll (default %(default)s)")
    parser.add_argument("--node-id", help="hex id of the Ray node to drain (default: the one alive node "
                                          "with this machine's IP)")
    parser.add_argument("--address", help="GCS address host:port (default: like the ray CLI: $RAY_ADDRESS, "
                                          "else the address the last `ray start` here wrote)")
    args = parser.parse_args(argv)
    if args.node_id is not None and not re.fullmatch(r"[0-9a-f]{56}", args.node_id):
        parser.error(f"--node-id {args.node_id!r} is not a Ray node id (56 lowercase hex digits, as "
                     "`ray list nodes` shows it)")
    try:
        args.settings = WatcherSettings(margin_s=args.margin_s, notice_s=args.notice_s,
                                        poll_timeout_s=args.poll_timeout_s)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s raytrain_spot.preemption.watcher: %(message)s")
    # Handlers first: a SIGTERM that arrives while we look up the node still counts, with its time.
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    signal.signal(signal.SIGTERM, lambda *_: inbox.put(Notice("sigterm", time.time())))
    signal.signal(signal.SIGINT, lambda *_: inbox.put(_STOP))
    metadata_host = metadata_host_from_env()
    try:
        watcher = build_watcher(node_id=args.node_id, gcs_address=args.address, metadata_host=metadata_host,
                                settings=args.settings, inbox=inbox)
    except Exception as error:  # noqa: BLE001 - any startup failure ends here, with its reason
        logger.error("cannot start: %s: %s", type(error).__name__, error)
        return EXIT_STARTUP_FAILED
    logger.info("watching node=%s metadata=http://%s%s margin_s=%.1f notice_s=%.1f sigterm_notice_s=%.1f "
                "poll_timeout_s=%.0f", watcher.node_id, metadata_host, PREEMPTED_PATH, args.settings.margin_s,
                args.settings.notice_s, notice_window_s("sigterm", args.settings), args.settings.poll_timeout_s)
    return watcher.run().exit_code


if __name__ == "__main__":
    sys.exit(main())
