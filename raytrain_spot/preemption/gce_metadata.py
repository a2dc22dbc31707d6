"""GCE's preemption notice as the metadata server gives it: ``instance/preempted``, long-polled over
HTTP; only an explicit ``TRUE`` with ``Metadata-Flavor: Google`` is a notice, anything else is
``MetadataUnavailable``."""

from __future__ import annotations

import http.client
import math
import os
import socket
import threading
from dataclasses import dataclass
from typing import Optional, Protocol
from urllib.parse import urlencode

DEFAULT_METADATA_HOST = "metadata.google.internal"
PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"


class MetadataUnavailable(Exception):
    """The metadata server gave no usable answer. Never a notice."""


@dataclass(frozen=True)
class PreemptedReading:
    preempted: bool
    etag: Optional[str]


class PreemptedPoller(Protocol):
    def read(self, last_etag: Optional[str], wait_s: Optional[float]) -> PreemptedReading:
        """Read ``instance/preempted``; with ``wait_s``, long-poll until it differs from
        ``last_etag`` (or from the current value) for at most ``wait_s``. Raises
        MetadataUnavailable for anything but a clear answer."""

    def abort(self) -> None:
        """Make the read in flight, and every later one, raise MetadataUnavailable at once."""


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


def metadata_host_from_env() -> str:
    """``GCE_METADATA_HOST`` (host[:port], as google-auth reads it), else the GCE default."""
    return os.environ.get("GCE_METADATA_HOST") or DEFAULT_METADATA_HOST
