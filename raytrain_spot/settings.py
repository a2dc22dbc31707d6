"""A run's settings, checked before Hydra or Ray runs: where the Hydra groups are; bad command-line
overrides (a mistyped key, with a suggestion instead of Hydra's advice to append it; a setting of a
group that is not selected; a literal secret; Hydra's own composition errors reworded); and the
checks the typed config cannot make alone (the task's settings, the simulator's files)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import pathlib
import typing
from importlib.resources.abc import Traversable
from typing import Any, List, Optional

from raytrain_spot.config.errors import ConfigError
from raytrain_spot.config.redaction import secret_keys
from raytrain_spot.config.errors import require
from raytrain_spot.config.schema import DEFAULT_TASK, ChaosConfig, Config
from raytrain_spot.loop.task import TrainingTask, build_task, task_class
from raytrain_spot.simulator.shutdown import StartCommandsError, node_start, read_start_commands
from raytrain_spot.simulator.trace_file import read_trace

CONFIG_MODULE = "raytrain_spot.conf"
"""The package of the Hydra groups (the source tree's top-level ``conf/``, installed under this name)."""
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
"""The same, as run.py's ``hydra.main`` reads it: through package resources, so any install works."""
USER_CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def packaged_configs() -> Traversable:
    """The installed Hydra groups. A package without them is a broken install, never an empty config."""
    try:
        root = importlib.resources.files(CONFIG_MODULE)
    except ModuleNotFoundError:
        root = None
    if root is None or not root.joinpath("config.yaml").is_file():
        raise ConfigError(f"the package's Hydra configs ({CONFIG_MODULE}, conf/ in the source tree) are not "
                          "installed. Fix: reinstall raytrain-spot (pip install raytrain-spot, or pip install -e . "
                          "in the source tree)")
    return root


def checked_task(cfg: Config) -> TrainingTask:
    """The run's task, after what the typed config cannot check alone: the task's own settings
    (checked by building it, cheap by contract) and the simulator's files. Raises ConfigError."""
    task = build_task(cfg.task)
    if cfg.chaos is not None:
        check_chaos_files(cfg.chaos)
    return task


def check_chaos_files(chaos: ChaosConfig) -> None:
    if chaos.mode == "trace":
        ticks = len(read_trace(chaos.trace)[0])
        require(chaos.start_tick < ticks, "chaos.start_tick", f"{chaos.start_tick} is past the trace's {ticks} ticks",
                f"set chaos.start_tick below {ticks}")
    if chaos.node_start is not None:
        try:
            node_start(read_start_commands(chaos.node_start))
        except StartCommandsError as error:
            require(False, "chaos.node_start", f"{chaos.node_start}: {error}",
                    "fix its worker_start_ray_commands, or unset chaos.node_start")


def check_overrides(argv: List[str]) -> None:
    """Raise ConfigError for the first bad override of a command line (or of ``raytrain_spot.start``)."""
    problem = literal_secret(argv) or unknown_override_key(argv)
    if problem:
        raise ConfigError(problem)


def literal_secret(overrides: List[str]) -> Optional[str]:
    """A message for a secret setting given as a literal value: the command line is kept in shell
    histories, the process table and Ray's job entrypoint (its dashboard, ``ray list jobs``)."""
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in secret_keys(Config) and value.strip("'\"") not in ("", "null") and "${" not in value:
            variable = key.upper().replace(".", "_")
            return (f"{key}: a secret on the command line stays in shell histories, the process list and Ray's "
                    f"job entrypoint. Fix: export {variable}=... and pass {key}='${{oc.env:{variable}}}' instead")
    return None


def unknown_override_key(overrides: List[str]) -> Optional[str]:
    """A message for the first ``key=value`` override that names no setting (with a suggestion), or
    that sets a group left out (``chaos.notice_s=5`` without ``+chaos=...``).

    Hydra rejects such keys too, but suggests appending them with ``+``; the right fix is
    almost always a typo. Keys under ``task.`` are checked against the chosen task's settings.
    """
    sources = config_sources(overrides)
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or key.startswith(("+", "~", "-", "hydra.")) or "." not in key:
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
            if not path and _optional_group(part) and not _selects_group(part, overrides, sources):
                return (f"{key}: the {part} group is off, so it has no settings. Fix: select it first, "
                        f"e.g. +{part}={_group_options(part, sources)[0]} {override} "
                        f"(options: {', '.join(_group_options(part, sources))})")
            path.append(part)
            node = _task_of(overrides, sources) if path == ["task"] else typing.get_type_hints(node)[part]
            node = typing.get_args(node)[0] if typing.get_origin(node) is typing.Union else node
    return None


def config_sources(argv: List[str]) -> List[Traversable]:
    """Where Hydra looks for a group's file, first match winning: the user's ``--config-dir``, then the package."""
    sources = [packaged_configs()]
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag in USER_CONFIG_DIR_FLAGS:
            directory = value or (argv[i + 1] if i + 1 < len(argv) else "")
            if not os.path.isdir(directory):
                raise ConfigError(f"{flag}: {directory!r} is not a directory. Fix: name a directory of Hydra "
                                  "config groups, e.g. --config-dir ./my_conf")
            sources.insert(0, pathlib.Path(directory).resolve())
    return sources


def _optional_group(name: str) -> bool:
    """A top-level group that is absent unless selected (``chaos``: ``Optional[...] = None``)."""
    field = next(f for f in dataclasses.fields(Config) if f.name == name)
    kinds = typing.get_args(typing.get_type_hints(Config)[name])
    return field.default is None and any(dataclasses.is_dataclass(kind) for kind in kinds)


def _selects_group(name: str, overrides: List[str], sources: List[Traversable]) -> bool:
    given = dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o)
    return name in given or name in _experiment_groups(given.get("experiment"), sources)


