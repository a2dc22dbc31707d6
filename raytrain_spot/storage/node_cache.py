"""A node-local copy of a remote directory (``gs://bucket/prefix``), fetched once per node.

The driver and every Ray worker on a node ask for the same model directory or data shards: the
first one fetches them, the others reuse its copy. A copy is named after a digest of the listing
it was fetched from (object names, sizes, generations, hashes), so a changed remote gets a new
directory rather than stale files, and a copy in use is never rewritten under its readers.

A fetch downloads each object at its listed generation into a staging sibling, checks every file
against the listed size and CRC32C (MD5 for an object without one), writes a manifest of what it
fetched, then renames the staging directory into place: a copy is complete or absent, even after a
crash. One process fetches a given copy at a time (an flock beside it); the others on the node
wait for it instead of downloading the same bytes again, then find its copy. Layout::

    <cache_root>/gs/<bucket>/<prefix>/<digest>/   the copy, with MANIFEST in it
    <cache_root>/gs/<bucket>/<prefix>/.lock        held while fetching
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Iterator, List

import google_crc32c
from google.api_core import exceptions as api_exceptions

from raytrain_spot.config.errors import ConfigError
from raytrain_spot.observe.progress import WorkProgress
from raytrain_spot.storage.gcs import GcsStore, ObjectInfo, _wait_all_or_first_error, parse_gs_uri

logger = logging.getLogger(__name__)

MANIFEST = ".raytrain-copy.json"
"""In each copy: the URI and the listing it was fetched from."""
_STAGING = ".fetching-"
_CHUNK = 8 << 20
PROGRESS_POLL_S = 1.0
"""How often a fetch measures what it has written (its progress line comes at most every 5 s)."""


class CopyFailed(IOError):
    """A fetched file is not what the listing said, or its object changed mid-copy; nothing was published."""


def local_copy(uri: str, cache_root: str, setting: str = "path") -> str:
    """A local directory holding what ``uri`` holds: a local path (or ``file://``) as it is, a
    ``gs://`` prefix as a verified copy under ``cache_root``. ``setting`` names where the URI came
    from (``task.model.path``) in errors that are the user's to fix."""
    if uri.startswith("gs://"):
        return _gcs_copy(uri, cache_root, setting)
    if uri.startswith("file://"):
        return os.path.expanduser(uri[len("file://"):])
    if "://" in uri:
        raise ConfigError(f"{setting}: {uri} has a scheme this project cannot read. Fix: use a local directory "
                          "or gs://<bucket>/<prefix>")
    return os.path.expanduser(uri)


def _gcs_copy(uri: str, cache_root: str, setting: str) -> str:
    try:
        bucket, prefix = parse_gs_uri(uri, setting)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ConfigError(f"{setting}: {uri} has an empty, '.' or '..' path segment. Fix: write the prefix "
                          "without them (gs://<bucket>/<dir>/<dir>)")
    store = GcsStore.from_uri(uri)
    objects = _listing(store, setting)
    entry = os.path.join(os.path.expanduser(cache_root), "gs", bucket, *(prefix.split("/") if prefix else []))
    copy = os.path.join(entry, _digest(objects))
    if _is_complete(copy, objects):
        return copy
    os.makedirs(entry, exist_ok=True)
    with _locked(os.path.join(entry, ".lock")):
        if not _is_complete(copy, objects):  # unless the fetcher we waited for made it
            _fetch(store, objects, entry, copy)
    return copy


def _listing(store: GcsStore, setting: str) -> List[ObjectInfo]:
    """The files under the store's root; the user's mistakes (no bucket, no objects, no access) as ConfigError."""
    try:
        listed = store.list_objects()
    except api_exceptions.NotFound:
        raise ConfigError(f"{setting}: bucket {store.bucket_name!r} of {store.uri} does not exist. Fix: correct "
                          f"the bucket in {setting}, or upload the directory there") from None
    except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as error:
        raise ConfigError(f"{setting}: the credentials may not list {store.uri} ({error.code} {error.message}). "
                          f"Fix: grant the account roles/storage.objectViewer on bucket {store.bucket_name!r} "
                          "(and, on a GCE VM, a devstorage scope)") from None
    files = [o for o in listed if o.key and not o.key.endswith("/")]  # not the console's empty "folders"
    if not files:
        raise ConfigError(f"{setting}: {store.uri} holds no objects. Fix: upload the directory "
                          f"(`gcloud storage cp -r DIR/* {store.uri}/`), or point {setting} at the prefix holding it")
    for o in files:
        if o.key == MANIFEST or any(part in ("", ".", "..") for part in o.key.split("/")):
            raise ConfigError(f"{setting}: object {store.uri}/{o.key} has a name a local directory cannot hold "
                              f"(an empty, '.' or '..' segment, or {MANIFEST}). Fix: rename or delete it")
    return files


def _digest(objects: List[ObjectInfo]) -> str:
    listing = json.dumps([dataclasses.astuple(o) for o in objects]).encode()
    return hashlib.sha256(listing).hexdigest()[:16]


def _is_complete(copy: str, objects: List[ObjectInfo]) -> bool:
    """Whether ``copy`` was published from exactly this listing and still holds every file at its size.

    Sizes, not hashes: a stat per file keeps reuse cheap, and catches a file deleted or
    truncated since; the bytes were checked when the copy was made."""
    try:
        with open(os.path.join(copy, MANIFEST)) as f:
            recorded = json.load(f)["objects"]
    except (OSError, ValueError, KeyError):
        return False
    if recorded != [dataclasses.asdict(o) for o in objects]:
        return False
    return all(_size(os.path.join(copy, o.key)) == o.size for o in objects)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive flock among the processes of this node; the kernel drops it if its holder dies."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _fetch(store: GcsStore, objects: List[ObjectInfo], entry: str, copy: str) -> None:
    """Download, verify and publish ``objects`` as ``copy``. Run under the entry's lock."""
    for leftover in glob.glob(os.path.join(entry, _STAGING + "*")):
        shutil.rmtree(leftover, ignore_errors=True)  # a fetcher that died mid-copy; no one else stages now
    if os.path.exists(copy):
        logger.warning("%s does not match its manifest (a file deleted or truncated?): fetching it again", copy)
        shutil.rmtree(copy)
    started, total = time.monotonic(), sum(o.size for o in objects)
    logger.info("fetching %d objects (%.1f MiB) of %s into %s", len(objects), total / 2**20, store.uri, copy)
    staging = tempfile.mkdtemp(prefix=_STAGING, dir=entry)
    try:
        with ThreadPoolExecutor(max_workers=store.workers, thread_name_prefix="node-cache") as pool, \
                WorkProgress(f"fetching {store.uri}", total / 2**20, "MiB", logger.info) as progress:
            downloads = [pool.submit(_download, store, o, staging) for o in objects]
            pending = set(downloads)
            while pending:
                done, pending = wait(pending, timeout=PROGRESS_POLL_S, return_when=FIRST_EXCEPTION)
                if any(future.exception() is not None for future in done):
                    break
                progress.update(_staged_bytes(staging) / 2**20)
            _wait_all_or_first_error(downloads)
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump({"uri": store.uri, "objects": [dataclasses.asdict(o) for o in objects]}, f, indent=1)
        os.rename(staging, copy)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("fetched %s in %.1f s", store.uri, time.monotonic() - started)


def _staged_bytes(staging: str) -> int:
    """Bytes written under ``staging`` so far (downloads in progress included)."""
    return sum(_size(os.path.join(directory, name)) for directory, _, names in os.walk(staging) for name in names)


def _download(store: GcsStore, expected: ObjectInfo, staging: str) -> None:
    path = os.path.join(staging, *expected.key.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        store.get_generation(expected.key, expected.generation, path)
    except FileNotFoundError:
        raise CopyFailed(f"{store.uri}/{expected.key} was replaced or deleted while it was being copied. Nothing was "
                         f"published. Fix: run again once the upload to {store.uri} has finished") from None
    verify_file(path, expected, f"{store.uri}/{expected.key}")


def verify_file(path: str, expected: ObjectInfo, name: str) -> None:
    """Raise CopyFailed unless the file at ``path`` has the size and CRC32C (else MD5) the listing
    gave for object ``name``. Its bytes are flushed to disk first, so what passed is what a reboot keeps."""
    size = _size(path)
    if size != expected.size:
        raise _mismatch(name, path, "size", str(size), str(expected.size))
    kind, listed, hasher = (("CRC32C", expected.crc32c, google_crc32c.Checksum()) if expected.crc32c
                            else ("MD5", expected.md5, hashlib.md5()))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    actual = base64.b64encode(hasher.digest()).decode()  # GCS's form: base64 of the big-endian digest
    if listed and actual != listed:
        raise _mismatch(name, path, kind, actual, listed)


def _mismatch(name: str, path: str, what: str, actual: str, listed: str) -> CopyFailed:
    return CopyFailed(f"{name}: the downloaded copy {path} has {what} {actual}, the bucket lists {listed}. Nothing "
                      "was published. Fix: run again (the transfer was damaged); if it fails again, upload the "
                      "object anew")
