"""Object storage behind a URI: ``file:///abs/path`` or ``gs://bucket/prefix``.

A Store speaks in keys relative to its root. Writers publish a key only when its bytes
are complete (local: write a temporary file, then rename), but a reader must still verify
content against a manifest: on GCS a failed streaming write can publish a truncated object.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Protocol, Tuple

import google_crc32c


@dataclass(frozen=True)
class Listed:
    """A stored file as the store's listing describes it, without reading its bytes."""

    size: int
    crc32c: Optional[str]
    """Hex, as a manifest holds it; None where the store has none to give."""


class Store(Protocol):
    uri: str

    def put_file(self, key: str, local_path: str) -> None:
        """Upload a local file to ``key`` (replacing it)."""

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> bool:
        """Write ``data`` to ``key``. With ``if_absent``, return False instead of replacing an existing key."""

    def get_bytes(self, key: str) -> bytes:
        """Raise FileNotFoundError if the key does not exist."""

    def get_file(self, key: str, local_path: str) -> None:
        """Download ``key`` to a local file. Raise FileNotFoundError if it does not exist."""

    def local_path(self, key: str) -> str | None:
        """A path to read the key in place, when the store is a local filesystem."""

    def exists(self, key: str) -> bool: ...

    def get_versioned(self, key: str) -> Tuple[bytes, str]:
        """The bytes of ``key`` and its version (opaque). Raise FileNotFoundError if absent."""

    def put_if_version(self, key: str, data: bytes, version: Optional[str]) -> Optional[str]:
        """Write ``data`` only if ``key`` is still at ``version`` (None: only if absent); return the
        new version, or None when the key has moved on. Atomic against every other writer of the
        store (compare-and-swap)."""

    def list_children(self, prefix: str) -> List[str]:
        """Names of the immediate children (files and 'directories') under ``prefix``."""

    def list_files(self, prefix: str) -> Dict[str, Listed]:
        """The files directly under ``prefix`` by name, with their size and the checksum the store
        keeps, from one listing (nothing is downloaded)."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under ``prefix``."""


class LocalStore:
    """A directory on a local (or mounted) filesystem. ``sync``: every file and rename reaches the
    disk before a write returns, so a store that must outlive a power loss never publishes bytes
    the loss could take back. A node-local copy needs to outlive only its process (a power loss
    takes the node and the copy's use with it), which the page cache does: without ``sync`` it
    is written without waiting for the disk."""

    def __init__(self, root: str, sync: bool = True):
        self.sync = sync
        self.root = os.path.abspath(root)
        self.uri = "file://" + self.root
        self._checksums: Dict[str, Tuple[Tuple[int, int, int], str]] = {}  # path: (identity, CRC32C)

    def _sync_file(self, f) -> None:
        if self.sync:
            os.fsync(f.fileno())

    def _sync_directory(self, path: str) -> None:
        if self.sync:
            _fsync_directory(path)

    def _path(self, key: str) -> str:
        path = os.path.normpath(os.path.join(self.root, key))
        if not (path == self.root or path.startswith(self.root + os.sep)):
            raise ValueError(f"key {key!r} escapes the store root {self.root}")
        return path

    def _publish(self, key: str, write) -> str:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".partial-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                self._sync_file(f)
        except BaseException:
            os.unlink(staging)
            raise
        return staging

    def put_file(self, key: str, local_path: str) -> None:
        def copy(f):
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, 8 << 20)
        os.replace(self._publish(key, copy), self._path(key))
        self._sync_directory(os.path.dirname(self._path(key)))

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> bool:
        staging = self._publish(key, lambda f: f.write(data))
        if not if_absent:
            os.replace(staging, self._path(key))
            self._sync_directory(os.path.dirname(self._path(key)))
            return True
        try:
            os.link(staging, self._path(key))  # atomic create-if-absent
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(staging)
            self._sync_directory(os.path.dirname(self._path(key)))

    def adopt(self, key: str, path: str) -> None:
        """Publish a file already on this filesystem under ``key`` by renaming it (atomic).

        With ``sync``, its bytes reach the disk before the rename, and the rename before this
        returns: a manifest written after it never names bytes that a power loss could take back."""
        target = self._path(key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if self.sync:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.replace(path, target)
        self._sync_directory(os.path.dirname(target))

    def get_bytes(self, key: str) -> bytes:
        with open(self._path(key), "rb") as f:
            return f.read()

    def get_file(self, key: str, local_path: str) -> None:
        shutil.copyfile(self._path(key), local_path)

    def local_path(self, key: str) -> str:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    @contextmanager
    def _locked(self, key: str) -> Iterator[str]:
        """An exclusive lock of ``key`` among every process using this directory (flock on a sidecar)."""
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield path

    @staticmethod
    def _version(path: str) -> str:
        status = os.stat(path)
        return f"{status.st_ino}:{status.st_mtime_ns}:{status.st_size}"

    def get_versioned(self, key: str) -> Tuple[bytes, str]:
        with self._locked(key) as path:
            with open(path, "rb") as f:
                return f.read(), self._version(path)

    def put_if_version(self, key: str, data: bytes, version: Optional[str]) -> Optional[str]:
        with self._locked(key) as path:
            current = self._version(path) if os.path.exists(path) else None
            if current != version:
                return None
            os.replace(self._publish(key, lambda f: f.write(data)), path)
            self._sync_directory(os.path.dirname(path))
            return self._version(path)

    def list_children(self, prefix: str) -> List[str]:
        path = self._path(prefix)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def list_files(self, prefix: str) -> Dict[str, Listed]:
        """A filesystem keeps no checksums: each file's CRC32C is computed once and remembered
        while the file's inode, size and modification time stay the same."""
        path = self._path(prefix)
        entries = [entry for entry in os.scandir(path) if entry.is_file()] if os.path.isdir(path) else []
        return {entry.name: Listed(entry.stat().st_size, self._crc32c(entry)) for entry in entries}

    def _crc32c(self, entry: os.DirEntry) -> str:
        status = entry.stat()
        identity = (status.st_ino, status.st_size, status.st_mtime_ns)
        known = self._checksums.get(entry.path)
        if known is None or known[0] != identity:
            crc = google_crc32c.Checksum()
            with open(entry.path, "rb") as f:
                while chunk := f.read(8 << 20):
                    crc.update(chunk)
            known = self._checksums[entry.path] = (identity, crc.hexdigest().decode())
        return known[1]

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        self._checksums = {known: value for known, value in self._checksums.items()
                           if known != path and not known.startswith(path + os.sep)}
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)


def _fsync_directory(path: str) -> None:
    """Make the directory's entries (a rename, a new file) durable, as a file's fsync does its bytes."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
