"""Saving and restoring the training state of one worker, across the checkpoint tiers.

A save stalls training only for a copy of the state into reused host buffers; a background
thread serializes it, publishes it on node-local disk and ships it to the head node (which
forwards it to durable storage). At most one save is in flight: a periodic save asked for
while one is running is deferred until it finishes, never queued.

With ``sharded``, every rank snapshots and writes its share of the tensors (see
``sharded.py``) to the first shared tier, and rank 0 publishes the manifest once every
share has arrived.

Restore is collective: rank 0 picks the newest checkpoint that verifies on the fastest tier
it can reach and every rank loads that step from the fastest tier holding a valid copy; a
rank that has none receives the state from rank 0.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from raytrain_spot.checkpoint.format import (
    STATE_FILE,
    FileEntry,
    Manifest,
    WriteCancelled,
    checkpoint_key,
    checkpoint_name,
    file_entry,
    load_state,
    write_state,
)
from raytrain_spot.checkpoint.sharded import (
    apply_sharded,
    load_sharded,
    owned_keys,
    sharded_state,
    tensor_bytes,
    write_shard,
)
from raytrain_spot.checkpoint.scratch import private_dir, scratch_prefix, sweep_orphans
from raytrain_spot.checkpoint.snapshot import HostSnapshot
from raytrain_spot.checkpoint.state import LoopState, Stateful, load_training_state, training_state
from raytrain_spot.checkpoint.tiers import SaveCancelled, Tier, Transfer
from raytrain_spot.distributed.collectives import RankGroup
from raytrain_spot.observe.events import EventLog
from raytrain_spot.observe.records import Checkpoint, CheckpointCancelled, CheckpointFailed, RestoreMismatch

logger = logging.getLogger(__name__)
# Where a save is staged when this node's disk is full: memory-backed on Linux.
MEMORY_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass
class Restored:
    loop: LoopState
    tier: str
    manifest: Manifest
    duration_s: float
    read_s: float
    """Of ``duration_s``, this rank's own work: reading, verifying and applying its copy."""


@dataclass
class SaveRequest:
    loop: LoopState
    world_size: int
    kind: str  # periodic | jit | final | survivor (loop/survivor_commit.py)
    reason: str = ""  # jit: preemption | regrow
    shared: bool = True
    """False: the node-local copies alone (a handoff's, when nodes that stay keep one: the next group
    restores from them from the node's page cache and copies the step on to the shared tiers, ``replicate``)."""


