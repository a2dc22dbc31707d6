"""Checkpoint storage in a GCS bucket (``gs://bucket/prefix``) on the official google-cloud-storage client.

Integrity: every upload carries a CRC32C that the client checks against the server's; a
large file goes up as parts uploaded concurrently as temporary objects and is then
``compose``d into place, and the composite's CRC32C must equal the combination of the
parts' checksums. A manifest is committed with ``put_bytes(..., if_absent=True)``, an
``ifGenerationMatch=0`` single-request upload, so it lands whole or not at all and never
overwrites. Transient errors (429, 5xx, broken connections) are retried with exponential
backoff up to ``retry_deadline_s`` per request, then raised.

Against an emulator (``STORAGE_EMULATOR_HOST``, e.g. fake-gcs-server) the client uses
anonymous credentials; otherwise Application Default Credentials.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, Iterable, List, Optional, Sequence
from urllib.parse import urlsplit

import google.auth
import google.auth.exceptions
import google_crc32c
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from raytrain_spot.storage.store import Listed

logger = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
READ_WRITE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
DEFAULT_RETRY_DEADLINE_S = 120.0
MAX_COMPOSE_SOURCES = 32  # GCS accepts at most 32 source objects per compose request
# Temporary part objects live next to their target, so deleting a checkpoint directory
# also sweeps parts a crashed uploader left behind.
PART_MARKER = ".partial-"
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_MIB = 1 << 20
_RESUMABLE_CHUNK_UNIT = 256 * 1024


class GcsAccessError(RuntimeError):
    """Credentials, bucket or endpoint unusable; the message names ``storage.uri`` and the fix."""


class ChecksumMismatch(IOError):
    """An object's CRC32C on the server differs from what was uploaded."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object as a listing reports it: enough to fetch exactly that version and check the bytes."""

    key: str
    """Relative to the store's root."""
    size: int
    generation: str
    """The object's version: a re-upload, even of the same bytes, gets a new one."""
    crc32c: Optional[str]
    """Base64 of the big-endian CRC32C, as GCS reports it."""
    md5: Optional[str]
    """Base64 MD5; composed objects have none."""


def parse_gs_uri(uri: str, setting: str = "storage.uri") -> tuple[str, str]:
    """``gs://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; errors name ``setting``, the URI's source."""
    if not uri.startswith("gs://"):
        raise ValueError(f"{setting}={uri!r} is not a GCS URI: use gs://<bucket>/<prefix>")
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise ValueError(f"{setting}={uri!r}: {bucket!r} is not a valid bucket name (3-222 characters: "
                         "lowercase letters, digits, '-', '_', '.'): fix the bucket part of gs://<bucket>/<prefix>")
    return bucket, prefix.strip("/")


def _emulator_from_env() -> Optional[str]:
    host = os.environ.get(EMULATOR_ENV)
    if not host:
        return None
    # The client expects a scheme ("despite the name"); accept a bare host:port too.
    return host if "://" in host else f"http://{host}"


