"""On-storage checkpoint format and its validation.

A checkpoint is a directory ``<run>/checkpoints/step_XXXXXXXX/`` holding data files and a
``manifest.json`` written last. The manifest lists every file with its size and CRC32C;
a directory without a readable manifest, or whose files do not match it, is not a
checkpoint. State is saved with ``torch.save`` and read back with ``weights_only=True``,
so loading a checkpoint from a bucket never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, BinaryIO, Dict, Iterable, List, Optional

import google_crc32c

from raytrain_spot.storage.store import Store

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"step_(\d{8})$")
# A manifest names files of its own directory only: no separators, no "." or "..".
_FILE_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._-]{1,255}")


class InvalidCheckpoint(Exception):
    """A checkpoint directory that must not be loaded; the message says why."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_key(run_name: str, step: int) -> str:
    return f"{run_name}/{CHECKPOINTS_DIR}/{checkpoint_name(step)}"


def listed_steps(store: Store, run_name: str) -> List[int]:
    """Steps that have a checkpoint directory in ``store``, newest first (not yet validated)."""
    steps = [int(m.group(1)) for name in store.list_children(f"{run_name}/{CHECKPOINTS_DIR}")
             if (m := _NAME.match(name.rstrip("/")))]
    return sorted(steps, reverse=True)


@dataclass
class FileEntry:
    size: int
    crc32c: str
    object: str = ""
    """The name the file is stored under in the checkpoint's directory, when not its own: the tiers
    store each file under a name unique to its writer (``writer_objects``), so two writers of one
    step never overwrite each other's data and the loser of the manifest's race deletes only its own."""


def stored_key(key: str, name: str, entry: FileEntry) -> str:
    """Where the file ``name`` of the checkpoint at ``key`` is stored."""
    return f"{key}/{entry.object or name}"


def writer_objects(names: Iterable[str]) -> Dict[str, str]:
    """A name unique to this writer for each file of a checkpoint: ``<name>.<random token>``."""
    token = uuid.uuid4().hex[:16]
    return {name: f"{name}.{token}" for name in names}


