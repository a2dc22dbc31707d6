"""What GCE's shutdown does to a Spot VM's processes, read from the commands that started them.

A preempted Spot VM gets the ACPI soft-off, and the guest's systemd stops every unit at once; the
power-off follows 30 s later (``GCE_SHUTDOWN_S``). Which processes a unit's stop signals depends on
where the node's start commands put them:

- a command run over SSH (what ``ray up`` does with ``worker_start_ray_commands``) leaves its
  processes, daemons and ``nohup ... &`` included, in the SSH login's session scope: every one of
  them gets SIGTERM at the soft-off. Ray's raylet and its worker processes exit on it, so a
  training rank on the node dies before its just-in-time checkpoint;
- a command started with ``systemd-run`` runs as a transient service. ``KillMode=mixed`` (or
  ``process``) sends SIGTERM to the service's main process only; the rest of its processes get
  SIGKILL once ``TimeoutStopSec`` has passed (systemd's default: 90 s), or die at the power-off.
  With ``ray start --block`` as the main process, Ray 2.60's own SIGTERM handler drains the node
  (reason PREEMPTION, deadline ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` ahead, 30 s by default),
  waits that long at most for the raylet to finish, and only then stops the node's processes.

``node_start(commands)`` reads a node's start commands (a cluster YAML's
``worker_start_ray_commands``) into that model; the Spot simulator applies it to each virtual VM at
its soft-off. ``GCP_WORKER_START_COMMANDS`` are the commands every ``cluster/gcp-spot*.yaml`` runs
on a worker (tests/test_vm_shutdown.py keeps the files and this list together).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

GCE_SHUTDOWN_S = 30.0
"""Seconds from the ACPI soft-off to the power-off."""
SYSTEMD_DEFAULT_TIMEOUT_STOP_S = 90.0
"""systemd's DefaultTimeoutStopSec: how long a stopping unit's processes get before SIGKILL."""
RAY_DRAIN_TIMEOUT_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"
RAY_DEFAULT_DRAIN_TIMEOUT_S = 30.0
"""Ray 2.60's default for ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` (ray/_private/ray_constants.py)."""
SESSION_SCOPE = "session scope"
KILL_MODES = ("control-group", "mixed", "process")

# Ray's node as a service: `ray start --block` is the main process, only it gets the soft-off's
# SIGTERM (KillMode=mixed); its drain ends 5 s before the power-off (the watcher's --margin-s), and
# the stop timeout outlasts the power-off, so nothing SIGKILLs the node before GCE does. `ray up`
# passes the node type's resources and labels in the command's environment; a service starts with
# a clean one, so they are handed on with --setenv. The watcher is a service of its own.
GCP_WORKER_START_COMMANDS: Tuple[str, ...] = (
    "sudo systemctl stop raytrain-watcher raytrain-ray 2>/dev/null; "
    "sudo systemctl reset-failed raytrain-watcher raytrain-ray 2>/dev/null; true",
    "ray stop",
    "sudo systemd-run --unit=raytrain-ray --collect --uid=\"$(id -u)\" --gid=\"$(id -g)\" "
    "--working-directory=\"$HOME\" -p KillMode=mixed -p TimeoutStopSec=60 -p LimitNOFILE=65536 "
    "--setenv=HOME=\"$HOME\" --setenv=PATH=\"$PATH\" --setenv=RAY_AUTH_MODE=token "
    "--setenv=RAY_preload_python_modules=raytrain_spot.elastic.preload "
    "--setenv=RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=25 "
    "--setenv=RAY_OVERRIDE_RESOURCES=\"$RAY_OVERRIDE_RESOURCES\" --setenv=RAY_OVERRIDE_LABELS=\"$RAY_OVERRIDE_LABELS\" "
    "\"$HOME/venv/bin/ray\" start --block --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
    "sudo systemd-run --unit=raytrain-watcher --collect --uid=\"$(id -u)\" --gid=\"$(id -g)\" "
    "--working-directory=\"$HOME\" -p Restart=on-failure -p RestartSec=5 "
    "--setenv=HOME=\"$HOME\" --setenv=RAY_ADDRESS=$RAY_HEAD_IP:6379 --setenv=RAY_AUTH_MODE=token "
    "\"$HOME/venv/bin/python\" -m raytrain_spot.preemption.watcher --margin-s 5 --notice-s 150",
)

