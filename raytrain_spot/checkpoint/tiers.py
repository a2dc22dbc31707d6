"""Checkpoint tiers, fastest first: node-local disk, the on-demand head node, durable storage.

Every tier commits the same way (data files, then the manifest) and hands back only
verified files. ``local`` survives a worker-process restart but not the node;
``head`` survives any Spot loss (the head is on-demand) and is reached over Ray;
``durable`` (``storage.uri``: a bucket or a directory) survives the cluster.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from typing import Callable, Dict, List, Optional, Protocol, Tuple

from raytrain_spot.checkpoint.format import (
    MANIFEST,
    InvalidCheckpoint,
    Manifest,
    checkpoint_key,
    fetch_verified,
    listed_steps,
    publish_manifest,
    stored_key,
    upload_files,
    verify_file,
    verify_stored,
    writer_objects,
)
from raytrain_spot.storage.store import LocalStore, Store

logger = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # per Ray call to the head; several raylets share a small object store


class CommitConflict(RuntimeError):
    """Another writer's manifest for the same step landed first; nothing of ours replaced it."""


class SaveCancelled(Exception):
    """A more urgent save (just-in-time, at a notice) took this one's place; nothing was committed."""


class Transfer:
    """How a save travels: ``urgent`` ones (just-in-time, final) ignore the transfer cap; a set
    ``cancelled`` stops one between two chunks."""

    def __init__(self, urgent: bool = False, cancelled: Optional[threading.Event] = None):
        self.urgent = urgent
        self.cancelled = cancelled or threading.Event()


ORDINARY = Transfer()


class Tier(Protocol):
    name: str

    def commit(self, key: str, files: Dict[str, str], manifest: Manifest, move: bool = False,
               transfer: Transfer = ORDINARY) -> Manifest:
        """Store the files, then the manifest; then apply retention. Return the manifest the
        tier now holds for ``key``: ``manifest``, or the one of a valid copy already there
        (a valid checkpoint is never rewritten; a damaged one is replaced). ``move``: the files
        are scratch copies the tier may take (rename) instead of copying. Raise SaveCancelled
        when ``transfer.cancelled`` is set before the manifest is written."""

    def put(self, key: str, files: Dict[str, str]) -> Dict[str, str]:
        """Store data files only: one writer's part of a checkpoint that several write. Return the
        names they are stored under where not their own (the manifest lists them: ``FileEntry.object``)."""

    def publish(self, key: str, manifest: Manifest) -> None:
        """Write the manifest of files already put (by every writer), then apply retention.
        Raise CommitConflict if a manifest for ``key`` is already there (then the files put under
        writer-unique names are deleted: the other writer's commit stands untouched)."""

    def steps(self, run_name: str) -> List[int]:
        """Checkpoint steps present (not yet validated), newest first."""

    def fetch(self, key: str, scratch_dir: str) -> Tuple[Manifest, Dict[str, str]]:
        """Verified local copies of a checkpoint's files; raise InvalidCheckpoint otherwise."""


def steps_to_delete(committed: List[int], partial: List[int], keep_latest_k: int, milestone_every: int) -> List[int]:
    """Retention over a tier's step directories (both lists newest first).

    Only commits that verify count and are kept: the newest k and every milestone. A partial or
    damaged directory (no manifest: a save that died; or files that no longer match it) goes once
    a newer step has a valid commit, because saves commit in step order and it can never complete;
    a newer one may still be in flight and stays. So the newest valid commit is never deleted."""
    drop = [s for s in committed[keep_latest_k:] if not (milestone_every and s % milestone_every == 0)]
    newest = committed[0] if committed else None
    return sorted(drop + [s for s in partial if newest is not None and s < newest], reverse=True)


