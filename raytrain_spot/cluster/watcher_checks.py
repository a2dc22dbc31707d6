"""The checks of how a cluster YAML starts the preemption watcher and Ray's node: the watcher runs on
Spot workers, Ray's node survives the preemption's soft-off, and the watcher's ``--notice-s`` and
``--margin-s`` match the notice GCE gives the Spot types."""

from __future__ import annotations

import re
from typing import List, Optional

from raytrain_spot.cluster.cluster_yaml import NOTICE_KEY, SPOT, Problem, advance_notice_s, notice_of, pricing_of
from raytrain_spot.preemption.drain_decision import GCE_SHUTDOWN_S

WATCHER_MODULE = "raytrain_spot.preemption.watcher"
_WATCHER_FLAG = r"--{}(?:=|\s+)(\S+)"


def watcher_flag(command: str, flag: str, default: float) -> Optional[float]:
    """The watcher's ``--flag`` value in a start command (its default when absent), None if not a number."""
    match = re.search(_WATCHER_FLAG.format(flag), command.split(WATCHER_MODULE, 1)[-1])
    if match is None:
        return default
    try:
        return float(match.group(1))
    except ValueError:
        return None


def check_watcher(config: dict) -> List[Problem]:
    spot_workers = [name for name, node_type in config["available_node_types"].items()
                    if name != config["head_node_type"] and pricing_of(node_type, gcp=True) == SPOT]
    watchers = [command for command in config.get("worker_start_ray_commands", []) if WATCHER_MODULE in command]
    if spot_workers and not watchers:
        return [Problem("cluster", "worker_start_ray_commands",
                        f"do not start the preemption watcher, so {', '.join(spot_workers)} nodes die without "
                        "a drain or a just-in-time checkpoint",
                        "start it as a service, as cluster/gcp-spot.yaml does (sudo systemd-run "
                        f"--unit=raytrain-watcher ... python -m {WATCHER_MODULE} --margin-s 5 --notice-s 30)")]
    if not watchers:
        return []
    return _check_ray_survives_the_soft_off(config) + _check_watcher_notice(config, spot_workers, watchers[0])


def _check_ray_survives_the_soft_off(config: dict) -> List[Problem]:
    """At a preemption's ACPI soft-off systemd stops the VM: Ray's node must be where only its main
    process is signalled (raytrain_spot/simulator/shutdown.py, docs/preemption.md "GCE's shutdown")."""
    from raytrain_spot.simulator.shutdown import StartCommandsError, node_start

    key, shipped = "worker_start_ray_commands", "start Ray's node as cluster/gcp-spot.yaml does"
    try:
        ray = node_start(config.get(key, [])).ray
    except StartCommandsError as error:
        return [Problem("cluster", key, str(error), shipped)]
    if ray.main_only:
        return []
    where = "in the SSH session `ray up` runs them in" if not ray.in_service else \
        f"in {ray.unit} with KillMode={ray.kill_mode}"
    return [Problem("cluster", key, f"start Ray's node {where}: at a preemption's soft-off systemd SIGTERMs the raylet "
                    "and the training ranks on it at once, before their just-in-time checkpoint",
                    f"{shipped}: sudo systemd-run --unit=raytrain-ray -p KillMode=mixed ... ray start --block")]


def _check_watcher_notice(config: dict, spot_workers: List[str], command: str) -> List[Problem]:
    """The watcher's drain deadline is ``--notice-s`` after the metadata notice (minus the margin):
    it must be the notice GCE gives the Spot types. The start commands are shared by every worker
    type, so every Spot type needs the same notice."""
    key = "worker_start_ray_commands"
    notice_s = watcher_flag(command, "notice-s", GCE_SHUTDOWN_S)
    margin_s = watcher_flag(command, "margin-s", 5.0)
    if notice_s is None or margin_s is None:
        return [Problem("cluster", key, "pass the preemption watcher a --notice-s or --margin-s that is not a number",
                        "write seconds, e.g. --margin-s 5 --notice-s 30")]
    types = config["available_node_types"]
    if any(advance_notice_s(types[name].get("node_config", {}))[1] for name in spot_workers):
        return []  # a notice GCE would refuse is reported on its node type; nothing to compare yet
    notices = {name: notice_of(types[name], gcp=True) for name in spot_workers}
    if len(set(notices.values())) > 1:
        listed = ", ".join(f"{name} {notice:.0f} s" for name, notice in sorted(notices.items()))
        return [Problem("cluster", f"available_node_types.*.node_config.scheduling.{NOTICE_KEY}",
                        f"differ between the Spot types ({listed} from the metadata notice to the hard stop), but "
                        "every worker runs the one watcher command with one --notice-s",
                        f"give every Spot type the same {NOTICE_KEY}")]
    expected = next(iter(notices.values()), GCE_SHUTDOWN_S)
    problems = []
    if notice_s != expected:
        advance = expected - GCE_SHUTDOWN_S
        where = (f"{', '.join(spot_workers)} VMs get their metadata notice {expected:.0f} s before the hard stop ("
                 + (f"{NOTICE_KEY} {advance:.0f} s + GCE's {GCE_SHUTDOWN_S:.0f} s)" if advance else
                    f"no {NOTICE_KEY})") if spot_workers else "no worker type is Spot")
        effect = ("the drain deadline would be set after the VM is gone, so the just-in-time checkpoint and "
                  "Ray Train's preemption handling would count on time the node does not have" if notice_s > expected
                  else "the drain deadline would come too early and waste the advance notice")
        problems.append(Problem("cluster", key, f"start the preemption watcher with --notice-s {notice_s:g}, but "
                                f"{where}: {effect}", f"pass --notice-s {expected:.0f} to the watcher"))
    if margin_s >= min(notice_s, expected):
        problems.append(Problem("cluster", key, f"start the preemption watcher with --margin-s {margin_s:g}, not "
                                f"below its notice ({min(notice_s, expected):g} s); it would refuse to start",
                                "pass --margin-s 5"))
    return problems
