"""The error every bad setting raises, and the checks that build its message."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A setting is wrong. The message names the key, the problem and the fix."""


def require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}.")


def require_positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value > 0, f"{section}.{name}", f"must be > 0, got {value}", f"set {section}.{name} to a positive number")
