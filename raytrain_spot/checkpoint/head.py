"""The head-node checkpoint store: a Ray actor on the on-demand head.

Workers stream a checkpoint's files here in chunks and commit it; the head verifies every
file against the manifest, publishes it on its own disk (manifest last) and, on its own
cadence, forwards it to durable storage in a background thread. The head is never
preempted, so an upload it has started finishes even if the worker that wrote the
checkpoint is gone. At most one durable upload runs; a newer checkpoint replaces one that
is still waiting (coalescing), so the queue never grows.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Dict, List, Optional

from raytrain_spot.checkpoint.format import CHECKPOINTS_DIR, Manifest, checkpoint_key, read_manifest, verify_file
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.events import EventLog
from raytrain_spot.storage import LocalStore, open_store

logger = logging.getLogger(__name__)

INCOMING = ".incoming"


class HeadStore:
    def __init__(self, root: str, run_name: str, durable_uri: str, keep_latest_k: int, milestone_every: int,
                 durable_interval_s: float, events: EventLog):
        self.run_name = run_name
        self._store = LocalStore(root)
        self.local = StoreTier("head", self._store, run_name, keep_latest_k, milestone_every)
        self.durable = StoreTier("durable", open_store(durable_uri), run_name, keep_latest_k, milestone_every)
        self._durable_interval_s = durable_interval_s
        self._events = events
        self._lock = threading.Condition()
        self._pending: Optional[Manifest] = None
        self._uploading: Optional[int] = None
        self._last_durable_at = float("-inf")
        self.latest_durable_step: Optional[int] = None
        self.failed_uploads = 0
        threading.Thread(target=self._upload_loop, name="durable-upload", daemon=True).start()

    # -- receiving ------------------------------------------------------------------------

    def _incoming(self, key: str, name: str) -> str:
        return self._store.local_path(f"{INCOMING}/{key}/{name}")

    def write_chunk(self, key: str, name: str, offset: int, data: bytes) -> None:
        path = self._incoming(key, name)
        if offset == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if offset == 0 else "r+b") as f:
            f.seek(offset)
            f.write(data)

    def commit(self, key: str, manifest_json: bytes) -> None:
        """Verify what arrived against the manifest, publish it, maybe forward it to durable storage."""
        manifest = Manifest.from_json(manifest_json)
        files = {name: self._incoming(key, name) for name in manifest.files}
        for name, path in files.items():
            verify_file(path, manifest.files[name], name)
        with self._lock:
            self.local.commit(key, files, manifest, move=True)
        self._sweep_incoming(manifest.step)
        if self._durable_due(manifest):
            with self._lock:
                self._pending = manifest  # replaces an older one still waiting
                self._lock.notify_all()

    def _sweep_incoming(self, committed_step: int) -> None:
        """Drop what arrived for this step or older ones: a writer that died mid-transfer never
        comes back for its partial files."""
        incoming = self._store.local_path(f"{INCOMING}/{self.run_name}/{CHECKPOINTS_DIR}")
        for name in os.listdir(incoming) if os.path.isdir(incoming) else []:
            if name.startswith("step_") and int(name[len("step_"):]) <= committed_step:
                shutil.rmtree(os.path.join(incoming, name), ignore_errors=True)

    def _durable_due(self, manifest: Manifest) -> bool:
        milestone = self.local.milestone_every and manifest.step % self.local.milestone_every == 0
        return (manifest.kind == "final" or milestone
                or time.time() - self._last_durable_at >= self._durable_interval_s)

    # -- forwarding to durable storage ----------------------------------------------------

    def _upload_loop(self) -> None:
        while True:
            with self._lock:
                while self._pending is None:
                    self._lock.wait()
                manifest, self._pending = self._pending, None
                self._uploading = manifest.step
                self.local.pinned.add(manifest.step)  # retention must not delete what is being read
            key = checkpoint_key(self.run_name, manifest.step)
            started = time.time()
            try:
                files = {name: self._store.local_path(f"{key}/{name}") for name in manifest.files}
                self.durable.commit(key, files, manifest)
                self._last_durable_at = started
                self.latest_durable_step = manifest.step
                self._events.emit("checkpoint", step=manifest.step, tier="durable", kind=manifest.kind, stall_s=0.0,
                                  duration_s=time.time() - manifest.created_at, bytes=_size(manifest))
                logger.info("Checkpoint step %d uploaded to %s in %.2f s", manifest.step, self.durable.store.uri,
                            time.time() - started)
            except Exception:  # the previous durable checkpoint stays the latest; the next one retries
                self.failed_uploads += 1
                logger.warning("Upload of checkpoint step %d to %s failed; the previous one stays the latest",
                               manifest.step, self.durable.store.uri, exc_info=True)
            finally:
                with self._lock:
                    self.local.pinned.discard(manifest.step)
                    self._uploading = None
                    self._lock.notify_all()

    def wait_for_uploads(self, timeout_s: float) -> Optional[int]:
        """Block until no upload is waiting or running; return the newest step in durable storage."""
        deadline = time.time() + timeout_s
        with self._lock:
            while (self._pending is not None or self._uploading is not None) and time.time() < deadline:
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
                     durable_interval_s: float, events: EventLog):
    """The HeadStore actor, on this (the driver's, i.e. the head) node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(num_cpus=0, max_concurrency=8)(HeadStore)
    return actor_cls.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(root, run_name, durable_uri, keep_latest_k, milestone_every, durable_interval_s, events)
