"""One driver owns a run name at a time: a lease object in the run's durable storage.

A second driver started by mistake with the same ``run.name``, or a zombie driver still alive
after its head was replaced, would otherwise write checkpoints into the same directories. The
driver takes ``<run>/lease.json`` with a compare-and-swap write (a GCS generation
precondition; an flock'd replace on a filesystem), renews it every ``ttl_s / 3`` the same
way, and gives it up at the end.

No clock of another host is trusted: a lease is expired when its observer has seen the same
version (generation) unchanged for ``ttl_s`` on its own monotonic clock, so a holder whose wall
clock is off still holds its lease while it renews. A starting driver therefore watches a held
lease: it is refused as soon as the version moves (the holder is alive), and takes the lease
once it stood still for ``ttl_s``. A released lease, and one held by a dead process on this
machine (a SIGKILLed driver resumed at once), are free at once.

The holder judges itself on its own monotonic clock too: once ``ttl_s`` less ``STOP_MARGIN``
of it passes since the start of its last successful renewal, it counts the lease as lost before
any observer can count it free, and stops training and the head's durable uploads; a renewal
that hangs on storage is not waited for. Writers of durable storage (the head, workers without
a head) check that the lease is still this driver's before each durable publish and retention
(``LeaseGuard``).
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
STOP_MARGIN = 1 / 6
"""The holder counts its lease lost this share of ``ttl_s`` before an observer may count it free:
the time its training and uploads have to stop."""


class RunInUse(RuntimeError):
    """Another live driver holds the run's lease; the message names it and the fix."""


class LeaseLost(RuntimeError):
    """This driver no longer holds the run's lease: it must not write durable storage."""


@dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int
    ttl_s: float
    released: bool = False

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


def read_holder(store: Store, key: str):
    """(holder, version) of the lease at ``key``; (None, None) if absent, (None, version) if unreadable."""
    try:
        data, version = store.get_versioned(key)
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(data)
        return Holder(**{name: record[name] for name in Holder.__dataclass_fields__ if name in record}), version
    except (ValueError, TypeError, KeyError):
        return None, version  # unreadable: nobody's


class RunLease:
    """This driver's lease. ``clock`` is monotonic and this host's own; ``sleep`` waits on it."""

    def __init__(self, store: Store, run_name: str, ttl_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.store = store
        self.run_name = run_name
        self.key = f"{run_name}/{LEASE_FILE}"
        self.ttl_s = ttl_s
        self._clock = clock
        self._sleep = sleep
        self.owner = uuid.uuid4().hex
        self._version: Optional[str] = None
        self._renewed_at = float("-inf")  # this clock, at the start of the last successful write
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self, released: bool = False) -> bytes:
        return json.dumps(asdict(Holder(self.owner, socket.gethostname(), os.getpid(), self.ttl_s,
                                        released))).encode()

    def acquire(self) -> None:
        """Take the lease or raise RunInUse. A lease held by another driver is watched until its
        version moves (refused) or stands still for its TTL on this clock (taken). Races with
        another driver are decided by the store's CAS."""
        holder, version = read_holder(self.store, self.key)
        seen_since = self._clock()
        while holder is not None and not holder.released and holder.owner != self.owner and not holder.dead_here():
            if self._clock() - seen_since > holder.ttl_s:
                logger.warning("The lease of run %s (pid %d on %s) was not renewed for %.0f s: taking it over",
                               self.run_name, holder.pid, holder.host, holder.ttl_s)
                break
            self._sleep(min(holder.ttl_s, self.ttl_s) / 20)
            now_holder, now_version = read_holder(self.store, self.key)
            if now_version != version:
                if now_holder is not None and not now_holder.released and now_holder.owner != self.owner:
                    raise RunInUse(
                        f"run.name={self.run_name} is in use by another driver (pid {now_holder.pid} on "
                        f"{now_holder.host}, renewing its lease {self.store.uri}/{self.key}). Fix: stop that "
                        "driver, or start this run under another run.name")
                holder, version, seen_since = now_holder, now_version, self._clock()
        started = self._clock()
        self._version = self.store.put_if_version(self.key, self._record(), version)
        if self._version is None:
            raise RunInUse(f"run.name={self.run_name}: another driver took the lease at the same moment "
                           f"({self.store.uri}/{self.key}); start this run under another run.name")
        self._renewed_at = started

    def held(self) -> bool:
        """Whether this driver may still write: not lost, and renewed recently enough on this clock
        that no observer can have counted the lease free. Sets ``lost`` once it is not."""
        if not self.lost.is_set() and self._clock() - self._renewed_at > self.ttl_s * (1 - STOP_MARGIN):
            logger.error("The lease of run %s was not renewed for %.0f s: this driver stops writing",
                         self.run_name, self._clock() - self._renewed_at)
            self.lost.set()
        return not self.lost.is_set()

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost`` set) if another driver holds it now or this one
        held it too long without a renewal."""
        if not self.held():
            return False
        started = self._clock()
        renewed = self.store.put_if_version(self.key, self._record(), self._version)
        if renewed is None:
            holder, renewed = read_holder(self.store, self.key)
            if holder is None or holder.owner != self.owner:  # else: our write landed, its answer was lost
                logger.error("Lost the lease of run %s to another driver: this driver stops writing", self.run_name)
                self.lost.set()
                return False
        self._version = renewed
        self._renewed_at = started
        return self.held()

    def start_renewing(self) -> "RunLease":
        """Renew every ``ttl_s / 3`` in the background, each renewal in a thread of its own: one
        that hangs on storage is not waited for (nor a second started beside it), and ``held``,
        checked often, stops this driver at the deadline whatever storage does."""
        def attempt() -> None:
            try:
                self.renew()
            except Exception as error:  # storage unreachable: the lease stays ours until the deadline
                logger.warning("Cannot renew the lease of run %s (%s: %s); retrying", self.run_name,
                               type(error).__name__, error)

        def loop() -> None:
            due = self._clock() + self.ttl_s / 3
            pending: Optional[threading.Thread] = None
            while not self._stop.wait(self.ttl_s / 30) and self.held():
                if self._clock() >= due and (pending is None or not pending.is_alive()):
                    pending = threading.Thread(target=attempt, name="run-lease-renewal", daemon=True)
                    pending.start()
                    due = self._clock() + self.ttl_s / 3

        self._thread = threading.Thread(target=loop, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Give the lease up at once (a released record), unless another driver holds it now.
        Storage that does not answer is not waited for: the lease then runs out by itself."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s / 3)
        if self.lost.is_set():
            return
        try:
            self.store.put_if_version(self.key, self._record(released=True), self._version)
        except Exception as error:  # noqa: BLE001
            logger.warning("Could not release the lease of run %s (%s: %s); it is free in %.0f s", self.run_name,
                           type(error).__name__, error, self.ttl_s)


class LeaseGuard:
    """The check a durable writer makes before it publishes or deletes: the run's lease is still
    ``owner``'s (another driver that took the run over has written its own owner there)."""

    def __init__(self, store: Store, run_name: str, owner: str):
        self.store = store
        self.key = f"{run_name}/{LEASE_FILE}"
        self.owner = owner

    def __call__(self) -> None:
        holder, _ = read_holder(self.store, self.key)
        if holder is None or holder.released or holder.owner != self.owner:
            raise LeaseLost(f"{self.store.uri}/{self.key} is no longer this driver's lease (now: "
                            f"{'nobody' if holder is None or holder.released else f'pid {holder.pid} on {holder.host}'}): "
                            "another driver runs this run; this one writes nothing more")