def default_client(uri: str, emulator_host: Optional[str]) -> storage.Client:
    """An anonymous client for an emulator, else one on Application Default Credentials."""
    if emulator_host:
        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator")
        return storage.Client(project=project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": emulator_host})
    try:
        credentials, project = google.auth.default(scopes=[READ_WRITE_SCOPE])
    except google.auth.exceptions.DefaultCredentialsError as error:
        raise GcsAccessError(
            f"storage.uri={uri} needs Google Cloud credentials and none were found ({error}). Fix one of: "
            "run `gcloud auth application-default login` on this machine; set GOOGLE_APPLICATION_CREDENTIALS "
            "to a service-account key file; on a GCE VM, give the VM's service account the scope "
            f"{READ_WRITE_SCOPE} (devstorage.read_write); or use a file:// storage.uri") from None
    return storage.Client(project=project, credentials=credentials)


def _crc32c_base64(crc: int) -> str:
    """The form GCS reports checksums in: base64 of the big-endian 32-bit value."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _crc32c_int(encoded: str) -> int:
    return int.from_bytes(base64.b64decode(encoded), "big")


# CRC32C of a concatenation from the parts' CRCs: appending len(B) bytes to A advances
# A's CRC register through len(B) zero bytes (a linear map over GF(2)), then B's CRC is
# XORed in; the initial and final inversions cancel. The map for n bytes is built by
# squaring the one-bit map, so combining costs O(log n), not a pass over the data.
_CRC32C_REFLECTED_POLY = 0x82F63B78


def _apply(columns: Sequence[int], vector: int) -> int:
    result, bit = 0, 0
    while vector:
        if vector & 1:
            result ^= columns[bit]
        vector >>= 1
        bit += 1
    return result


def _then(first: Sequence[int], second: Sequence[int]) -> List[int]:
    """The linear map ``second(first(x))``, as columns."""
    return [_apply(second, column) for column in first]


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC32C of A+B given CRC32C(A), CRC32C(B) and len(B) in bytes."""
    step = [_CRC32C_REFLECTED_POLY] + [1 << bit for bit in range(31)]  # one zero bit
    for _ in range(3):
        step = _then(step, step)  # 2, 4, then 8 zero bits: one zero byte
    register, remaining = crc_a, length_b
    while remaining:
        if remaining & 1:
            register = _apply(step, register)
        remaining >>= 1
        if remaining:
            step = _then(step, step)
    return register ^ crc_b


class _FileWindow(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of a file, as a stream whose position starts at 0.

    The resumable-upload client insists that the stream position equals the bytes it has
    sent, so each part needs its own zero-based view of the file.
    """

    def __init__(self, fd: int, offset: int, length: int):
        super().__init__()
        self._fd, self._offset, self.length, self._position = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.length}[whence]
        self._position = min(max(base + position, 0), self.length)
        return self._position

    def read(self, size: Optional[int] = -1) -> bytes:
        remaining = self.length - self._position
        count = remaining if size is None or size < 0 else min(size, remaining)
        data = os.pread(self._fd, count, self._offset + self._position)
        self._position += len(data)
        return data


class GcsStore:
    """The ``Store`` protocol (raytrain_spot.storage.store) over ``gs://bucket/prefix``.

    Files of at least ``parallel_threshold_bytes`` are uploaded as up to 32 parts of at least
    ``min_part_bytes`` by ``workers`` threads, then composed; smaller files in one stream.
    ``retry_deadline_s`` bounds the retries of each request; ``request_timeout_s`` bounds
    one HTTP attempt (connect and each read). A huge ``parallel_threshold_bytes`` turns
    parallel uploads off; more than 10 ``workers`` outgrow the client's connection pool.
    """

    def __init__(self, uri: str, *, client: Optional[storage.Client] = None,
                 emulator_host: Optional[str] = None,
                 retry_deadline_s: float = DEFAULT_RETRY_DEADLINE_S, request_timeout_s: float = 60.0,
                 parallel_threshold_bytes: int = 64 * _MIB, min_part_bytes: int = 16 * _MIB,
                 workers: int = 8, upload_chunk_bytes: int = 32 * _MIB):
        for setting, value in [("retry_deadline_s", retry_deadline_s), ("request_timeout_s", request_timeout_s),
                               ("parallel_threshold_bytes", parallel_threshold_bytes),
                               ("min_part_bytes", min_part_bytes), ("workers", workers)]:
            if value <= 0:
                raise ValueError(f"GcsStore {setting}={value}: must be positive")
        if upload_chunk_bytes <= 0 or upload_chunk_bytes % _RESUMABLE_CHUNK_UNIT:
            raise ValueError(f"GcsStore upload_chunk_bytes={upload_chunk_bytes}: must be a positive multiple of "
                             f"{_RESUMABLE_CHUNK_UNIT} (256 KiB), as GCS resumable uploads require")
        self.bucket_name, self.prefix = parse_gs_uri(uri)
        self.uri = f"gs://{self.bucket_name}/{self.prefix}".rstrip("/")
        self.emulator_host = emulator_host or _emulator_from_env()
        self.client = client or default_client(self.uri, self.emulator_host)
        self.bucket = self.client.bucket(self.bucket_name)
        self.retry_deadline_s = retry_deadline_s
        self.request_timeout_s = request_timeout_s
        self.parallel_threshold_bytes = parallel_threshold_bytes
        self.min_part_bytes = min_part_bytes
        self.workers = workers
        # A resumable upload holds one chunk in memory, so this times ``workers`` bounds the
        # memory a parallel upload takes.
        self.upload_chunk_bytes = upload_chunk_bytes
        self._retry: Retry = DEFAULT_RETRY.with_timeout(retry_deadline_s)

    @classmethod
    def from_uri(cls, uri: str, **options) -> "GcsStore":
        return cls(uri, **options)

    # -- names ---------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        """Object name of ``key``; ``""`` is the store root."""
        key = key.strip("/")
        if key and any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"key {key!r} has an empty, '.' or '..' segment: keys are relative to {self.uri}")
        return "/".join(part for part in (self.prefix, key) if part)

    def _directory(self, prefix: str) -> str:
        name = self._name(prefix)
        return f"{name}/" if name else ""

    def _blob(self, key: str) -> storage.Blob:
        return self.bucket.blob(self._name(key))

    def _call_kwargs(self) -> dict:
        return {"retry": self._retry, "timeout": self.request_timeout_s}

    # -- writes --------------------------------------------------------------------------

    def put_file(self, key: str, local_path: str) -> None:
        size = os.path.getsize(local_path)
        try:
            if size < self.parallel_threshold_bytes:
                self._blob(key).upload_from_filename(local_path, checksum="crc32c", **self._call_kwargs())
            else:
                self._put_composite(key, local_path, size)
        except Exception as error:
            # Client errors (e.g. "RetryError: Timeout of 120.0s exceeded") do not say what failed.
            error.add_note(f"uploading {local_path} ({size} bytes) to {self.uri}/{key}")
            raise

    def _put_composite(self, key: str, local_path: str, size: int) -> None:
        started = time.monotonic()
        part_bytes = max(self.min_part_bytes, math.ceil(size / MAX_COMPOSE_SOURCES))
        offsets = range(0, size, part_bytes)
        attempt = uuid.uuid4().hex[:12]
        parts = [self.bucket.blob(f"{self._name(key)}{PART_MARKER}{attempt}-{index:02d}")
                 for index in range(len(offsets))]
        uploaded = False
        with ThreadPoolExecutor(max_workers=min(self.workers, len(parts)), thread_name_prefix="gcs-upload") as pool:
            try:
                with open(local_path, "rb") as source:
                    uploads = [pool.submit(self._put_part, part, _FileWindow(source.fileno(), offset,
                                                                             min(part_bytes, size - offset)))
                               for part, offset in zip(parts, offsets)]
                    _wait_all_or_first_error(uploads)
                target = self._blob(key)
                # Retrying a compose is safe here: the same parts give the same bytes.
                target.compose(parts, **self._call_kwargs())
                self._verify_composite(target, parts)
                uploaded = True
            finally:
                # After a failure the endpoint is likely down: one quick try, no retries, so the
                # error surfaces within the deadline; retention sweeps leftover ``.partial-`` parts.
                self._delete_quietly(pool, parts, self._retry if uploaded else None)
        elapsed = time.monotonic() - started
        logger.info("uploaded %s/%s: %.0f MiB as %d composed parts of %.0f MiB with %d workers in %.2f s (%.0f MB/s)",
                    self.uri, key, size / _MIB, len(parts), part_bytes / _MIB, min(self.workers, len(parts)),
                    elapsed, size / 1e6 / max(elapsed, 1e-9))

    def _put_part(self, part: storage.Blob, window: _FileWindow) -> None:
        part.chunk_size = self.upload_chunk_bytes
        # checksum="crc32c": the client checks its running CRC against the server's and raises
        # DataCorruption (deleting the part) on a mismatch.
        part.upload_from_file(window, size=window.length,
                              content_type="application/octet-stream", checksum="crc32c",
                              **self._call_kwargs())

    def _verify_composite(self, target: storage.Blob, parts: Sequence[storage.Blob]) -> None:
        expected = _crc32c_int(parts[0].crc32c)
        for part in parts[1:]:
            expected = crc32c_combine(expected, _crc32c_int(part.crc32c), part.size)
        if target.crc32c != _crc32c_base64(expected):
            target.delete(**self._call_kwargs())  # wrong bytes are worse than no object
            raise ChecksumMismatch(f"gs://{self.bucket_name}/{target.name}: composed CRC32C {target.crc32c} != "
                                   f"{_crc32c_base64(expected)} combined from its {len(parts)} parts; deleted it")

    def _delete_quietly(self, pool: ThreadPoolExecutor, blobs: Iterable[storage.Blob],
                        retry: Optional[Retry]) -> None:
        def delete(blob: storage.Blob) -> None:
            try:
                blob.delete(retry=retry, timeout=self.request_timeout_s)
            except api_exceptions.NotFound:
                pass
            except Exception as error:  # cleanup must not mask the upload's own outcome
                logger.warning("could not delete temporary part gs://%s/%s (%s); retention removes it later",
                               self.bucket_name, blob.name, type(error).__name__)
        list(pool.map(delete, blobs))

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> bool:
        """Write ``data``; with ``if_absent`` never replace an existing object and return False instead.

        ``if_absent`` uses ``ifGenerationMatch=0``. Objects up to 8 MiB go up in one request,
        so they appear whole or not at all. If a retried request finds the key already holding
        exactly ``data`` (its first attempt landed, the response was lost), that counts as written.
        """
        blob = self._blob(key)
        try:
            blob.upload_from_string(data, content_type="application/octet-stream", checksum="crc32c",
                                    if_generation_match=0 if if_absent else None, **self._call_kwargs())
            return True
        except api_exceptions.PreconditionFailed:
            existing = self._blob(key)
            try:
                existing.reload(**self._call_kwargs())
            except api_exceptions.NotFound:
                return False
            return existing.size == len(data) and existing.crc32c == _crc32c_base64(google_crc32c.value(data))

    def put_if_version(self, key: str, data: bytes, version: Optional[str]) -> Optional[str]:
        """Write only if the object is still at generation ``version`` (None: only if absent);
        return the new generation, or None when the object has moved on."""
        blob = self._blob(key)
        try:
            blob.upload_from_string(data, content_type="application/octet-stream", checksum="crc32c",
                                    if_generation_match=0 if version is None else int(version), **self._call_kwargs())
        except api_exceptions.PreconditionFailed:
            return None
        return str(blob.generation)  # the upload's response set it

    # -- reads ---------------------------------------------------------------------------

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        while True:
            blob = self._blob(key)
            try:
                blob.reload(**self._call_kwargs())
                data = blob.download_as_bytes(checksum="crc32c", if_generation_match=blob.generation,
                                              **self._call_kwargs())
            except api_exceptions.NotFound:
                raise FileNotFoundError(f"{self.uri}/{key}") from None
            except api_exceptions.PreconditionFailed:
                continue  # replaced between the two requests: read the new one
            return data, str(blob.generation)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._blob(key).download_as_bytes(checksum="crc32c", **self._call_kwargs())
        except api_exceptions.NotFound:
            raise FileNotFoundError(f"{self.uri}/{key}") from None

    def get_file(self, key: str, local_path: str) -> None:
        try:
            # On failure the client removes the partly written local file.
            self._blob(key).download_to_filename(local_path, checksum="crc32c", **self._call_kwargs())
        except api_exceptions.NotFound:
            raise FileNotFoundError(f"{self.uri}/{key}") from None

    def get_generation(self, key: str, generation: str, local_path: str) -> None:
        """Download ``key`` as it was at ``generation`` (from a listing), so the bytes match what that
        listing said. Raise FileNotFoundError once that generation is gone (replaced or deleted)."""
        try:
            self.bucket.blob(self._name(key), generation=int(generation)).download_to_filename(
                local_path, checksum="crc32c", **self._call_kwargs())
        except api_exceptions.NotFound:
            raise FileNotFoundError(f"{self.uri}/{key} at generation {generation}") from None

    def local_path(self, key: str) -> None:
        return None

    def exists(self, key: str) -> bool:
        return self._blob(key).exists(**self._call_kwargs())

    def list_children(self, prefix: str) -> List[str]:
        directory = self._directory(prefix)
        listing = self.client.list_blobs(self.bucket_name, prefix=directory, delimiter="/", **self._call_kwargs())
        names = {blob.name[len(directory):] for blob in listing}  # consuming pages fills .prefixes
        names |= {sub[len(directory):].rstrip("/") for sub in listing.prefixes}
        names.discard("")  # a placeholder object named like the directory itself
        return sorted(names)

    def list_files(self, prefix: str) -> Dict[str, Listed]:
        """The objects directly under ``prefix`` with the size and CRC32C the server computed."""
        directory = self._directory(prefix)
        listing = self.client.list_blobs(self.bucket_name, prefix=directory, delimiter="/", **self._call_kwargs())
        return {blob.name[len(directory):]: Listed(blob.size, blob.crc32c and base64.b64decode(blob.crc32c).hex())
                for blob in listing if blob.name != directory}

    def list_objects(self, prefix: str = "") -> List[ObjectInfo]:
        """Every object under ``prefix``, at any depth, with its size, generation and hashes, in name
        order. A "folder" placeholder (an empty object named ``dir/``) is listed with its trailing slash."""
        root = self._directory("")
        listing = self.client.list_blobs(self.bucket_name, prefix=self._directory(prefix), **self._call_kwargs())
        return [ObjectInfo(key=blob.name[len(root):], size=blob.size, generation=str(blob.generation),
                           crc32c=blob.crc32c, md5=blob.md5_hash) for blob in listing]

    def delete_prefix(self, prefix: str) -> None:
        directory = self._directory(prefix)
        blobs = list(self.client.list_blobs(self.bucket_name, prefix=directory, **self._call_kwargs()))
        if directory:
            blobs.append(self.bucket.blob(directory.rstrip("/")))  # the key itself, if it is an object

        def delete(blob: storage.Blob) -> None:
            try:
                blob.delete(**self._call_kwargs())
            except api_exceptions.NotFound:
                pass
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="gcs-delete") as pool:
            _wait_all_or_first_error([pool.submit(delete, blob) for blob in blobs])

    # -- setup checks and Ray ------------------------------------------------------------

    def check_access(self) -> None:
        """List, write and delete under the prefix once; raise GcsAccessError naming the problem and fix.

        Meant for the driver, before Ray starts, so a bad bucket fails in seconds rather than
        at the first checkpoint upload hours into a run.
        """
        probe = self.bucket.blob(self._name(f".access-check-{uuid.uuid4().hex[:12]}"))
        steps: List[tuple[str, Callable[[], object]]] = [
            ("list", lambda: next(iter(self.client.list_blobs(self.bucket_name, prefix=self._directory(""),
                                                              max_results=1, **self._call_kwargs())), None)),
            ("write", lambda: probe.upload_from_string(b"", if_generation_match=0, **self._call_kwargs())),
            ("delete", lambda: probe.delete(**self._call_kwargs())),
        ]
        where = f"storage.uri={self.uri}"
        endpoint = self.emulator_host or "https://storage.googleapis.com"
        for action, step in steps:
            try:
                step()
            except api_exceptions.NotFound as error:
                raise GcsAccessError(
                    f"{where}: bucket {self.bucket_name!r} does not exist at {endpoint} ({error.message}). Create it "
                    f"(`gcloud storage buckets create gs://{self.bucket_name} --location=<region>`) or fix "
                    "storage.uri") from None
            except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as error:
                raise GcsAccessError(
                    f"{where}: the credentials may not {action} objects in bucket {self.bucket_name!r} "
                    f"({error.code} {error.message}). Grant the account roles/storage.objectAdmin on the bucket "
                    f"and, on a GCE VM, the scope {READ_WRITE_SCOPE}; or fix storage.uri") from None
            except Exception as error:
                raise GcsAccessError(
                    f"{where}: cannot {action} objects at {endpoint} within {self.retry_deadline_s:g} s "
                    f"({type(error).__name__}: {error}). Check the network path to GCS (or "
                    f"{EMULATOR_ENV} for an emulator)") from None

    def pyarrow_filesystem(self):
        """A ``pyarrow.fs.GcsFileSystem`` on the same endpoint, for ``RunConfig(storage_filesystem=...)``."""
        from pyarrow import fs

        retry_time_limit = timedelta(seconds=self.retry_deadline_s)
        if self.emulator_host:
            endpoint = urlsplit(self.emulator_host)
            return fs.GcsFileSystem(anonymous=True, scheme=endpoint.scheme, endpoint_override=endpoint.netloc,
                                    retry_time_limit=retry_time_limit)
        return fs.GcsFileSystem(retry_time_limit=retry_time_limit)

    def ray_storage_path(self) -> str:
        """``bucket/prefix``: the path Ray expects beside an explicit ``storage_filesystem``."""
        return f"{self.bucket_name}/{self.prefix}".rstrip("/")


def _wait_all_or_first_error(futures: List[Future]) -> None:
    """Wait for all; on the first error cancel what has not started, let the rest finish, re-raise."""
    _, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for future in pending:
        future.cancel()
    wait(pending)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()
