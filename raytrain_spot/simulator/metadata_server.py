"""A GCE metadata server emulator on 127.0.0.1, one port per virtual node.

It speaks the parts of the real server that preemption handling depends on:

* ``/computeMetadata/v1/instance/preempted`` (``FALSE`` / ``TRUE``),
  ``instance/maintenance-event`` (``NONE``, ``TERMINATE_ON_HOST_MAINTENANCE``, ...),
  ``instance/id``, ``instance/name`` and ``instance/zone``
  (``projects/<number>/zones/<zone>``);
* the ``Metadata-Flavor: Google`` request header (403 without it); every answer carries
  ``Metadata-Flavor: Google`` and an ``ETag`` derived from the value;
* ``?wait_for_change=true`` long-polls: with ``last_etag`` the request returns as soon as
  the value's ETag differs from it (at once if it already does), without it as soon as the
  value differs from the one current at arrival; ``timeout_sec`` bounds the wait and the
  current value is returned when it runs out.

Each virtual node gets its own port because clients find the server through
``GCE_METADATA_HOST``, which is ``host[:port]`` (google-auth's convention) and has no
room for a path prefix. ``emulator.env("node-1")`` gives the variables for a process that
plays that node.

Fault injection reads like a sentence::

    with MetadataEmulator(["node-1", "node-2"]) as metadata:
        metadata.preempt("node-2")
        metadata.set_maintenance("node-1", "TERMINATE_ON_HOST_MAINTENANCE")
        metadata.go_down()              # connections refused until come_back()
        metadata.go_down(hang=True)     # connections accepted, never answered
        metadata.answer_with(503, "backend error")
        metadata.stall(10)              # nothing answered for the next 10 s
        metadata.come_back()

Outage and error injections take ``node=`` to hit one virtual node only.
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

LOOPBACK = "127.0.0.1"
METADATA_PREFIX = "/computeMetadata/v1/"
PREEMPTED = "instance/preempted"
MAINTENANCE_EVENT = "instance/maintenance-event"
MAINTENANCE_EVENTS = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE")

# A long-poll without timeout_sec waits this long at most; the real server's own limit is
# undocumented and long, and shutdown wakes every waiter anyway.
_DEFAULT_WAIT_S = 3600.0
# A client that connects and sends nothing must not keep a handler thread (and shutdown) forever.
_REQUEST_READ_TIMEOUT_S = 10.0


def etag_of(value: str) -> str:
    """The ETag the emulator gives a value: equal values have equal ETags, as on GCE."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


@dataclass
class _Faults:
    """What is wrong with one virtual node's server right now."""

    down: bool = False
    """Listening socket closed: connections are refused."""
    hang: bool = False
    """Requests are read and never answered (dropped at come_back or shutdown)."""
    forced_answer: Optional[Tuple[int, str]] = None
    """Every request gets this (status, body) instead of the metadata."""
    stalled_until: float = 0.0
    """time.monotonic() before which no request is answered."""


@dataclass
class _VirtualNode:
    name: str
    values: Dict[str, str]
    faults: _Faults = field(default_factory=_Faults)
    changed: threading.Condition = field(default_factory=threading.Condition)
    """Guards values and faults; notified on every change so long-polls re-check."""
    closing: bool = False
    server: Optional[ThreadingHTTPServer] = None
    serve_thread: Optional[threading.Thread] = None
    port: int = 0


class _NodeServer(ThreadingHTTPServer):
    # Handler threads are joined at close, so shutdown leaves nothing running.
    daemon_threads = False
    block_on_close = True

    def __init__(self, port: int, node: _VirtualNode):
        self.node = node
        super().__init__((LOOPBACK, port), _MetadataHandler)