@dataclass
class Manifest:
    step: int
    samples_seen: int
    kind: str  # "periodic" | "jit" | "final" | "survivor"
    world_size: int
    files: Dict[str, FileEntry]
    config: Dict[str, Any]
    reason: str = ""  # jit: "preemption" or "regrow"
    compression: str = "none"  # of the state file: none | zstd | lz4
    sharded: bool = False  # tensors in DCP files written by every rank, the rest in the state file
    config_hash: str = ""
    framework_version: str = ""
    torch_version: str = field(default_factory=lambda: _torch().__version__)
    created_at: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not self.config_hash:
            self.config_hash = config_hash(self.config)
        if not self.framework_version:
            self.framework_version = version("raytrain-spot")

    def stored_as(self, objects: Dict[str, str]) -> "Manifest":
        """This manifest with its files stored under ``objects`` (file name: stored name)."""
        return replace(self, files={name: replace(entry, object=objects.get(name, ""))
                                    for name, entry in self.files.items()})

    def to_json(self) -> bytes:
        fields = asdict(self)
        return json.dumps({**fields, _CHECKSUM: _fields_checksum(fields)}, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        try:
            raw = json.loads(data)
            checksum = raw.pop(_CHECKSUM, None)
            if checksum is not None and checksum != _fields_checksum(raw):
                raise InvalidCheckpoint(f"the manifest's CRC32C {checksum!r} does not match its content (corrupt)")
            files = {name: FileEntry(**entry) for name, entry in raw.pop("files").items()}
            manifest = cls(files=files, **raw)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise InvalidCheckpoint(f"unreadable manifest ({error})") from None
        if manifest.format_version != FORMAT_VERSION:
            raise InvalidCheckpoint(f"format version {manifest.format_version}, expected {FORMAT_VERSION}")
        for name, entry in manifest.files.items():
            for stored in (name, entry.object or name):
                if not (isinstance(stored, str) and _FILE_NAME.fullmatch(stored)) or stored == MANIFEST:
                    raise InvalidCheckpoint(f"the manifest names {stored!r}, not a data file of the checkpoint's "
                                            "directory")
        return manifest


_CHECKSUM = "checksum"
"""The manifest's own CRC32C, over its other fields: a flipped byte in a field no file check
covers (the step, the samples seen, the settings) must not pass. Manifests from before it have none."""


def _fields_checksum(fields: Dict[str, Any]) -> str:
    return google_crc32c.Checksum(json.dumps(fields, sort_keys=True).encode()).hexdigest().decode()


def config_hash(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class WriteCancelled(Exception):
    """A serialization stopped part-way because its save was cancelled."""


_CRC_PIECE = 1 << 20


class _ChecksummingWriter(io.RawIOBase):
    """A file wrapper that counts bytes and computes CRC32C as torch.save writes; it stops the
    write once ``cancelled`` is set."""

    def __init__(self, f: BinaryIO, cancelled: Optional[threading.Event] = None):
        self._f = f
        self._cancelled = cancelled
        self.crc = google_crc32c.Checksum()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self._cancelled is not None and self._cancelled.is_set():
            raise WriteCancelled()
        view = memoryview(data).cast("B")
        # The checksum takes read-only bytes: copied a piece at a time, each piece stays in the CPU's
        # cache (a whole tensor's copy at once took 6x as long as the checksum itself).
        for start in range(0, view.nbytes, _CRC_PIECE):
            self.crc.update(bytes(view[start:start + _CRC_PIECE]))
        self.size += view.nbytes
        return self._f.write(view)


def write_state(state: Dict[str, Any], path: str, compression: str = "none",
                cancelled: Optional[threading.Event] = None) -> FileEntry:
    """Serialize ``state`` to ``path``; return the size and checksum of the stored bytes, computed while writing.

    Not synced to the disk: ``path`` is a scratch file that a tier copies (and syncs, where it must
    outlive a power loss) or, for the node-local tier, adopts as it is (``LocalStore.sync``)."""
    torch = _torch()
    with open(path, "wb") as f:
        writer = _ChecksummingWriter(f, cancelled)
        if compression == "none":
            torch.save(state, writer)
        else:
            import pyarrow as pa

            with pa.CompressedOutputStream(pa.PythonFile(writer, mode="w"), compression) as compressed:
                torch.save(state, compressed)
    return FileEntry(size=writer.size, crc32c=writer.crc.hexdigest().decode())


def file_entry(path: str) -> FileEntry:
    crc = google_crc32c.Checksum()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            crc.update(chunk)
            size += len(chunk)
    return FileEntry(size=size, crc32c=crc.hexdigest().decode())


def commit(store: Store, key: str, files: Dict[str, str], manifest: Manifest) -> bool:
    """Upload data files, then the manifest. Until the manifest lands the checkpoint does not exist.

    A committed checkpoint is never rewritten (its data would no longer match its manifest):
    if one is there already, nothing is written and False is returned.
    """
    if store.exists(f"{key}/{MANIFEST}"):
        return False
    upload_files(store, key, files)
    return publish_manifest(store, key, manifest)


def upload_files(store: Store, key: str, files: Dict[str, str]) -> None:
    """The data files of a checkpoint (stored name: local path), each under ``key``; they count for
    nothing until the manifest."""
    for name, local_path in files.items():
        store.put_file(f"{key}/{name}", local_path)


def publish_manifest(store: Store, key: str, manifest: Manifest) -> bool:
    """Write the manifest unless one is there: the moment the checkpoint exists. False: another writer's is."""
    return store.put_bytes(f"{key}/{MANIFEST}", manifest.to_json(), if_absent=True)


def read_manifest(store: Store, key: str) -> Manifest:
    try:
        manifest = Manifest.from_json(store.get_bytes(f"{key}/{MANIFEST}"))
    except FileNotFoundError:
        raise InvalidCheckpoint("no manifest (an interrupted or half-written save)") from None
    directory = _NAME.match(os.path.basename(key.rstrip("/")))
    if directory and int(directory.group(1)) != manifest.step:  # a step directory holds that step only
        raise InvalidCheckpoint(f"the manifest is step {manifest.step}'s, in {key} (a stale or misplaced manifest)")
    return manifest


def verify_stored(store: Store, key: str) -> Manifest:
    """Check a committed checkpoint where it is stored, downloading no data file: the manifest, then
    each file's size and CRC32C from the store's listing (on GCS, the CRC32C the server computed).
    Raise InvalidCheckpoint when the copy is damaged; any other error means it could not be
    checked, not that it is damaged."""
    manifest = read_manifest(store, key)
    listed = store.list_files(key)
    for name, expected in manifest.files.items():
        found = listed.get(expected.object or name)
        if found is None:
            raise InvalidCheckpoint(f"{name} is listed in the manifest but missing")
        if found.size != expected.size:
            raise InvalidCheckpoint(f"{name} has {found.size} bytes, manifest says {expected.size} (truncated?)")
        if found.crc32c is not None and found.crc32c != expected.crc32c:
            raise InvalidCheckpoint(f"{name} CRC32C {found.crc32c} != manifest {expected.crc32c} (corrupt)")
    return manifest


def verify_file(path: str, expected: FileEntry, name: str) -> None:
    actual = file_entry(path)
    if actual.size != expected.size:
        raise InvalidCheckpoint(f"{name} has {actual.size} bytes, manifest says {expected.size} (truncated?)")
    if actual.crc32c != expected.crc32c:
        raise InvalidCheckpoint(f"{name} CRC32C {actual.crc32c} != manifest {expected.crc32c} (corrupt)")


def fetch_verified(store: Store, key: str, scratch_dir: str) -> tuple[Manifest, Dict[str, str]]:
    """Validate a checkpoint and return its manifest and local paths of its verified files.

    Files are read in place from a local store, or downloaded into ``scratch_dir``.
    """
    manifest = read_manifest(store, key)
    paths = {}
    for name, expected in manifest.files.items():
        path = store.local_path(stored_key(key, name, expected))
        if path is None:
            path = os.path.join(scratch_dir, name)
            try:
                store.get_file(stored_key(key, name, expected), path)
            except FileNotFoundError:
                raise InvalidCheckpoint(f"{name} is listed in the manifest but missing") from None
        elif not os.path.exists(path):
            raise InvalidCheckpoint(f"{name} is listed in the manifest but missing")
        elif expected.object:  # read in place, under the file's own name (DCP opens its shards by name)
            os.symlink(path, os.path.join(scratch_dir, name))
            path = os.path.join(scratch_dir, name)
        verify_file(path, expected, name)
        paths[name] = path
    return manifest, paths


def load_state(path: str, compression: str = "none",
               map_location: Optional[str | torch.device] = "cpu") -> Dict[str, Any]:
    """Tensors and plain containers only: never unpickles arbitrary objects.

    An uncompressed file is mapped, not read: its tensors share the pages the verification just
    brought into memory (a surviving node's copy is in its page cache since the save), so a
    restore copies the state once, into the model, instead of twice. Every store replaces a file
    by a rename and deletes by unlinking, so a mapped checkpoint never changes under its tensors."""
    torch = _torch()
    try:
        if compression == "none":
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        import pyarrow as pa

        with pa.CompressedInputStream(pa.OSFile(path), compression) as compressed:
            return torch.load(io.BytesIO(compressed.read()), map_location=map_location, weights_only=True)
    except Exception as error:  # a verified file that still fails to parse is as bad as a corrupt one
        raise InvalidCheckpoint(f"cannot deserialize {os.path.basename(path)}: {error}") from None


def _torch():
    """Imported where a state is written or read: copying a verified checkpoint between tiers needs no
    torch (the controller's copy-on runs in a process without the training stack, checkpoint/copy_on.py)."""
    import torch

    return torch
