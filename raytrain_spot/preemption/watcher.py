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

Rules it keeps: only an explicit ``TRUE`` from the metadata server (or SIGTERM) is a notice;
errors, 5xx, garbage and timeouts are retried with capped exponential backoff and never
become one; the node is drained exactly once whatever fires how often; it exits 0 once the
drain is accepted.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import math
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Protocol, Sequence, Union
from urllib.parse import urlencode

logger = logging.getLogger(__name__)

DEFAULT_METADATA_HOST = "metadata.google.internal"
PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GCE_SHUTDOWN_S = 30.0
"""Seconds GCE leaves between the ACPI soft-off (SIGTERM in the guest) and the hard stop."""
GCE_NOTICE_S = GCE_SHUTDOWN_S
"""Seconds between the metadata notice and the hard stop without an advance notice: the metadata
value turns TRUE at the soft-off. With ``scheduling.preemptionNoticeDuration`` it is that plus 30."""

EXIT_OK = 0
EXIT_DRAIN_FAILED = 1
EXIT_STARTUP_FAILED = 2

NoticeSource = Literal["metadata", "sigterm"]


# ----------------------------------------------------------------------------------------
# Decisions (pure)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Capped exponential delays between retries."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 5.0
    """Low enough that a metadata server that comes back mid-notice is heard within seconds."""

    def __post_init__(self):
        if self.initial_s <= 0 or self.factor < 1 or self.max_s < self.initial_s:
            raise ValueError(f"backoff needs initial_s > 0, factor >= 1 and max_s >= initial_s, got {self}")

    def delay_s(self, failures: int) -> float:
        """Delay after the ``failures``-th consecutive failure (1-based)."""
        return min(self.max_s, self.initial_s * self.factor ** (failures - 1))


@dataclass(frozen=True)
class WatcherSettings:
    margin_s: float = 5.0
    """Drain deadline = notice + notice_s - margin_s: the node must count as preempted before
    it dies, or survivors' collective errors arrive first and Ray Train charges a plain failure."""
    notice_s: float = GCE_NOTICE_S
    """Seconds from the metadata notice to the hard stop: 30 on GCE, 30 + the VM's
    ``preemptionNoticeDuration`` with an advance notice (150 for 120 s); the simulator may compress it."""
    shutdown_s: float = GCE_SHUTDOWN_S
    """Seconds from SIGTERM (the ACPI soft-off) to the hard stop (or ``notice_s``, if shorter): an
    advance notice moves the metadata notice earlier, never the soft-off. A SIGTERM heard first (the
    metadata server was down, or the watcher started late) leaves only this long."""
    poll_timeout_s: float = 60.0
    """``timeout_sec`` of each metadata long-poll; bounds how long a hung server goes unnoticed."""
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self):
        if self.margin_s < 0:
            raise ValueError(f"--margin-s must be >= 0, got {self.margin_s}")
        if self.notice_s <= self.margin_s:
            raise ValueError(f"--margin-s ({self.margin_s}) must be below --notice-s ({self.notice_s}), "
                             "or the drain deadline would be at or before the notice")
        if self.shutdown_s <= 0:
            raise ValueError(f"shutdown_s must be > 0, got {self.shutdown_s}")
        if self.poll_timeout_s < 1:
            raise ValueError(f"--poll-timeout-s must be >= 1 (the metadata server counts whole seconds), "
                             f"got {self.poll_timeout_s}")


@dataclass(frozen=True)
class Notice:
    """A preemption notice as this node heard it."""

    source: NoticeSource
    at_s: float
    """Unix seconds when the watcher heard it."""


@dataclass(frozen=True)
class DrainDecision:
    node_id: str
    notice: Notice
    notice_s: float
    margin_s: float

    @property
    def hard_stop_s(self) -> float:
        """When GCE stops the VM (unix seconds)."""
        return self.notice.at_s + self.notice_s

    @property
    def deadline_s(self) -> float:
        """The drain deadline handed to Ray (unix seconds), margin_s before the hard stop; never
        before the notice (a SIGTERM leaves less time than the metadata notice the margin fits)."""
        return max(self.notice.at_s, self.hard_stop_s - self.margin_s)

    @property
    def deadline_ms(self) -> int:
        return round(self.deadline_s * 1000)

    @property
    def message(self) -> str:
        """The drain's reason message, visible in Ray's node state."""
        return (f"GCE preemption notice ({self.notice.source}) at {self.notice.at_s:.3f}; "
                f"VM stops at {self.hard_stop_s:.3f}")


def notice_window_s(source: NoticeSource, settings: WatcherSettings) -> float:
    """Seconds from a notice of this source to the hard stop. The metadata notice comes
    ``notice_s`` before it; SIGTERM comes at the soft-off, ``shutdown_s`` before it (or with the
    metadata notice, when there is no advance notice and ``notice_s`` is the shorter)."""
    return settings.notice_s if source == "metadata" else min(settings.notice_s, settings.shutdown_s)