class StoreTier:
    """A tier over a Store: node-local disk (a LocalStore) or durable storage (local or GCS)."""

    def __init__(self, name: str, store: Store, run_name: str, keep_latest_k: int, milestone_every: int = 0,
                 lease_check: Optional[Callable[[], None]] = None):
        self.name = name
        self.store = store
        self.run_name = run_name
        self.keep_latest_k = keep_latest_k
        self.milestone_every = milestone_every
        self.pinned: set[int] = set()  # steps retention must keep for now (being read)
        # Durable storage: raises (checkpoint/lease.py's LeaseLost) once another driver owns the run.
        self._lease_check = lease_check or (lambda: None)

    def commit(self, key: str, files: Dict[str, str], manifest: Manifest, move: bool = False,
               transfer: Transfer = ORDINARY) -> Manifest:
        # A store upload is neither paced nor cut short: only the manifest waits for the check.
        if self.store.exists(f"{key}/{MANIFEST}"):
            try:
                return self.verified(key)  # a valid checkpoint is never rewritten
            # Only a copy shown damaged is replaced; any other failure of the check (storage
            # unreachable, a full disk) raises, and the caller retries: the copy may be fine.
            except InvalidCheckpoint as why:
                logger.warning("The %s tier's copy of %s is damaged (%s); replacing it", self.name, key, why)
            self._lease_check()
            self.store.delete_prefix(key)
        manifest = manifest.stored_as(writer_objects(files))
        if move and isinstance(self.store, LocalStore):
            for name, path in files.items():
                self.store.adopt(stored_key(key, name, manifest.files[name]), path)
        else:
            upload_files(self.store, key, {manifest.files[name].object: path for name, path in files.items()})
        if transfer.cancelled.is_set():
            self._drop_own(key, manifest)
            raise SaveCancelled(key)
        try:
            self.publish(key, manifest)
        except CommitConflict:
            return self.verified(key)  # another writer's commit won the race: ours is gone, theirs stands
        return manifest

    def verified(self, key: str) -> Manifest:
        """The manifest of ``key`` if its files verify where they are stored (``verify_stored``: no
        download of data) and, if sharded, its DCP metadata (small, read into memory) describes
        exactly the manifest's shards. Raise InvalidCheckpoint when the copy is damaged."""
        manifest = verify_stored(self.store, key)
        if manifest.sharded:
            from raytrain_spot.checkpoint.sharded import METADATA_FILE, check_metadata, parse_metadata

            if METADATA_FILE not in manifest.files:
                raise InvalidCheckpoint(f"sharded, but the manifest lists no {METADATA_FILE}")
            try:
                metadata = parse_metadata(self.store.get_bytes(stored_key(key, METADATA_FILE,
                                                                          manifest.files[METADATA_FILE])))
            except pickle.UnpicklingError as error:
                raise InvalidCheckpoint(f"cannot read {METADATA_FILE}: {error}") from None
            check_metadata(metadata, manifest.files)
        return manifest

    def put(self, key: str, files: Dict[str, str]) -> Dict[str, str]:
        objects = writer_objects(files)
        upload_files(self.store, key, {objects[name]: path for name, path in files.items()})
        return objects

    def publish(self, key: str, manifest: Manifest) -> None:
        self._lease_check()
        if not publish_manifest(self.store, key, manifest):
            self._drop_own(key, manifest)
            raise CommitConflict(f"{self.store.uri}/{key} was committed by another writer meanwhile")
        self.apply_retention()

    def _drop_own(self, key: str, manifest: Manifest) -> None:
        """Delete the data of a manifest that never became the commit: only files stored under a
        writer's own names, which no other writer uses."""
        for name, entry in manifest.files.items():
            if entry.object:
                self.store.delete_prefix(stored_key(key, name, entry))

    def apply_retention(self) -> None:
        committed, partial = self.committed_and_partial()
        self._lease_check()
        for step in steps_to_delete(committed, partial, self.keep_latest_k, self.milestone_every):
            if step not in self.pinned:
                self.store.delete_prefix(checkpoint_key(self.run_name, step))

    def committed_and_partial(self) -> Tuple[List[int], List[int]]:
        """This run's step directories, newest first: the commits that verify (``verified``), and
        those with no manifest or damaged files. A step whose check fails otherwise (storage
        unreachable) is in neither: retention neither counts nor deletes what it could not check."""
        committed, broken = [], []
        for step in listed_steps(self.store, self.run_name):
            try:
                self.verified(checkpoint_key(self.run_name, step))
                committed.append(step)
            except InvalidCheckpoint:
                broken.append(step)
            except Exception as error:  # noqa: BLE001 - unchecked is neither kept as valid nor deleted
                logger.warning("Cannot check the %s tier's step %d for retention: %s: %s", self.name, step,
                               type(error).__name__, error)
        return committed, broken

    def steps(self, run_name: str) -> List[int]:
        return listed_steps(self.store, run_name)

    def fetch(self, key: str, scratch_dir: str) -> Tuple[Manifest, Dict[str, str]]:
        return fetch_verified(self.store, key, scratch_dir)