# systemd-run options that take a value in the next word when written without "=".
_VALUE_OPTIONS = {"-u", "--unit", "-p", "--property", "-E", "--setenv", "--uid", "--gid", "--working-directory",
                  "-M", "--machine", "-H", "--host", "--description", "--slice", "--nice", "--service-type",
                  "--on-active", "--on-boot", "--on-startup", "--on-unit-active", "--on-unit-inactive",
                  "--on-calendar", "--path-property", "--socket-property", "--timer-property"}
_SEPARATORS = {";", "&", "&&", "||", "|", "(", ")", "\n"}


class StartCommandsError(ValueError):
    """The node's start commands cannot be modelled; the message says what to change."""


@dataclass(frozen=True)
class Placement:
    """Where one long-running process of the node lives when systemd stops the VM."""

    unit: str
    """``SESSION_SCOPE`` or the service's unit name."""
    command: Tuple[str, ...]
    """The process's command line as the start command wrote it."""
    kill_mode: str = "control-group"
    """Whom the unit's stop sends SIGTERM: every process (control-group), or the main one only."""
    stop_timeout_s: float = SYSTEMD_DEFAULT_TIMEOUT_STOP_S
    """Seconds after the stop's SIGTERM when systemd SIGKILLs what is left of the unit."""
    environment: Dict[str, str] = field(default_factory=dict)
    """What the unit sets in the process's environment (``--setenv``)."""

    @property
    def in_service(self) -> bool:
        return self.unit != SESSION_SCOPE

    @property
    def main_only(self) -> bool:
        """The soft-off signals the main process only; the others live on until the stop times out."""
        return self.in_service and self.kill_mode in ("mixed", "process")


@dataclass(frozen=True)
class NodeStart:
    """The model of one worker VM: where its Ray node and its preemption watcher run."""

    ray: Placement
    watcher: Optional[Placement]

    @property
    def ray_drain_timeout_s(self) -> float:
        """How long ``ray start --block`` drains on SIGTERM before it stops the node's processes."""
        value = self.ray.environment.get(RAY_DRAIN_TIMEOUT_ENV, os.environ.get(RAY_DRAIN_TIMEOUT_ENV))
        return float(value) if value is not None else RAY_DEFAULT_DRAIN_TIMEOUT_S

    def describe(self) -> str:
        def one(name: str, placement: Optional[Placement]) -> str:
            if placement is None:
                return f"no {name}"
            if not placement.in_service:
                return f"{name} in the SSH session scope (SIGTERM at the soft-off)"
            signalled = "its main process" if placement.main_only else "every process"
            return (f"{name} in {placement.unit} (KillMode={placement.kill_mode}: SIGTERM to {signalled} at the "
                    f"soft-off, SIGKILL {placement.stop_timeout_s:g} s later)")

        return "; ".join((one("Ray's node", self.ray), one("the watcher", self.watcher)))