def decide_drain(notice: Notice, node_id: str, settings: WatcherSettings) -> DrainDecision:
    """The drain a notice calls for."""
    return DrainDecision(node_id=node_id, notice=notice, notice_s=notice_window_s(notice.source, settings),
                         margin_s=settings.margin_s)


@dataclass(frozen=True)
class AliveNode:
    node_id: str
    ip: str
    is_head: bool = False


class NodeLookupError(RuntimeError):
    """This machine's Ray node cannot be identified; the message says what to pass."""


class NodeNotRegistered(NodeLookupError):
    """No alive node matches (yet): it may still be registering."""


def pick_node_id(alive: Sequence[AliveNode], ip: str, gcs_address: str) -> str:
    """The id of the one alive node with this IP; raise NodeLookupError otherwise.

    A head node on the same machine does not count: the watcher runs on worker VMs, and the
    head (on-demand, never preempted) is never the node to drain."""
    matches = [node for node in alive if node.ip == ip]
    if len(matches) > 1:
        matches = [node for node in matches if not node.is_head]
    if len(matches) == 1:
        return matches[0].node_id
    if not matches:
        raise NodeNotRegistered(f"no alive Ray node has IP {ip} in the cluster at {gcs_address} "
                              f"(alive: {sorted({node.ip for node in alive})}); start the watcher after "
                              "`ray start` on this node, or pass --node-id")
    raise NodeLookupError(f"{len(matches)} alive Ray nodes share IP {ip} in the cluster at {gcs_address} "
                          f"({', '.join(node.node_id for node in matches)}); pass --node-id")


def check_node_alive(alive: Sequence[AliveNode], node_id: str, gcs_address: str) -> None:
    """Raise NodeLookupError unless node_id is alive. Needed because the GCS accepts a drain
    of any id, even one that never existed, so a typo would go unnoticed until the VM dies."""
    if not any(node.node_id == node_id for node in alive):
        raise NodeNotRegistered(f"node {node_id} is not an alive node of the cluster at {gcs_address}; "
                              "check --node-id (hex, as `ray list nodes` shows it)")


# ----------------------------------------------------------------------------------------
# The outside world: interfaces and production implementations
# ----------------------------------------------------------------------------------------


class MetadataUnavailable(Exception):
    """The metadata server gave no usable answer. Never a notice."""


class DrainUnavailable(Exception):
    """The drain request did not reach the GCS or got no answer; retrying may work."""


@dataclass(frozen=True)
class PreemptedReading:
    preempted: bool
    etag: Optional[str]


@dataclass(frozen=True)
class DrainReply:
    accepted: bool
    rejection: str


class PreemptedPoller(Protocol):
    def read(self, last_etag: Optional[str], wait_s: Optional[float]) -> PreemptedReading:
        """Read ``instance/preempted``; with ``wait_s``, long-poll until it differs from
        ``last_etag`` (or from the current value) for at most ``wait_s``. Raises
        MetadataUnavailable for anything but a clear answer."""

    def abort(self) -> None:
        """Make the read in flight, and every later one, raise MetadataUnavailable at once."""


class Drainer(Protocol):
    def drain(self, decision: DrainDecision) -> DrainReply:
        """Ask Ray to drain the node; raise DrainUnavailable when the request may not have landed."""


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


def classify_preempted_answer(status: int, metadata_flavor: Optional[str], body: bytes) -> bool:
    """True/False for a clear answer; MetadataUnavailable for anything else."""
    if status != 200:
        raise MetadataUnavailable(f"HTTP {status}")
    if metadata_flavor != "Google":
        raise MetadataUnavailable("answer lacks 'Metadata-Flavor: Google', so it is not from a metadata server")
    value = body.strip()
    if value == b"TRUE":
        return True
    if value == b"FALSE":
        return False
    raise MetadataUnavailable(f"unexpected value {value[:40]!r}")