class CheckpointManager:
    """One per worker. ``local`` is this node's tier (or None); ``shared`` are tiers every node
    reaches, fastest first (the head, then durable storage; just durable without a head)."""

    def __init__(self, run_name: str, config: Dict[str, Any], local: Optional[Tier], shared: List[Tier],
                 writes_local: bool, events: EventLog, compression: str = "none", scratch_root: Optional[str] = None,
                 sharded: bool = False, group: Optional[RankGroup] = None):
        self.run_name = run_name
        # Restore's collectives; None: the default process group, gloo on the CPU (tests, benchmarks).
        self.group = group or RankGroup(torch.device("cpu"))
        self.compression = compression
        self.sharded = sharded
        # Sharded saves run DCP's collectives from the background thread: on a group of their own,
        # so they never interleave with training's.
        self._save_group = dist.new_group(backend="gloo") if sharded else None
        self.config = config
        self.local = local
        self.shared = shared
        self.writes_local = writes_local and local is not None
        self.events = events
        # The directory as created: a path through a directory that does not exist yet (``a/../b``)
        # is made lexically, and mkdtemp under the unresolved path would fail.
        self.scratch_root = private_dir(scratch_root, "checkpoint.local_dir") if scratch_root else None
        if self.scratch_root:
            sweep_orphans(self.scratch_root)
        sweep_orphans(MEMORY_SCRATCH)  # a worker killed mid-save leaves its scratch directory behind
        self._snapshot = HostSnapshot()
        self._thread: Optional[threading.Thread] = None
        self._transfer = Transfer()  # of the save in flight
        self.deferred: Optional[SaveRequest] = None
        self.committed_step = 0  # newest step this rank committed to a shared tier
        self.local_step = 0  # newest step this rank committed to its node's tier
        # The training thread and a survivor's commit (loop/survivor_commit.py) both save: one at a time.
        self._save_lock = threading.Lock()
        self.last_save_step = -1
        self.stall_s: List[float] = []
        self.commit_s: List[float] = []

    # -- saving ---------------------------------------------------------------------------

    @property
    def keeps_node_copies(self) -> bool:
        """Every node's local writer keeps a whole copy of each save on its node."""
        return self.local is not None and not self.sharded

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(self, parts: Mapping[str, Stateful], request: SaveRequest, writer: bool, wait: bool = False,
             after: Optional["torch.cuda.Event"] = None) -> float:
        """Snapshot ``parts`` and the request's loop state now and write in the background; return the stall. ``writer`` also writes the
        shared tiers. ``wait`` blocks until every tier this rank writes has committed. ``after``: see
        ``HostSnapshot.take``.

        Sharded, every rank saves every step asked for (their DCP collectives must pair up): a
        save still in flight is waited for, not deferred.
        """
        if not writer and not self.writes_local and not self.sharded:
            return 0.0
        with self._save_lock:
            return self._save(parts, request, writer, wait, after)

    def _save(self, parts: Mapping[str, Stateful], request: SaveRequest, writer: bool, wait: bool,
              after: Optional["torch.cuda.Event"]) -> float:
        if self.busy and not wait and not self.sharded:
            self.deferred = request
            return 0.0
        urgent = request.kind != "periodic"  # the group is about to restart or end
        if urgent and not self._transfer.urgent and not self.sharded:
            self.cancel()  # sharded saves pair up: they finish
        # A handoff's node copies end the group: its state no longer moves, so it is written as it is (no
        # snapshot), beside the save it cancelled, whose thread ends with the process (a save cut short
        # anywhere leaves no manifest: it never existed). Waiting for it took seconds at a few GB.
        ending = not request.shared and not self.sharded
        if not ending:
            self.wait()
        self._transfer = Transfer(urgent=urgent)
        started = time.perf_counter()
        request = replace(request, loop=replace(request.loop))
        if ending:
            write, args = self._write, (training_state(parts, request.loop), request, writer, self._transfer)
        elif self.sharded:
            tensors, rest = sharded_state(parts, request.loop)
            owned = owned_keys(tensor_bytes(tensors), dist.get_rank(), dist.get_world_size())
            share, _ = self._snapshot.take({key: tensors[key] for key in owned})
            write, args = self._write_share, (share, rest, request)
        else:
            snapshot, _ = self._snapshot.take(training_state(parts, request.loop), after)
            write, args = self._write, (snapshot, request, writer, self._transfer)
        stall = time.perf_counter() - started
        self.stall_s.append(stall)
        self.deferred = None
        self.last_save_step = request.loop.step
        self._thread = threading.Thread(target=write, args=(*args, stall),
                                        name=f"checkpoint-{request.loop.step}", daemon=True)
        self._thread.start()
        if wait:
            self.wait()
        return stall

    def reserve_snapshot(self, parts: Mapping[str, Stateful], loop: LoopState, writer: bool) -> None:
        """In the background, make the host buffers this rank's saves copy into, so a worker group's
        first save stalls no longer than its later ones (``HostSnapshot.reserve``). A save that
        comes first waits for it, then copies."""
        if self.sharded or (not writer and not self.writes_local):
            return

        def reserve() -> None:
            with self._save_lock:
                self._snapshot.reserve(training_state(parts, loop))

        threading.Thread(target=reserve, name="checkpoint-reserve", daemon=True).start()

    def replicate(self, step: int) -> None:
        """In the background, commit this node's verified copy of ``step`` on the shared tiers,
        where a handoff left it to the next group (``SaveRequest.shared``). The next save takes
        its turn after it, or cancels it (a just-in-time or final save: its step is newer)."""
        def copy_on() -> None:
            key = checkpoint_key(self.run_name, step)
            started = time.time()
            with tempfile.TemporaryDirectory(prefix=scratch_prefix("replicate"), dir=self.scratch_root) as scratch:
                try:
                    manifest, paths = self.local.fetch(key, scratch)  # verified again: never upload what rotted
                except Exception as error:  # the next save covers it; until then the other nodes' copies
                    logger.warning("Cannot copy step %d on to the shared tiers: %s: %s", step, type(error).__name__,
                                   error)
                    return
                request = SaveRequest(LoopState(step=step, samples_seen=manifest.samples_seen), manifest.world_size,
                                      manifest.kind, manifest.reason)
                self._commit_shared(key, paths[STATE_FILE], manifest, request, 0.0, started, transfer)

        transfer = self._transfer = Transfer()
        self._thread = threading.Thread(target=copy_on, name=f"checkpoint-replicate-{step}", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Have the save in flight (if any) give way: it stops part-way (while it is serialized or between
        two head chunks) and commits nothing. Does not wait for it."""
        if self.busy:
            self._transfer.cancelled.set()

    def wait(self) -> None:
        """Block until the save in flight (if any) is done."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write(self, snapshot: Dict[str, Any], request: SaveRequest, writer: bool, transfer: Transfer,
               stall: float) -> None:
        """Background: publish on every tier this rank writes. A failure leaves the previous
        checkpoint the latest everywhere; training goes on and the next save tries again."""
        step = request.loop.step
        key = checkpoint_key(self.run_name, step)
        scratch = None
        try:
            started = time.time()
            scratch, entry = self._serialize(snapshot, step, transfer)
            path = os.path.join(scratch, STATE_FILE)
            manifest = self._manifest(request, {STATE_FILE: entry}, started, compression=self.compression)
            if writer and request.shared:
                self._commit_shared(key, path, manifest, request, stall, started, transfer)
            if self.writes_local and not transfer.cancelled.is_set():
                try:
                    self.local.commit(key, {STATE_FILE: path}, manifest, move=True)
                    self.local_step = step
                except Exception as error:  # the shared copies stand; this node's is only faster
                    self._report_failure(request, f"{type(error).__name__}: {error}", tier=self.local.name)
                else:
                    if writer and not request.shared:
                        self.events.emit(Checkpoint(step=step, tier=self.local.name, kind=request.kind, stall_s=stall,
                                                    duration_s=time.time() - started, bytes=entry.size))
        except SaveCancelled:
            logger.info("Checkpoint step %d gave way to a just-in-time save while it was written", step)
            self.events.emit(CheckpointCancelled(step=step, kind=request.kind, tier=None,
                                                 reason="a just-in-time save took its place"))
        except Exception as error:
            self._report_failure(request, f"{type(error).__name__}: {error}")
        finally:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)

    def _serialize(self, snapshot: Dict[str, Any], step: int, transfer: Transfer) -> Tuple[str, FileEntry]:
        """Write the state file into a scratch directory on this node's disk; when that disk is
        full, into memory (``/dev/shm``), so a full node-local disk costs only the local copy.
        A cancelled save stops part-way (a handoff's copies are written beside it): SaveCancelled."""
        try:
            return self._serialize_into(self.scratch_root, snapshot, step, transfer)
        # torch.save reports a failed write as a RuntimeError ("file write failed"), not an OSError.
        except (OSError, RuntimeError, WriteCancelled) as error:
            if transfer.cancelled.is_set():
                raise SaveCancelled() from None
            logger.warning("Cannot stage checkpoint step %d in %s (%s: %s); staging it in %s", step,
                           self.scratch_root, type(error).__name__, error, MEMORY_SCRATCH)
            return self._serialize_into(MEMORY_SCRATCH, snapshot, step, transfer)

    def _serialize_into(self, root: Optional[str], snapshot: Dict[str, Any], step: int,
                        transfer: Transfer) -> Tuple[str, FileEntry]:
        scratch = tempfile.mkdtemp(prefix=f"{scratch_prefix('save')}{checkpoint_name(step)}-", dir=root)
        try:
            return scratch, write_state(snapshot, os.path.join(scratch, STATE_FILE), self.compression,
                                        transfer.cancelled)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _commit_shared(self, key: str, path: str, manifest: Manifest, request: SaveRequest, stall: float,
                       started: float, transfer: Transfer) -> None:
        """Commit on the shared tiers, fastest first: the head forwards to durable storage itself,
        so the first tier that commits is enough; a tier that fails hands on to the next."""
        for tier in self.shared:
            try:
                committed = tier.commit(key, {STATE_FILE: path}, manifest, transfer=transfer)
            except SaveCancelled:
                logger.info("Checkpoint step %d gave way to a just-in-time save", request.loop.step)
                self.events.emit(CheckpointCancelled(step=request.loop.step, kind=request.kind, tier=tier.name,
                                                     reason="a just-in-time save took its place"))
                return
            except Exception as error:
                self._report_failure(request, f"{type(error).__name__}: {error}", tier=tier.name)
                continue
            self._committed(committed, tier, request, stall, started)
            return

    def _manifest(self, request: SaveRequest, files: Dict[str, FileEntry], started: float, **format: Any) -> Manifest:
        return Manifest(step=request.loop.step, samples_seen=request.loop.samples_seen, kind=request.kind,
                        reason=request.reason, world_size=request.world_size, files=files, config=self.config,
                        created_at=started, **format)

    def _committed(self, manifest: Manifest, tier: Tier, request: SaveRequest, stall: float, started: float) -> None:
        """A shared tier holds the checkpoint: record it for the advisor, the loop and the event log."""
        self.commit_s.append(time.time() - started)
        self.committed_step = manifest.step
        self.events.emit(Checkpoint(step=manifest.step, tier=tier.name, kind=request.kind, stall_s=stall,
                                    duration_s=time.time() - started,
                                    bytes=sum(e.size for e in manifest.files.values())))

    def _report_failure(self, request: SaveRequest, error: str, tier: Optional[str] = None) -> None:
        logger.warning("Checkpoint step %d failed%s; the previous one stays the latest: %s", request.loop.step,
                       f" on the {tier} tier" if tier else "", error, exc_info=sys.exc_info()[1] is not None)
        self.events.emit(CheckpointFailed(step=request.loop.step, kind=request.kind, tier=tier, error=error))

    def _write_share(self, share: Dict[str, torch.Tensor], rest: Dict[str, Any], request: SaveRequest,
                     stall: float) -> None:
        """Background, on every rank: write this rank's DCP share and put it on the first shared
        tier; rank 0 also writes the rest of the state. Rank 0 publishes the manifest only when
        every rank's files arrived, so a failure anywhere leaves the previous checkpoint the latest."""
        step, rank = request.loop.step, dist.get_rank()
        key = checkpoint_key(self.run_name, step)
        tier = self.shared[0]
        scratch = tempfile.mkdtemp(prefix=f"{scratch_prefix('save')}{checkpoint_name(step)}-", dir=self.scratch_root)
        started = time.time()
        try:
            try:
                names = write_shard(share, scratch, self._save_group)  # raises on every rank if any fails
            except Exception as error:
                if rank == 0:
                    self._report_failure(request, f"{type(error).__name__}: {error}")
                return
            entries, problem = {}, None
            try:
                if rank == 0:
                    entries[STATE_FILE] = write_state(rest, os.path.join(scratch, STATE_FILE))
                entries.update({name: file_entry(os.path.join(scratch, name)) for name in names})
                objects = tier.put(key, {name: os.path.join(scratch, name) for name in entries})
                entries = {name: replace(entry, object=objects.get(name, "")) for name, entry in entries.items()}
            except Exception as error:
                problem = f"rank {rank}: {type(error).__name__}: {error}"
            everyone: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, (entries, problem, stall), group=self._save_group)
            published = [False]
            if rank == 0:
                problems = [p for _, p, _ in everyone if p]
                files = {name: entry for rank_entries, _, _ in everyone for name, entry in rank_entries.items()}
                if problems:
                    self._report_failure(request, "; ".join(problems))
                else:
                    manifest = self._manifest(request, files, started, sharded=True)
                    try:
                        tier.publish(key, manifest)
                        published[0] = True
                    except Exception as error:
                        self._report_failure(request, f"{type(error).__name__}: {error}")
                if published[0]:
                    self._committed(manifest, tier, request, max(s for _, _, s in everyone), started)
            dist.broadcast_object_list(published, src=0, group=self._save_group)
            if published[0]:
                self.committed_step = step
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- restoring ------------------------------------------------------------------------

    def _tiers(self) -> List[Tier]:
        return ([self.local] if self.local is not None else []) + self.shared

    def _load_step(self, step: int, listings: Dict[str, List[int]]) -> Optional[Tuple[Dict[str, Any], Manifest, str]]:
        """The verified state of ``step`` from the fastest tier holding a valid copy."""
        key = checkpoint_key(self.run_name, step)
        for tier in self._tiers():
            if step not in listings[tier.name]:
                continue
            with tempfile.TemporaryDirectory(prefix=scratch_prefix("restore"), dir=self.scratch_root) as scratch:
                try:
                    manifest, paths = tier.fetch(key, scratch)
                    return load_checkpoint_state(manifest, paths), manifest, tier.name
                # Whatever fails (a damaged copy, an unreachable tier, a missing file, DCP's
                # CheckpointException, a BaseException), the next tier may hold a good copy: this
                # rank must never abort the collective restore. An interrupt or exit still stops it.
                except (Exception, CheckpointException) as why:  # noqa: BLE001
                    logger.warning("Skipping checkpoint %s on the %s tier: %s: %s", key, tier.name,
                                   type(why).__name__, why)
        return None

    def restore(self, parts: Mapping[str, Stateful], rank: int,
                copied_by_controller: Optional[int] = None) -> Optional[Restored]:
        """Collective: every rank loads the same state into ``parts`` (or none, on a first start).

        Candidates are every step any rank can see (the newest checkpoint may exist only on
        some nodes' local disks), newest first. The first step that some rank loads and
        verifies wins; each rank loads it from its own fastest valid copy, and a rank with none
        receives it from the lowest rank that has it. A step loaded from node copies alone is copied on
        to the shared tiers (``replicate``), unless it is ``copied_by_controller`` (rank 0's word counts:
        elastic/stranded.py).
        """
        started = time.time()
        listings = {tier.name: _listing(tier, self.run_name) for tier in self._tiers()}
        visible = sorted({s for steps in listings.values() for s in steps}, reverse=True)
        everyone = self.group.all_gather_object(visible)
        read_s = 0.0
        for step in sorted({s for steps in everyone for s in steps}, reverse=True):
            reading = time.perf_counter()
            loaded = self._load_step(step, listings) if step in visible else None
            read_s += time.perf_counter() - reading
            holders = self.group.all_gather_object(loaded is not None)
            if not any(holders):
                continue
            if not all(holders):
                source = holders.index(True)
                manifest = self.group.broadcast_object(loaded[1] if loaded else None, src=source)
                state = self.group.broadcast_state(loaded[0] if loaded else None, src=source)
                loaded = loaded or (state, manifest, "peer")
            state, manifest, tier = loaded
            # Every loaded copy was verified against its manifest, so equal checksums mean equal content.
            digests = self.group.all_gather_object(content_digest(manifest))
            if len(set(digests)) > 1:  # copies that all verified, yet differ: take one, loudly
                logger.error("Ranks loaded different states for step %d (digests %s); every rank takes rank 0's",
                             step, digests)
                self.events.emit(RestoreMismatch(step=step, digests=digests))
                state, manifest = self.group.broadcast_object((state, manifest), src=0)
                tier = tier if rank == 0 else "peer"
            applying = time.perf_counter()
            loop = apply_sharded(parts, state) if manifest.sharded else load_training_state(parts, state)
            read_s += time.perf_counter() - applying
            self.last_save_step = self.committed_step = step
            # A handoff's step on node-local copies alone: the first rank that read one copies it on.
            sources = self.group.all_gather_object((tier, copied_by_controller))
            if (self.local is not None
                    and rank == next((r for r, (t, _) in enumerate(sources) if t == self.local.name), -1)
                    and not any(step in listings[shared.name] for shared in self.shared)
                    and step != sources[0][1]):
                self.replicate(step)
            return Restored(loop, tier, manifest, time.time() - started, read_s)
        return None


def content_digest(manifest: Manifest) -> str:
    """What a verified copy holds, from its manifest's checksums (no second pass over the state):
    equal on every rank that loaded the same checkpoint, whichever tier each read it from."""
    return ",".join(f"{name}:{entry.crc32c}" for name, entry in sorted(manifest.files.items()))


def load_checkpoint_state(manifest: Manifest, paths: Dict[str, str]) -> Dict[str, Any]:
    """The state of a verified checkpoint, single-file or sharded."""
    if manifest.sharded:
        return load_sharded(paths, manifest.files)
    return load_state(paths[STATE_FILE], manifest.compression)


def _listing(tier: Tier, run_name: str) -> List[int]:
    try:
        return tier.steps(run_name)
    except Exception as error:  # an unreachable tier is skipped, not fatal: others may have the state
        logger.warning("Cannot list checkpoints on the %s tier: %s", tier.name, error)
        return []
