"""One driver owns a run name at a time: a lease object in the run's durable storage.

A second driver started by mistake with the same ``run.name``, or a zombie driver still alive
after its head was replaced, would otherwise write checkpoints into the same directories. The
driver takes ``<run>/lease.json`` with a compare-and-swap write (a GCS generation
precondition; an flock'd replace on a filesystem), renews it every ``ttl_s / 3`` the same
way, and gives it up at the end. A lease whose holder stopped renewing for ``ttl_s`` is free,
and so is one held by a dead process on this machine (a SIGKILLed driver resumed at once).
A driver whose renewal finds another holder has lost the run and must stop writing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from raytrain_spot.storage.store import Store

logger = logging.getLogger(__name__)

LEASE_FILE = "lease.json"


class RunInUse(RuntimeError):
    """Another live driver holds the run's lease; the message names it and the fix."""


@dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int
    renewed_at: float
    ttl_s: float

    def expired(self, now: float) -> bool:
        return now - self.renewed_at > self.ttl_s

    def dead_here(self) -> bool:
        """A process of this machine that no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class RunLease:
    def __init__(self, store: Store, run_name: str, ttl_s: float = 60.0, clock: Callable[[], float] = time.time):
        self.store = store
        self.run_name = run_name
        self.key = f"{run_name}/{LEASE_FILE}"
        self.ttl_s = ttl_s
        self._clock = clock
        self.owner = uuid.uuid4().hex
        self._version: Optional[str] = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self, renewed_at: float) -> bytes:
        return json.dumps(asdict(Holder(self.owner, socket.gethostname(), os.getpid(), renewed_at,
                                        self.ttl_s))).encode()

    def _current(self):
        try:
            data, version = self.store.get_versioned(self.key)
        except FileNotFoundError:
            return None, None
        try:
            return Holder(**json.loads(data)), version
        except (ValueError, TypeError):
            return None, version  # unreadable: nobody's

    def acquire(self) -> None:
        """Take the lease or raise RunInUse. Races with another driver are decided by the store's CAS."""
        holder, version = self._current()
        now = self._clock()
        if holder is not None and holder.owner != self.owner and not holder.expired(now) and not holder.dead_here():
            age = now - holder.renewed_at
            raise RunInUse(
                f"run.name={self.run_name} is in use by another driver (pid {holder.pid} on {holder.host}, lease "
                f"renewed {age:.0f} s ago, free in {holder.ttl_s - age:.0f} s unless renewed): {self.store.uri}/{self.key}. Fix: stop that driver, wait for its lease "
                "to run out, or start this run under another run.name")
        self._version = self.store.put_if_version(self.key, self._record(now), version)
        if self._version is None:
            raise RunInUse(f"run.name={self.run_name}: another driver took the lease at the same moment "
                           f"({self.store.uri}/{self.key}); start this run under another run.name")

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost`` set) if another driver holds it now."""
        renewed = self.store.put_if_version(self.key, self._record(self._clock()), self._version)
        if renewed is None:
            holder, renewed = self._current()
            if holder is None or holder.owner != self.owner:  # else: our write landed, its answer was lost
                self.lost.set()
                return False
        self._version = renewed
        return True

    def start_renewing(self) -> "RunLease":
        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        logger.error("Lost the lease of run %s to another driver: this driver stops writing",
                                     self.run_name)
                        return
                except Exception as error:  # storage unreachable: the lease stays ours until it runs out
                    logger.warning("Cannot renew the lease of run %s (%s: %s); retrying", self.run_name,
                                   type(error).__name__, error)

        self._thread = threading.Thread(target=loop, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Give the lease up at once (an expired record), unless another driver holds it now.
        Storage that does not answer is not waited for: the lease then runs out by itself."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s / 3)
        if self.lost.is_set():
            return
        try:
            self.store.put_if_version(self.key, self._record(0.0), self._version)
        except Exception as error:  # noqa: BLE001
            logger.warning("Could not release the lease of run %s (%s: %s); it is free in %.0f s", self.run_name,
                           type(error).__name__, error, self.ttl_s)