def _words(command: str) -> List[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    return list(lexer)


def _statements(words: List[str]) -> List[List[str]]:
    statements, current = [], []
    for word in words:
        if word in _SEPARATORS:
            statements.append(current)
            current = []
        else:
            current.append(word)
    return [s for s in statements + [current] if s]


def _program(words: Sequence[str]) -> Optional[str]:
    """``ray`` for a ``ray start``, ``watcher`` for the preemption watcher, else None."""
    for i, word in enumerate(words):
        if os.path.basename(word) == "ray" and i + 1 < len(words) and words[i + 1] == "start":
            return "ray"
        if word == "-m" and i + 1 < len(words) and words[i + 1] == "raytrain_spot.preemption.watcher":
            return "watcher"
    return None


def _seconds(value: str, name: str) -> float:
    """A systemd time span in seconds (``60``, ``60s``, ``2min``, ``infinity``)."""
    text = value.strip()
    if text == "infinity":
        return float("inf")
    for suffix, factor in (("min", 60.0), ("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix) and text[:-len(suffix)].replace(".", "", 1).isdigit():
            return float(text[:-len(suffix)]) * factor
    try:
        return float(text)
    except ValueError:
        raise StartCommandsError(f"{name}={value!r} is not a time span the simulator reads; write seconds, "
                                 "e.g. TimeoutStopSec=60") from None


def _systemd_run(words: List[str]) -> Tuple[Placement, List[str]]:
    """The placement a ``systemd-run ...`` statement gives its command, and that command."""
    unit, kill_mode, stop_timeout_s, scope, environment = None, "control-group", SYSTEMD_DEFAULT_TIMEOUT_STOP_S, False, {}
    i = words.index("systemd-run") + 1
    while i < len(words) and words[i].startswith("-"):
        option, has_value, value = words[i].partition("=")
        if not has_value and option in _VALUE_OPTIONS:
            i += 1
            value = words[i] if i < len(words) else ""
        i += 1
        if option in ("-u", "--unit"):
            unit = value
        elif option == "--scope":
            scope = True
        elif option in ("-E", "--setenv"):
            key, _, setting = value.partition("=")
            environment[key] = setting
        elif option in ("-p", "--property"):
            key, _, setting = value.partition("=")
            if key == "KillMode":
                if setting not in KILL_MODES:
                    raise StartCommandsError(f"systemd-run -p KillMode={setting}: not one of {KILL_MODES}")
                kill_mode = setting
            elif key in ("TimeoutStopSec", "TimeoutSec"):
                stop_timeout_s = _seconds(setting, key)
    command = words[i:]
    if scope:  # a scope has no main process: its stop signals all of it
        kill_mode = "control-group"
    return Placement(unit=unit or ("run-<random>.scope" if scope else "run-<random>.service"), command=tuple(command), kill_mode=kill_mode, stop_timeout_s=stop_timeout_s,
                     environment=environment), command


def node_start(commands: Sequence[str]) -> NodeStart:
    """The model of a worker VM started by these commands. Raises StartCommandsError naming the fix."""
    found: Dict[str, Placement] = {}
    for command in commands:
        for words in _statements(_words(command)):
            if "systemd-run" in words:
                placement, started = _systemd_run(words)
            else:
                placement, started = Placement(unit=SESSION_SCOPE, command=tuple(words)), words
            program = _program(started)
            if program is None:
                continue
            if program in found:
                raise StartCommandsError(f"the start commands start {program} twice ({' '.join(found[program].command)!r} "
                                         f"and {' '.join(started)!r}); keep one")
            # A service ends when its main process does; a scope lives as long as any of its processes.
            if program == "ray" and placement.in_service and "--scope" not in words and "--block" not in started:
                raise StartCommandsError(f"{placement.unit} runs `ray start` without --block: the command returns at "
                                         "once, systemd then stops the service and Ray's node with it; add --block")
            found[program] = placement
    if "ray" not in found:
        raise StartCommandsError("the start commands start no Ray node (no `ray start`); the simulator models where "
                                 "they put it (add the worker_start_ray_commands of a cluster YAML)")
    return NodeStart(ray=found["ray"], watcher=found.get("watcher"))


def read_start_commands(cluster_yaml: Optional[str]) -> Sequence[str]:
    """A cluster YAML's ``worker_start_ray_commands``; without a file, the GCP files' own."""
    if cluster_yaml is None:
        return GCP_WORKER_START_COMMANDS
    try:
        with open(os.path.expanduser(cluster_yaml)) as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise StartCommandsError(f"{cluster_yaml} is not YAML: {error}") from None
    commands = config.get("worker_start_ray_commands")
    if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
        raise StartCommandsError(f"{cluster_yaml} has no list of worker_start_ray_commands to start a node with")
    return commands


@dataclass(frozen=True)
class ShutdownTimes:
    """When GCE's shutdown steps come, in seconds after the metadata notice."""

    soft_off_s: float
    power_off_s: float

    @property
    def scale(self) -> float:
        """Simulated seconds per GCE second of the soft-off's window: a notice shorter than 30 s
        compresses the window, and the units' timeouts with it."""
        return (self.power_off_s - self.soft_off_s) / GCE_SHUTDOWN_S


def shutdown_times(notice_s: float) -> ShutdownTimes:
    """The soft-off comes ``GCE_SHUTDOWN_S`` before the power-off, and never before the notice:
    with GCE's default notice the metadata turns TRUE at the soft-off, with
    ``preemptionNoticeDuration`` that much before it (a 150 s notice: soft-off at 120 s)."""
    return ShutdownTimes(soft_off_s=max(0.0, notice_s - GCE_SHUTDOWN_S), power_off_s=notice_s)
