"""Catch a mistyped override before Hydra does, with a suggestion instead of Hydra's advice to append it."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, List, Optional

from raytrain_spot.config.schema import DEFAULT_TASK, Config
from raytrain_spot.train.task import task_class

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")
"""The Hydra groups run.py composes from (``config_path="../conf"``)."""


def unknown_override_key(overrides: List[str]) -> Optional[str]:
    """A message for the first ``key=value`` override that names no setting, with a suggestion.

    Hydra rejects such keys too, but suggests appending them with ``+``; the right fix is
    almost always a typo. Keys under ``task.`` are checked against the chosen task's settings.
    """
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or key.startswith(("+", "~", "hydra.")) or "." not in key:
            continue
        node: Any = Config
        path: List[str] = []
        for part in key.split("."):
            names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else None
            if names is None or (path == ["task"] and part == "_target_"):
                break
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1)
                hint = f"did you mean {'.'.join(path + close)}?" if close else \
                    f"settings under {'.'.join(path) or 'the top level'} are: {', '.join(names)}"
                return f"{key}: no such setting. Fix: {hint}"
            path.append(part)
            node = _task_of(overrides) if path == ["task"] else typing.get_type_hints(node)[part]
            node = typing.get_args(node)[0] if typing.get_origin(node) is typing.Union else node
    return None


def _task_of(overrides: List[str]) -> Optional[type]:
    """The task class the overrides choose: ``task._target_``, else the task group's file (``task=NAME``,
    else the experiment's ``override /task: NAME``, else the default); None when it cannot be told."""
    given = dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o)
    target = given.get("task._target_")
    if target is None:
        name = given.get("task") or _experiment_task(given.get("experiment")) or "vlm"
        target = _yaml(os.path.join(CONF_DIR, "task", f"{name}.yaml")).get("_target_")
        target = DEFAULT_TASK if name == "vlm" and not target else target
    try:
        return task_class(target) if target and target != "???" else None
    except ValueError:  # the run reports an unimportable task with its own message
        return None


def _experiment_task(experiment: Optional[str]) -> Optional[str]:
    for entry in _yaml(os.path.join(CONF_DIR, "experiment", f"{experiment}.yaml")).get("defaults", []) if experiment \
            else []:
        if isinstance(entry, dict) and "override /task" in entry:
            return entry["override /task"]
    return None


def _yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except OSError:
        return {}
