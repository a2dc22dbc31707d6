"""The head-node checkpoint store: a Ray actor on the on-demand head.

Workers stream a checkpoint's files here in chunks and commit it; the head verifies every
file against the manifest, publishes it on its own disk (manifest last) and, on its own
cadence, forwards it to durable storage in a background thread. The head is never
preempted, so an upload it has started finishes even if the worker that wrote the
checkpoint is gone. At most one durable upload runs; a newer checkpoint replaces an older
one still waiting (coalescing), except a milestone or the final one, which always go
(``UploadQueue``), so the queue stays short. Before each durable publish and retention the head
checks that the run's lease is still its driver's (checkpoint/lease.py); once another driver
owns the run, the head uploads nothing more.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Dict, List, Optional

from raytrain_spot.checkpoint.lease import LeaseGuard, LeaseLost
from raytrain_spot.checkpoint.format import (CHECKPOINTS_DIR, Manifest, checkpoint_key, read_manifest, stored_key,
                                           verify_file)
from raytrain_spot.checkpoint.scratch import private_dir
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.observe.events import EventLog
from raytrain_spot.observe.records import Checkpoint, CheckpointFailed
from raytrain_spot.storage import open_store
from raytrain_spot.storage.store import LocalStore

logger = logging.getLogger(__name__)

INCOMING = ".incoming"
RETRY_BACKOFF_S = (1.0, 60.0)
"""First and longest wait before a failed durable upload is tried again (doubling)."""


class UploadQueue:
    """Checkpoints waiting to be forwarded to durable storage, oldest first.

    A newer checkpoint replaces the ordinary one still waiting; milestones and the final
    checkpoint are kept whatever follows them."""

    def __init__(self, milestone_every: int):
        self.milestone_every = milestone_every
        self._waiting: List[Manifest] = []

    def always_uploaded(self, manifest: Manifest) -> bool:
        """The final checkpoint and milestones: never coalesced away, due whatever the interval."""
        return manifest.kind == "final" or bool(self.milestone_every and manifest.step % self.milestone_every == 0)

    def offer(self, manifest: Manifest) -> None:
        self._waiting = [m for m in self._waiting
                         if m.step != manifest.step and (self.always_uploaded(m) or m.step > manifest.step)]
        self._waiting.append(manifest)
        self._waiting.sort(key=lambda m: m.step)

    def take(self) -> Optional[Manifest]:
        return self._waiting.pop(0) if self._waiting else None

    def retry(self, manifest: Manifest) -> None:
        """Queue a failed upload again, unless a newer checkpoint waiting makes it pointless."""
        if self.always_uploaded(manifest) or not any(m.step > manifest.step for m in self._waiting):
            self.offer(manifest)

    def __bool__(self) -> bool:
        """Whether a checkpoint waits for its upload."""
        return bool(self._waiting)


class HeadStore:
    def __init__(self, root: str, run_name: str, durable_uri: str, keep_latest_k: int, milestone_every: int,
                 durable_interval_s: float, events: EventLog, lease_owner: Optional[str] = None):
        self.run_name = run_name
        self._store = LocalStore(private_dir(root, "checkpoint.head_dir"))
        self.local = StoreTier("head", self._store, run_name, keep_latest_k, milestone_every)
        durable = open_store(durable_uri)
        self._lease_guard = LeaseGuard(durable, run_name, lease_owner) if lease_owner else None
        self.durable = StoreTier("durable", durable, run_name, keep_latest_k, milestone_every,
                                 lease_check=self._check_lease)
        self.lease_lost = False
        self._durable_interval_s = durable_interval_s
        self._events = events
        self._lock = threading.Condition()
        self._pending = UploadQueue(milestone_every)
        self._uploading: Optional[int] = None
        self._last_durable_at = float("-inf")
        self.latest_durable_step: Optional[int] = None
        self.failed_uploads = 0
        self._retry_at = 0.0
        self._retry_delay_s = RETRY_BACKOFF_S[0]
        self._caught_up = threading.Event()
        threading.Thread(target=self._upload_loop, name="durable-upload", daemon=True).start()

    # -- receiving ------------------------------------------------------------------------

    def _incoming(self, key: str, name: str) -> str:
        return self._store.local_path(f"{INCOMING}/{key}/{name}")

    def write_chunk(self, key: str, name: str, offset: int, data: bytes) -> None:
        path = self._incoming(key, name)
        try:
            if offset == 0:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb" if offset == 0 else "r+b") as f:
                f.seek(offset)
                f.write(data)
        except OSError:  # a full disk: free what this checkpoint took, so the next one has room
            self.drop_incoming(key)
            raise

    def drop_incoming(self, key: str) -> None:
        """Free what arrived for ``key``: a failed or committed transfer, or one a writer gave up
        (a more urgent save took its place)."""
        shutil.rmtree(self._store.local_path(f"{INCOMING}/{key}"), ignore_errors=True)

    def commit(self, key: str, manifest_json: bytes) -> bytes:
        """Verify what arrived against the manifest, publish it, maybe forward it to durable
        storage. Returns the manifest the head now holds for ``key`` (a valid copy already
        there is kept). What arrived is dropped either way, so a failed commit frees its disk."""
        manifest = Manifest.from_json(manifest_json)
        files = {name: self._incoming(key, name) for name in manifest.files}
        try:
            for name, path in files.items():
                verify_file(path, manifest.files[name], name)
            with self._lock:
                committed = self.local.commit(key, files, manifest, move=True)
        finally:
            self.drop_incoming(key)
        self._sweep_incoming(committed.step)
        if self._durable_due(committed) and not self.lease_lost:
            with self._lock:
                self._pending.offer(committed)
                self._lock.notify_all()
        return committed.to_json()

    def _sweep_incoming(self, committed_step: int) -> None:
        """Drop what arrived for this step or older ones: a writer that died mid-transfer never
        comes back for its partial files."""
        incoming = self._store.local_path(f"{INCOMING}/{self.run_name}/{CHECKPOINTS_DIR}")
        for name in os.listdir(incoming) if os.path.isdir(incoming) else []:
            if name.startswith("step_") and int(name[len("step_"):]) <= committed_step:
                shutil.rmtree(os.path.join(incoming, name), ignore_errors=True)

    def _durable_due(self, manifest: Manifest) -> bool:
        return (self._pending.always_uploaded(manifest)
                or time.time() - self._last_durable_at >= self._durable_interval_s)

    # -- forwarding to durable storage ----------------------------------------------------

    def _check_lease(self) -> None:
        if self.lease_lost:
            raise LeaseLost(f"the driver of run {self.run_name} no longer holds its lease")
        if self._lease_guard is not None:
            self._lease_guard()

    def stop_uploads(self) -> None:
        """The driver's lease ran out: nothing more goes to durable storage, from now on."""
        with self._lock:
            self.lease_lost = True
            self._pending = UploadQueue(self._pending.milestone_every)

    def _catch_up(self) -> None:
        """At start: a newest head checkpoint that durable storage lacks (an outage, a driver that
        died before the upload) goes first."""
        try:
            held, _ = self.local.committed_and_partial()
            stored, _ = self.durable.committed_and_partial()
            if held and (not stored or held[0] > stored[0]):
                manifest = read_manifest(self._store, checkpoint_key(self.run_name, held[0]))
                logger.info("Durable storage lacks the head's newest checkpoint (step %d): uploading it", held[0])
                with self._lock:
                    self._pending.offer(manifest)
            self.latest_durable_step = stored[0] if stored else None
        except Exception as error:  # noqa: BLE001 - storage down at start: the next commit uploads anyway
            logger.warning("Cannot compare the head's checkpoints with durable storage: %s: %s",
                           type(error).__name__, error)
        finally:
            self._caught_up.set()

    def _upload_loop(self) -> None:
        self._catch_up()
        while True:
            with self._lock:
                while not self._pending or time.time() < self._retry_at:
                    self._lock.wait(timeout=max(self._retry_at - time.time(), 0.05) if self._pending else None)
                manifest = self._pending.take()
                self._uploading = manifest.step
                self.local.pinned.add(manifest.step)  # retention must not delete what is being read
            key = checkpoint_key(self.run_name, manifest.step)
            started = time.time()
            try:
                files = {name: self._store.local_path(stored_key(key, name, entry))
                         for name, entry in manifest.files.items()}
                self.durable.commit(key, files, manifest)
                self._last_durable_at = started
                self.latest_durable_step = max(self.latest_durable_step or 0, manifest.step)
                self._retry_delay_s = RETRY_BACKOFF_S[0]
                self._events.emit(Checkpoint(step=manifest.step, tier="durable", kind=manifest.kind, stall_s=0.0,
                                             duration_s=time.time() - manifest.created_at, bytes=_size(manifest)))
                logger.info("Checkpoint step %d uploaded to %s in %.2f s", manifest.step, self.durable.store.uri,
                            time.time() - started)
            except LeaseLost as lost:  # another driver owns the run: what this head holds is not uploaded
                logger.error("Checkpoint step %d not uploaded: %s", manifest.step, lost)
                with self._lock:
                    self.lease_lost = True
                    self._pending = UploadQueue(self._pending.milestone_every)
            except Exception as error:  # the previous durable checkpoint stays the latest; this one is retried
                self.failed_uploads += 1
                logger.warning("Upload of checkpoint step %d to %s failed; the previous one stays the latest, "
                               "retry in %.0f s", manifest.step, self.durable.store.uri, self._retry_delay_s,
                               exc_info=True)
                self._events.emit(CheckpointFailed(step=manifest.step, kind=manifest.kind, tier="durable",
                                                   error=f"{type(error).__name__}: {error}",
                                                   retry_in_s=self._retry_delay_s))
                with self._lock:
                    self._pending.retry(manifest)
                    self._retry_at = time.time() + self._retry_delay_s
                    self._retry_delay_s = min(2 * self._retry_delay_s, RETRY_BACKOFF_S[1])
            finally:
                with self._lock:
                    self.local.pinned.discard(manifest.step)
                    self._uploading = None
                    self._lock.notify_all()

    def wait_for_uploads(self, timeout_s: float) -> Optional[int]:
        """Block until no upload is waiting or running; return the newest step in durable storage."""
        deadline = time.time() + timeout_s
        self._caught_up.wait(timeout_s)
        with self._lock:
            while (self._pending or self._uploading is not None) and time.time() < deadline:
                self._lock.wait(timeout=max(deadline - time.time(), 0.01))
        return self.latest_durable_step

    # -- serving --------------------------------------------------------------------------

    def steps(self) -> List[int]:
        return self.local.steps(self.run_name)

    def read_manifest(self, key: str) -> bytes:
        return read_manifest(self._store, key).to_json()

    def read_chunk(self, key: str, name: str, offset: int, size: int) -> bytes:
        with open(self._store.local_path(f"{key}/{name}"), "rb") as f:
            f.seek(offset)
            return f.read(size)

    def stats(self) -> Dict[str, Optional[int]]:
        return {"latest_durable_step": self.latest_durable_step, "failed_uploads": self.failed_uploads}


def _size(manifest: Manifest) -> int:
    return sum(entry.size for entry in manifest.files.values())


def start_head_store(root: str, run_name: str, durable_uri: str, keep_latest_k: int, milestone_every: int,
                     durable_interval_s: float, events: EventLog, lease_owner: Optional[str] = None):
    """The HeadStore actor, on this (the driver's, i.e. the head) node; ``lease_owner``: the
    driver's lease (durable writes stop once the run's lease is another's)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(num_cpus=0, max_concurrency=8)(HeadStore)
    return actor_cls.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(root, run_name, durable_uri, keep_latest_k, milestone_every, durable_interval_s, events, lease_owner)
