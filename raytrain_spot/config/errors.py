"""The errors a user sees: a bad setting (and the checks that build its message), a task that
breaks its contract."""

from __future__ import annotations

from typing import Any

CONFIG_ERROR_EXIT = 2
"""Exit status of a command that refused its settings (nothing ran)."""


class ConfigError(ValueError):
    """A setting is wrong. The message names the key, the problem and the fix."""


class TaskContractError(RuntimeError):
    """The training task breaks its contract (raytrain_spot/loop/task.py's docstring); the message
    says how and the fix."""


def require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}.")


def require_positive(section: str, obj: Any, *names: str) -> None:
    """Each of ``names`` is > 0; the first that is not is named alone."""
    for name in names:
        value = getattr(obj, name)
        require(value > 0, f"{section}.{name}", f"must be > 0, got {value}", f"set {section}.{name} to a positive number")


def require_non_negative(section: str, obj: Any, *names: str) -> None:
    """Each of ``names`` is >= 0 (None counts as unset); the first that is not is named alone."""
    for name in names:
        value = getattr(obj, name)
        require(value is None or value >= 0, f"{section}.{name}", f"must be >= 0, got {value}",
                f"set {section}.{name}=0 or a positive number")