def _group_options(name: str, sources: List[Traversable]) -> List[str]:
    found = {entry.name[:-len(".yaml")] for source in sources if (group := source.joinpath(name)).is_dir()
             for entry in group.iterdir() if entry.name.endswith(".yaml")}
    return sorted(found) or ["..."]


def _task_of(overrides: List[str], sources: List[Traversable]) -> Optional[type]:
    """The task class the overrides choose: ``task._target_``, else the task group's file (``task=NAME``,
    else the experiment's ``override /task: NAME``, else the default); None when it cannot be told."""
    given = dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o)
    target = given.get("task._target_")
    if target is None:
        name = given.get("task") or _experiment_groups(given.get("experiment"), sources).get("task") or "vlm"
        target = _yaml(sources, "task", f"{name}.yaml").get("_target_")
        target = DEFAULT_TASK if name == "vlm" and not target else target
    try:
        return task_class(target) if target and target != "???" else None
    except ValueError:  # the run reports an unimportable task with its own message
        return None


def _experiment_groups(experiment: Optional[str], sources: List[Traversable]) -> dict:
    """The groups an experiment file selects in its defaults list (``override /task: hf_vlm`` -> task)."""
    groups = {}
    for entry in _yaml(sources, "experiment", f"{experiment}.yaml").get("defaults", []) if experiment else []:
        for key, value in entry.items() if isinstance(entry, dict) else ():
            groups[key.removeprefix("override ").lstrip("/")] = value
    return groups


def composition_problem(error: BaseException) -> Optional[str]:
    """The project's message for an error of Hydra's composition (a missing group option, a value of
    the wrong type, an override it cannot parse); None for an error that is not about the input."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        if group:
            options = ", ".join(error.options or []) or "none installed"
            return f"{group}: there is no {name!r}. Fix: use one of {options} ({group}=NAME; +{group}=NAME to add it)"
        return f"{error.missing_cfg_file}: no such config. Fix: check the name and --config-dir"
    if isinstance(error, OverrideParseException):
        return f"{error.override}: {str(error).splitlines()[0]}. Fix: quote the value, e.g. 'key=[a,b]'"
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    if isinstance(cause, (HydraException, OmegaConfBaseException)):
        key = getattr(cause, "full_key", None) or "config"
        problem = str(cause).splitlines()[0].rstrip(".")
        checked = "name" if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) else "value's type"
        return f"{key}: {problem}. Fix: check the {checked} (raytrain_spot/config/schema.py documents each setting)"
    return None


def _yaml(sources: List[Traversable], *parts: str) -> dict:
    """The first source's file at ``parts``; {} when no source has one (Hydra then names the missing file)."""
    import yaml

    for source in sources:
        found = source
        for part in parts:
            found = found.joinpath(part)
        if found.is_file():
            return yaml.safe_load(found.read_text()) or {}
    return {}
