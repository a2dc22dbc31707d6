"""Object storage behind a URI: local files and Google Cloud Storage."""

from __future__ import annotations

from typing import Optional

from raytrain_spot.storage.store import LocalStore, Store


def open_store(uri: str, retry_deadline_s: Optional[float] = None) -> Store:
    """The Store for a ``file://`` or ``gs://`` URI. ``retry_deadline_s`` bounds how long a GCS
    request is retried (default: the client's 120 s), for callers that must not block that long."""
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://"):])
    if uri.startswith("gs://"):
        from raytrain_spot.storage.gcs import GcsStore  # only where a gs:// URI needs the client

        return GcsStore.from_uri(uri, **({"retry_deadline_s": retry_deadline_s} if retry_deadline_s else {}))
    raise ValueError(f"unsupported storage URI {uri!r}: use file:///path or gs://bucket/prefix")