class HttpPreemptedPoller:
    """Reads ``instance/preempted`` over HTTP from ``host[:port]`` (no proxies, like GCE clients)."""

    def __init__(self, host: str, *, connect_timeout_s: float = 2.0, answer_slack_s: float = 5.0):
        # A malformed host (e.g. a non-numeric port) is a setup error: fail now, not on every poll.
        http.client.HTTPConnection(host)
        self.host = host
        self._connect_timeout_s = connect_timeout_s
        # A long-poll answers within timeout_sec; past that plus this slack the server is hung.
        self._answer_slack_s = answer_slack_s
        self._lock = threading.Lock()
        self._aborted = False
        self._connection: Optional[http.client.HTTPConnection] = None

    def read(self, last_etag: Optional[str], wait_s: Optional[float]) -> PreemptedReading:
        path = PREEMPTED_PATH
        if wait_s is not None:
            query = {"wait_for_change": "true", "timeout_sec": str(math.ceil(wait_s))}
            if last_etag:
                query["last_etag"] = last_etag
            path += "?" + urlencode(query)
        connection = http.client.HTTPConnection(self.host, timeout=self._connect_timeout_s)
        try:
            connection.connect()
            with self._lock:
                if self._aborted:
                    raise MetadataUnavailable("watcher stopped")
                self._connection = connection
            connection.sock.settimeout((wait_s or 0) + self._answer_slack_s)
            connection.request("GET", path, headers={"Metadata-Flavor": "Google"})
            response = connection.getresponse()
            # The value is a few bytes; a large body is garbage and need not be read whole.
            body = response.read(1024)
            preempted = classify_preempted_answer(response.status, response.getheader("Metadata-Flavor"), body)
            return PreemptedReading(preempted=preempted, etag=response.getheader("ETag"))
        except (OSError, http.client.HTTPException) as error:
            raise MetadataUnavailable(f"{type(error).__name__}: {error}") from None
        finally:
            with self._lock:
                self._connection = None
            connection.close()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sock = self._connection.sock if self._connection is not None else None
        if sock is not None:
            # Unblocks a long-poll's recv at once; close() from another thread would not.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RayControlStore:
    """Ray's Global Control Store (GCS) of this cluster, not Google Cloud Storage: looks up nodes and drains them."""

    def __init__(self, address: str, *, rpc_timeout_s: float = 5.0):
        from raytrain_spot._ray import GcsClient

        self.address = address
        self._rpc_timeout_s = rpc_timeout_s
        # Connecting waits for the GCS (about 40 s when it is down), then raises.
        self._client = GcsClient(address=address)

    def alive_nodes(self) -> List[AliveNode]:
        from raytrain_spot._ray import GcsNodeInfo

        infos = self._client.get_all_node_info(timeout=self._rpc_timeout_s,
                                               state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
        return [AliveNode(node_id=node_id.hex(), ip=info.node_manager_address, is_head=info.is_head_node)
                for node_id, info in infos.items()]

    def drain(self, decision: DrainDecision) -> DrainReply:
        from raytrain_spot._ray import DrainNodeReason

        try:
            accepted, rejection = self._client.drain_node(
                decision.node_id, DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), decision.message,
                decision.deadline_ms, timeout=self._rpc_timeout_s)
        # Ray's client raises several unrelated types (RpcError, RaySystemError, timeouts); each
        # means "not drained yet", and retrying until the hard stop is the only useful answer.
        except Exception as error:  # noqa: BLE001
            raise DrainUnavailable(f"{type(error).__name__}: {error}") from error
        return DrainReply(accepted=bool(accepted), rejection=str(rejection))


def discover_gcs_address() -> str:
    """The GCS address the way ``ray.init()`` finds it: ``RAY_ADDRESS``, else the address the
    last ``ray start`` on this machine wrote (head and worker nodes both write it).

    Like ``ray.init()``, a cluster found on this machine (not named by ``RAY_ADDRESS``) also turns
    token authentication on when this machine has a token: ``ray start`` enables it by default,
    and the GCS then refuses clients without the token. An explicit address never does, so
    with one the caller sets ``RAY_AUTH_MODE=token`` itself, as for ``ray.init(address)``.
    """
    from raytrain_spot._ray import canonicalize_bootstrap_address_or_die, maybe_enable_token_auth_if_token_available

    address = canonicalize_bootstrap_address_or_die("auto")
    if not os.environ.get("RAY_ADDRESS"):
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return address


def resolve_node_id(gcs: RayControlStore, node_id: Optional[str], *, wait_s: float = 30.0) -> str:
    """Check ``node_id``, or find this machine's node by its IP. Waits up to ``wait_s`` for the
    node to register (the watcher may start right after ``ray start``)."""
    from raytrain_spot._ray import get_node_ip_address

    give_up_at = time.monotonic() + wait_s
    while True:
        alive = gcs.alive_nodes()
        try:
            if node_id is not None:
                check_node_alive(alive, node_id, gcs.address)
                return node_id
            # The address this machine uses towards the GCS is the one its raylet registered with.
            return pick_node_id(alive, get_node_ip_address(gcs.address), gcs.address)
        except NodeNotRegistered:
            if time.monotonic() >= give_up_at:
                raise
        time.sleep(1.0)


# ----------------------------------------------------------------------------------------
# The watcher: one place that acts
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# Production wiring
# ----------------------------------------------------------------------------------------


def metadata_host_from_env() -> str:
    """``GCE_METADATA_HOST`` (host[:port], as google-auth reads it), else the GCE default."""
    return os.environ.get("GCE_METADATA_HOST") or DEFAULT_METADATA_HOST


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