class _MetadataHandler(BaseHTTPRequestHandler):
    server: _NodeServer
    timeout = _REQUEST_READ_TIMEOUT_S

    def version_string(self) -> str:
        return "Metadata Server for VM"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        # One stderr line per request would drown the test output.
        pass

    def do_GET(self) -> None:
        node = self.server.node
        with node.changed:
            # Faults are checked on arrival and again before answering, because a fault can
            # begin while a long-poll waits.
            answer = self._answer(node) if self._wait_out_faults(node) else None
            if answer is not None and not self._wait_out_faults(node):
                answer = None
            if answer is not None and node.faults.forced_answer is not None:
                answer = (*node.faults.forced_answer, None)
        if answer is None:
            self.close_connection = True  # dropped: the client sees the connection close
            return
        self._reply(*answer)

    def _answer(self, node: _VirtualNode) -> Optional[Tuple[int, str, Optional[str]]]:
        """(status, body, etag) for this request, or None to drop it. Holds node.changed."""
        if node.faults.forced_answer is not None:
            return (*node.faults.forced_answer, None)
        if self.headers.get("Metadata-Flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header.\n", None
        url = urlsplit(self.path)
        key = url.path[len(METADATA_PREFIX):] if url.path.startswith(METADATA_PREFIX) else None
        if key not in node.values:
            return 404, "Not Found\n", None
        query = {name: values[-1] for name, values in parse_qs(url.query).items()}
        if query.get("wait_for_change", "").lower() != "true":
            value = node.values[key]
            return 200, value, etag_of(value)
        try:
            timeout_s = float(query.get("timeout_sec", _DEFAULT_WAIT_S))
        except ValueError:
            timeout_s = -1.0
        if timeout_s <= 0:
            return 400, "timeout_sec must be a positive number\n", None
        reference = query.get("last_etag") or etag_of(node.values[key])
        if not self._wait_for_change(node, key, reference, timeout_s):
            return None
        value = node.values[key]
        return 200, value, etag_of(value)

    def _wait_out_faults(self, node: _VirtualNode) -> bool:
        """Hold the request through a stall or a hang; False: drop it unanswered."""
        while True:
            if node.closing or node.faults.down:
                return False
            if node.faults.hang:
                node.changed.wait()
                if not node.faults.hang:
                    return False  # what a hung server held is lost when it comes back
                continue
            remaining = node.faults.stalled_until - time.monotonic()
            if remaining <= 0:
                return True
            node.changed.wait(remaining)

    @staticmethod
    def _wait_for_change(node: _VirtualNode, key: str, reference_etag: str, timeout_s: float) -> bool:
        """Wait until the value's ETag differs from the reference or time runs out.

        False when the server goes away meanwhile (the request is then dropped).
        """
        deadline = time.monotonic() + timeout_s
        while etag_of(node.values[key]) == reference_etag:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            node.changed.wait(remaining)
            if node.closing or node.faults.down or node.faults.hang:
                return False
        return True

    def _reply(self, status: int, body: str, etag: Optional[str] = None) -> None:
        payload = body.encode()
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", "application/text")
        self.send_header("Content-Length", str(len(payload)))
        if etag is not None:
            self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(payload)


class MetadataEmulator:
    """Serves GCE metadata for several virtual nodes, each on its own 127.0.0.1 port.

    Servers start as nodes are added; ``close()`` (or leaving the ``with`` block) stops
    them all and joins every handler thread.
    """

    def __init__(self, nodes: Iterable[str] = (), *, project_number: int = 123456789012,
                 zone: str = "us-central1-a"):
        self.project_number = project_number
        self.zone = zone
        self._nodes: Dict[str, _VirtualNode] = {}
        for name in nodes:
            self.add_node(name)

    # -- nodes -----------------------------------------------------------------------

    def add_node(self, name: str, *, zone: Optional[str] = None, instance_id: Optional[int] = None) -> str:
        """Start serving a virtual node; return its ``GCE_METADATA_HOST`` value (host:port)."""
        if name in self._nodes:
            raise ValueError(f"virtual node {name!r} is already served at {self.host(name)}")
        # A stable id per name, like a VM's numeric id that never changes.
        numeric_id = instance_id if instance_id is not None else 1_000_000_000 + zlib.crc32(name.encode())
        node = _VirtualNode(name=name, values={
            PREEMPTED: "FALSE",
            MAINTENANCE_EVENT: "NONE",
            "instance/id": str(numeric_id),
            "instance/name": name,
            "instance/zone": f"projects/{self.project_number}/zones/{zone or self.zone}",
        })
        self._nodes[name] = node
        self._listen(node, port=0)
        return self.host(name)

    def host(self, name: str) -> str:
        """``host:port`` of a virtual node's server, the form ``GCE_METADATA_HOST`` takes."""
        return f"{LOOPBACK}:{self._node(name).port}"

    def env(self, name: str) -> Dict[str, str]:
        """Environment for a process playing this virtual node."""
        return {"GCE_METADATA_HOST": self.host(name)}

    # -- events ----------------------------------------------------------------------

    def preempt(self, name: str) -> None:
        """The node gets its preemption notice: ``instance/preempted`` turns ``TRUE``."""
        self._set(name, PREEMPTED, "TRUE")

    def set_maintenance(self, name: str, event: str) -> None:
        """Announce a host maintenance event (``NONE`` ends it)."""
        if event not in MAINTENANCE_EVENTS:
            raise ValueError(f"maintenance event {event!r} is not one of {MAINTENANCE_EVENTS}")
        self._set(name, MAINTENANCE_EVENT, event)

    # -- faults ----------------------------------------------------------------------

    def go_down(self, *, hang: bool = False, node: Optional[str] = None) -> None:
        """The server fails: connections are refused, or with ``hang=True`` accepted and
        never answered. In-flight requests are dropped without an answer."""
        for target in self._targets(node):
            with target.changed:
                target.faults.hang = hang
                target.faults.down = not hang
                target.changed.notify_all()
            if not hang:
                self._stop_listening(target)

    def come_back(self, node: Optional[str] = None) -> None:
        """End every fault: listen again on the same port, answer normally."""
        for target in self._targets(node):
            was_down = target.faults.down
            with target.changed:
                target.faults = _Faults()
                target.changed.notify_all()
            if was_down:
                self._listen(target, port=target.port)

    def answer_with(self, status: int, body: str, *, node: Optional[str] = None) -> None:
        """Answer every request with this status and body until ``come_back()``."""
        for target in self._targets(node):
            with target.changed:
                target.faults.forced_answer = (status, body)
                target.changed.notify_all()

    def stall(self, seconds: float, *, node: Optional[str] = None) -> None:
        """Answer nothing for the next ``seconds``; requests held meanwhile are answered after."""
        until = time.monotonic() + seconds
        for target in self._targets(node):
            with target.changed:
                target.faults.stalled_until = until
                target.changed.notify_all()

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        for node in self._nodes.values():
            with node.changed:
                node.closing = True
                node.changed.notify_all()
            self._stop_listening(node)

    def __enter__(self) -> "MetadataEmulator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------

    def _node(self, name: str) -> _VirtualNode:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"no virtual node {name!r}; served: {sorted(self._nodes)}") from None

    def _targets(self, name: Optional[str]) -> List[_VirtualNode]:
        return [self._node(name)] if name is not None else list(self._nodes.values())

    def _set(self, name: str, key: str, value: str) -> None:
        node = self._node(name)
        with node.changed:
            node.values[key] = value
            node.changed.notify_all()

    def _listen(self, node: _VirtualNode, port: int) -> None:
        try:
            server = _NodeServer(port, node)
        except OSError as error:
            raise RuntimeError(f"metadata emulator: cannot listen on {LOOPBACK}:{port} for {node.name!r} "
                               f"({error}); another process took the port while it was down") from error
        node.server = server
        node.port = server.server_address[1]
        # A short poll interval makes go_down() take effect (and return) quickly.
        node.serve_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                             name=f"metadata-{node.name}", daemon=True)
        node.serve_thread.start()

    @staticmethod
    def _stop_listening(node: _VirtualNode) -> None:
        server, node.server = node.server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()  # closes the socket, then joins the handler threads
        if node.serve_thread is not None:
            node.serve_thread.join()
