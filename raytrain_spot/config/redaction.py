"""Secrets in settings (a webhook URL that carries its token) never reach a file or a log line.

A setting is secret when its dataclass field says so (``field(metadata=SECRET)``). Whatever is
persisted or shipped (checkpoint manifests, the workers' copy of the config, Hydra's ``.hydra/``
dump) holds ``REDACTED`` in its place, and error text that may echo it goes through ``scrub``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, List

SECRET = {"secret": True}
REDACTED = "<redacted>"


def secret_values(config: Any) -> List[str]:
    """The values of every secret field set in a nest of config dataclasses."""
    found: List[str] = []
    if dataclasses.is_dataclass(config):
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if f.metadata.get("secret") and isinstance(value, str) and value and value != REDACTED:
                found.append(value)
            else:
                found += secret_values(value)
    return found


def redacted_dict(config: Any) -> dict:
    """``dataclasses.asdict(config)`` with every secret field that is set replaced by REDACTED."""
    values = dataclasses.asdict(config)
    _redact(config, values)
    return values


def _redact(config: Any, values: dict) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("secret"):
            if value:
                values[f.name] = REDACTED
        elif dataclasses.is_dataclass(value):
            _redact(value, values[f.name])


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def scrub_files(directory: str, secrets: Iterable[str]) -> None:
    """Rewrite every file under ``directory`` with the secrets replaced (Hydra's own dumps)."""
    secrets = [s for s in secrets if s]
    if not secrets or not os.path.isdir(directory):
        return
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
            if any(secret in text for secret in secrets):
                with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
                    f.write(scrub(text, secrets))
