"""A cluster YAML read as ``ray up`` reads it, and the facts the checks and the summary take from it.

Loads the file through Ray's own preparation and schema validation (``prepare_config``, the
provider's ``fillout_available_node_types_resources``, ``validate_config``: what ``ray up``
does before it calls the cloud; nothing here calls GCP). Then, per node type: Spot or on-demand,
its preemption notice, its boot image and set-up commands; and ``Problem``, what every check reports.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import yaml

from raytrain_spot.preemption.drain_decision import GCE_SHUTDOWN_S
from raytrain_spot.preemption.node_events import PRICING_LABEL

SPOT, ON_DEMAND = "spot", "on_demand"
NOTICE_KEY = "preemptionNoticeDuration"
"""GCE's advance preemption notice (preview): ``scheduling.preemptionNoticeDuration: {seconds: 120}``
turns ``instance/preempted`` TRUE that long before the ACPI soft-off, on Spot VMs only."""
MAX_ADVANCE_NOTICE_S = 120
"""The longest advance notice GCE's preview offers."""


class ClusterConfigError(ValueError):
    """The YAML does not load or Ray's schema rejects it."""


@dataclass(frozen=True)
class Problem:
    """One mistake in the YAML: where, what, and how to fix it."""

    node_type: str
    """Node type name, or ``provider``/``cluster`` for top-level keys."""
    key: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.node_type}: {self.key}: {self.problem}. Fix: {self.fix}."


def load(path: str) -> dict:
    """Read a cluster YAML and run Ray's preparation and schema validation on it."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise ClusterConfigError(f"{path}: cannot read the YAML: {error}") from None
    return prepare(raw, source=path)


def prepare(config: dict, source: str = "config") -> dict:
    """What ``ray up`` does to a YAML before it calls the cloud: defaults, resources, schema."""
    import jsonschema
    from raytrain_spot._ray import get_node_provider_cls, prepare_config, validate_config

    if not isinstance(config, dict) or "provider" not in config:
        raise ClusterConfigError(f"{source}: not a cluster config (no provider section)")
    try:
        prepared = prepare_config(copy.deepcopy(config))
        prepared = get_node_provider_cls(prepared["provider"]).fillout_available_node_types_resources(prepared)
        validate_config(prepared)
    except jsonschema.ValidationError as error:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ClusterConfigError(f"{source}: Ray's cluster schema rejects {where}: {error.message}") from None
    except (ValueError, KeyError, RuntimeError, ImportError, NotImplementedError) as error:
        raise ClusterConfigError(f"{source}: Ray cannot prepare this config: {error}") from None
    return prepared


def provider_class(config: dict):
    from raytrain_spot._ray import get_node_provider_cls

    return get_node_provider_cls(config["provider"])


def is_gcp(config: dict) -> bool:
    from raytrain_spot._ray import GCPNodeProvider

    return issubclass(provider_class(config), GCPNodeProvider)


def is_multizone(config: dict) -> bool:
    from raytrain_spot.cluster.gcp.multizone_provider import MultiZoneGCPNodeProvider

    return issubclass(provider_class(config), MultiZoneGCPNodeProvider)


def pricing_of(node_type: dict, gcp: bool) -> str:
    """Spot or on-demand: from GCE scheduling on GCP, from the pricing label elsewhere."""
    if not gcp:
        return str(node_type.get("labels", {}).get(PRICING_LABEL, ON_DEMAND))
    scheduling = node_type.get("node_config", {}).get("scheduling")
    if isinstance(scheduling, dict) and scheduling.get("provisioningModel") == "SPOT":
        return SPOT
    if isinstance(scheduling, list) and any(
            isinstance(s, dict) and (s.get("provisioningModel") == "SPOT" or s.get("preemptible")) for s in scheduling):
        return SPOT
    if isinstance(scheduling, dict) and scheduling.get("preemptible"):
        return SPOT
    return ON_DEMAND


def advance_notice_s(node_config: dict) -> Tuple[Optional[int], Optional[str]]:
    """``(seconds, None)`` from ``scheduling.preemptionNoticeDuration`` (0 when absent), or
    ``(None, what is wrong)`` when GCE would not take it as a whole-second duration."""
    scheduling = node_config.get("scheduling")
    if not isinstance(scheduling, dict) or NOTICE_KEY not in scheduling:
        return 0, None
    value = scheduling[NOTICE_KEY]
    if not isinstance(value, dict) or set(value) - {"seconds", "nanos"} or "seconds" not in value:
        return None, f"is {value!r}; GCE takes a Duration mapping, {{seconds: N}}"
    seconds, nanos = value["seconds"], value.get("nanos", 0)
    # JSON writes an int64 as a string ("120"); YAML as a number. Either is a whole number of seconds.
    if isinstance(seconds, str) and re.fullmatch(r"\d+", seconds):
        seconds = int(seconds)
    if isinstance(seconds, bool) or not isinstance(seconds, int) or nanos not in (0, None):
        return None, f"is {value!r}; the notice is whole seconds (seconds: N, no nanos)"
    if not 0 <= seconds <= MAX_ADVANCE_NOTICE_S:
        return None, f"is {seconds} s; GCE's preview offers 0 to {MAX_ADVANCE_NOTICE_S} s"
    return seconds, None


def notice_of(node_type: dict, gcp: bool) -> Optional[float]:
    """Seconds from the metadata notice to the hard stop on a Spot type; None if GCE never preempts it."""
    if pricing_of(node_type, gcp) != SPOT:
        return None
    seconds, _ = advance_notice_s(node_type.get("node_config", {})) if gcp else (0, None)
    return GCE_SHUTDOWN_S + (seconds or 0)


def boot_image(node_config: dict) -> str:
    for disk in node_config.get("disks") or []:
        if disk.get("boot"):
            return str((disk.get("initializeParams") or {}).get("sourceImage", ""))
    return ""


def setup_commands_of(config: dict, node_type: dict, is_head: bool) -> List[str]:
    """What Ray runs on a node of the type: its own ``worker_setup_commands`` if it has them, else the
    cluster's (``prepare`` has put ``setup_commands`` in front of both, as Ray does)."""
    if is_head:
        return list(config.get("head_setup_commands", []))
    return list(node_type.get("worker_setup_commands", config.get("worker_setup_commands", [])))