class HeadTier:
    """The head node's store, reached through the HeadStore actor (see checkpoint/head.py).

    The head applies retention, and forwards commits to durable storage, on its side.
    """

    name = "head"

    def __init__(self, actor, max_bytes_per_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.actor = actor
        self.max_bytes_per_s = max_bytes_per_s
        self._clock = clock
        self._sleep = sleep

    def commit(self, key: str, files: Dict[str, str], manifest: Manifest, move: bool = False,
               transfer: Transfer = ORDINARY) -> Manifest:
        import ray

        self.put(key, files, transfer)
        return Manifest.from_json(ray.get(self.actor.commit.remote(key, manifest.to_json())))

    def put(self, key: str, files: Dict[str, str], transfer: Transfer = ORDINARY) -> Dict[str, str]:
        """The head receives files under their own names and stores them under its own at commit."""
        import ray

        started, sent = self._clock(), 0
        paced = self.max_bytes_per_s is not None and not transfer.urgent
        chunk_bytes = self._paced_chunk_bytes() if paced else CHUNK_BYTES
        for name, path in files.items():
            with open(path, "rb") as f:
                offset = 0
                while chunk := f.read(chunk_bytes):
                    if transfer.cancelled.is_set():
                        ray.get(self.actor.drop_incoming.remote(key))
                        raise SaveCancelled(key)
                    ray.get(self.actor.write_chunk.remote(key, name, offset, chunk))
                    offset += len(chunk)
                    sent += len(chunk)
                    if paced:
                        self._pace(started, sent)
        return {}

    def publish(self, key: str, manifest: Manifest) -> None:
        import ray

        ray.get(self.actor.commit.remote(key, manifest.to_json()))

    def _paced_chunk_bytes(self) -> int:
        return max(1 << 16, min(CHUNK_BYTES, int(self.max_bytes_per_s / 10)))  # ~10 chunks a second

    def _pace(self, started: float, sent: int) -> None:
        """Keep the transfer under the rate limit, so checkpoints never starve training's network."""
        ahead = sent / self.max_bytes_per_s - (self._clock() - started)
        if ahead > 0:
            self._sleep(ahead)

    def steps(self, run_name: str) -> List[int]:
        import ray

        return ray.get(self.actor.steps.remote())

    def fetch(self, key: str, scratch_dir: str) -> Tuple[Manifest, Dict[str, str]]:
        import ray

        manifest = Manifest.from_json(ray.get(self.actor.read_manifest.remote(key)))
        paths = {}
        for name, expected in manifest.files.items():
            path = os.path.join(scratch_dir, name)
            with open(path, "wb") as f:
                for offset in range(0, expected.size, CHUNK_BYTES):
                    f.write(ray.get(self.actor.read_chunk.remote(key, expected.object or name, offset,
                                                                 CHUNK_BYTES)))
            verify_file(path, expected, name)
            paths[name] = path
        return manifest, paths
