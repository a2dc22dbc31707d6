"""Check a cluster YAML before ``ray up``, and say what it will cost.

    python -m raytrain_spot.cluster.check cluster/gcp-spot.yaml

Loads the file through Ray's own preparation and schema validation (``prepare_config``, the
provider's ``fillout_available_node_types_resources``, ``validate_config``: what ``ray up``
does before it calls the cloud; nothing here calls GCP), then reviews what Ray's schema
cannot know: a Spot head, a list-form ``scheduling``, Spot workers that GCE would stop
instead of delete, GPUs on machine types that do not take them, a head with training
resources, an on-demand GPU type that can grow, labels the framework reads that disagree
with the node config, zone URLs for another zone, a missing preemption watcher, an advance
preemption notice (``scheduling.preemptionNoticeDuration``) GCE would refuse or the watcher's
``--notice-s`` does not match, values still to fill in. Every
problem names the node type, the key and the fix. Exit status: 0 fine, 1 problems, 2 the
file does not load.

Prices come from a lookup ``(item, pricing, region) -> USD/h or None`` where ``item`` is a
machine type (its host: vCPU and memory) or an accelerator type (one GPU, built in or attached)
and ``pricing`` is ``spot`` or ``on_demand``; the default reads the price catalog the ledger
uses (raytrain_spot/cost/), with ``--prices FILE`` merged over it.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import secrets
import stat
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import yaml

from raytrain_spot.cost.inter_zone import GIB, worst_spread_gib_per_step
from raytrain_spot.cost.pricing import PriceCatalog, PriceNotFound
from raytrain_spot.cluster.gpu_stack import CHOSEN_BUILD, driver_branch_of_image, driver_problem, torch_build_of
from raytrain_spot.preemption.watcher import GCE_SHUTDOWN_S
from raytrain_spot.cluster.gcp.machines import (
    ATTACHABLE_GPUS,
    SPOT_ONLY_MACHINES,
    attached_gpus,
    built_in_gpus,
    gpus_of,
    is_accelerator_optimized,
    short_name,
)

NODE_TYPE_LABEL = "raytrain-spot/node-type"
PRICING_LABEL = "raytrain-spot/pricing"
SPOT, ON_DEMAND = "spot", "on_demand"
WATCHER_MODULE = "raytrain_spot.preemption.watcher"
NOTICE_KEY = "preemptionNoticeDuration"
"""GCE's advance preemption notice (preview): ``scheduling.preemptionNoticeDuration: {seconds: 120}``
turns ``instance/preempted`` TRUE that long before the ACPI soft-off, on Spot VMs only."""
MAX_ADVANCE_NOTICE_S = 120
"""The longest advance notice GCE's preview offers."""
TOKEN_PATH = "~/.ray/auth_token"
"""Ray's default token file: the YAMLs mount the laptop's copy there on every node."""
TOKEN_MODE = "RAY_AUTH_MODE=token"
PLACEHOLDER = "FILL-IN"
GPU_SETUP_CHECK = "raytrain_spot.cluster.gpu_setup_check"
WHEEL = re.compile(r"raytrain_spot-[^\s\"']*\.whl(\[[^\]]*\])?")
TYPICAL_SSD_QUOTA_GB = 500
"""A regional SSD_TOTAL_GB limit new projects are often given (pd-balanced and pd-ssd count
against it): a YAML needing more gets a warning to check the project's own limit."""
SSD_DISK_TYPES = ("pd-ssd", "pd-balanced", "hyperdisk-balanced")
NETWORK_TAG = "raytrain-spot"
"""The network tag every GCP node carries: the firewall rule for the cluster's own traffic targets it."""

PriceLookup = Callable[[str, str, str], Optional[float]]

def catalog_lookup(catalog: PriceCatalog) -> PriceLookup:
    """Prices from the catalog the ledger uses: a machine type's host, or one GPU; None where it has none."""

    def lookup(item: str, pricing: str, region: str) -> Optional[float]:
        try:
            if item in catalog.document.get("machines", {}):
                return catalog.machine_price(item, pricing, region).usd_per_hour
            return catalog.gpu_price(item, pricing, region).usd_per_hour
        except PriceNotFound:
            return None

    return lookup


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


@dataclass(frozen=True)
class NodeTypeSummary:
    name: str
    role: str
    """``head`` or ``worker``."""
    pricing: str
    machine: str
    gpus: str
    min_workers: int
    max_workers: int
    price_per_hour: Optional[float]
    """One node of this type, USD/h; None when the lookup has no price."""
    notice_s: Optional[float] = None
    """Spot types: seconds from the metadata notice to the hard stop (30, or 30 + the advance
    notice); None for types GCE never preempts."""
    advance_notice_s: int = 0
    """The type's ``scheduling.preemptionNoticeDuration`` in seconds (0: none)."""
    replacement_room: int = 0
    """Nodes of this type the autoscaler may launch beyond ``min_workers`` (within the cluster's
    ``max_workers``): replacements it can start while preempted VMs still run out their notice."""
    gpu_stack: Optional[str] = None
    """GPU worker types: the image's driver branch and the torch build the set-up installs."""


@dataclass(frozen=True)
class ClusterSummary:
    cluster_name: str
    provider: str
    region: str
    zones: str
    node_types: List[NodeTypeSummary]

    def cost_per_hour(self, at: str) -> Tuple[float, List[str]]:
        """USD/h with every type at its ``min`` or ``max`` count, and the types left unpriced."""
        total, unpriced = 0.0, []
        for node_type in self.node_types:
            count = 1 if node_type.role == "head" else (
                node_type.min_workers if at == "min" else node_type.max_workers)
            if count == 0:
                continue
            if node_type.price_per_hour is None:
                unpriced.append(node_type.name)
            else:
                total += count * node_type.price_per_hour
        return total, unpriced


# -- loading --------------------------------------------------------------------------------
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


def _provider_class(config: dict):
    from raytrain_spot._ray import get_node_provider_cls

    return get_node_provider_cls(config["provider"])


def is_gcp(config: dict) -> bool:
    from raytrain_spot._ray import GCPNodeProvider

    return issubclass(_provider_class(config), GCPNodeProvider)


def is_multizone(config: dict) -> bool:
    from raytrain_spot.cluster.gcp.multizone_provider import MultiZoneGCPNodeProvider

    return issubclass(_provider_class(config), MultiZoneGCPNodeProvider)


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


# -- review -----------------------------------------------------------------------------------
def review(config: dict) -> List[Problem]:
    """Every problem in a prepared config (see ``prepare``); empty when it is fine."""
    gcp = is_gcp(config)
    problems: List[Problem] = []
    head_name = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        is_head = name == head_name
        problems += _check_labels(name, node_type, gcp)
        if is_head:
            problems += _check_head(name, node_type, gcp)
        if gcp:
            problems += _check_gcp_node(name, node_type, is_head)
            if not is_head:
                problems += _check_on_demand_growth(name, node_type)
    if gcp:
        problems += _check_provider(config)
        problems += _check_zones(config)
        problems += _check_watcher(config)
        problems += _check_token_auth(config)
        problems += _check_gpu_stack(config)
        problems += _check_installs(config)
    problems += _check_placeholders(config)
    return problems


def _check_provider(config: dict) -> List[Problem]:
    """Spot VMs that delete themselves need a provider that takes their 404 as done."""
    from raytrain_spot.cluster.gcp.spot_provider import SpotGCPNodeProvider

    if issubclass(_provider_class(config), SpotGCPNodeProvider):
        return []
    deleting = [name for name, node_type in config["available_node_types"].items()
                if (node_type.get("node_config", {}).get("scheduling") or {}).get("instanceTerminationAction") == "DELETE"]
    if not deleting:
        return []
    return [Problem("provider", "type", f"Ray's GCP provider raises on deleting a VM GCE already deleted, which "
                    f"{', '.join(deleting)} VMs do when preempted (instanceTerminationAction: DELETE); after "
                    "5 such errors the autoscaler exits and no preempted worker is replaced again",
                    "type: external with module: raytrain_spot.cluster.gcp.spot_provider.SpotGCPNodeProvider "
                    "(the same keys as type: gcp)")]


def _check_placeholders(config: dict) -> List[Problem]:
    problems = []

    def visit(value, path: List[str]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, path + [str(key)])
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit(item, path[:-1] + [f"{path[-1]}[{index}]"] if path else [f"[{index}]"])
        elif isinstance(value, str) and PLACEHOLDER in value:
            in_node_type = len(path) > 2 and path[0] == "available_node_types"
            problems.append(Problem(path[1] if in_node_type else "cluster", ".".join(path[2:] if in_node_type else path),
                                    f"still holds the placeholder {value!r}",
                                    "replace it with your value (the comment beside it says which)"))

    visit(config, [])
    return problems


def _check_labels(name: str, node_type: dict, gcp: bool) -> List[Problem]:
    labels = node_type.get("labels") or {}
    problems = []
    if labels.get(NODE_TYPE_LABEL) != name:
        problems.append(Problem(name, f"labels.{NODE_TYPE_LABEL}",
                                f"is {labels.get(NODE_TYPE_LABEL)!r}; the framework tells node types apart by it",
                                f"set labels: {{{NODE_TYPE_LABEL}: {name}}}"))
    expected = pricing_of(node_type, gcp)
    label = labels.get(PRICING_LABEL)
    if label not in (SPOT, ON_DEMAND):
        problems.append(Problem(name, f"labels.{PRICING_LABEL}", f"is {label!r}; the ledger prices nodes by it",
                                f"set labels: {{{PRICING_LABEL}: {expected}}}"))
    elif gcp and label != expected:
        meant = ("meant as the on-demand fallback of a hybrid cluster, but it would run as Spot"
                 if label == ON_DEMAND else "labelled Spot, but it would run on demand")
        problems.append(Problem(name, "node_config.scheduling.provisioningModel", meant,
                                "set provisioningModel: STANDARD for an on-demand fallback"
                                if label == ON_DEMAND else f"set labels: {{{PRICING_LABEL}: {expected}}} "
                                                          "or make the type Spot"))
    return problems


def _check_head(name: str, node_type: dict, gcp: bool) -> List[Problem]:
    problems = []
    resources = node_type.get("resources") or {}
    for resource in ("CPU", "GPU"):
        if resources.get(resource, 0) > 0:
            problems.append(Problem(name, f"resources.{resource}",
                                    f"is {resources[resource]}: the head would run training work and be busy "
                                    "when it must coordinate", "set resources: {CPU: 0} on the head"))
    if "CPU" not in resources:
        problems.append(Problem(name, "resources", "has no CPU entry, so Ray counts the machine's cores and "
                                "schedules training work on the head", "set resources: {CPU: 0} on the head"))
    if gcp and pricing_of(node_type, gcp) == SPOT:
        problems.append(Problem(name, "node_config.scheduling",
                                "makes the head Spot: a preemption would take GCS, the Train controller and "
                                "the driver with it", "set scheduling: {provisioningModel: STANDARD} on the head"))
    if gcp and gpus_of(node_type.get("node_config", {})):
        problems.append(Problem(name, "node_config.machineType",
                                f"{gpus_of(node_type['node_config'])} on the head pay for GPUs that never train",
                                "use a CPU machine type such as n2-standard-8 for the head"))
    return problems


def _check_gcp_node(name: str, node_type: dict, is_head: bool) -> List[Problem]:
    node_config = node_type.get("node_config", {})
    scheduling = node_config.get("scheduling", {})
    machine = short_name(str(node_config.get("machineType", "")))
    problems = []
    if isinstance(scheduling, list):
        problems.append(Problem(name, "node_config.scheduling",
                                "is a list; Ray sends node_config unchanged and GCE takes scheduling as an object",
                                "write it as a mapping, e.g. scheduling: {provisioningModel: SPOT, "
                                "instanceTerminationAction: DELETE, onHostMaintenance: TERMINATE, "
                                "automaticRestart: false}"))
        return problems
    if NOTICE_KEY in scheduling:
        seconds, wrong = advance_notice_s(node_config)
        key = f"node_config.scheduling.{NOTICE_KEY}"
        if wrong:
            problems.append(Problem(name, key, wrong,
                                    f"write {NOTICE_KEY}: {{seconds: {MAX_ADVANCE_NOTICE_S}}}, or remove it for "
                                    f"GCE's default ({GCE_SHUTDOWN_S:.0f} s from the notice to the hard stop)"))
        elif pricing_of(node_type, gcp=True) != SPOT:
            problems.append(Problem(name, key, f"asks for a {seconds} s advance preemption notice on a VM GCE "
                                    "does not preempt; GCE takes it for Spot VMs only",
                                    f"remove {NOTICE_KEY}, or make the type Spot (provisioningModel: SPOT)"))
    if scheduling.get("preemptible"):
        problems.append(Problem(name, "node_config.scheduling.preemptible",
                                "asks for a legacy preemptible VM (24 h limit)",
                                "use provisioningModel: SPOT with instanceTerminationAction: DELETE"))
    spot = scheduling.get("provisioningModel") == "SPOT"
    if spot and not is_head:
        if scheduling.get("instanceTerminationAction") != "DELETE":
            problems.append(Problem(name, "node_config.scheduling.instanceTerminationAction",
                                    f"is {scheduling.get('instanceTerminationAction')!r}: a preempted VM would stay "
                                    "as a stopped instance Ray does not see, its disk still billed",
                                    "set instanceTerminationAction: DELETE"))
        if scheduling.get("automaticRestart"):
            problems.append(Problem(name, "node_config.scheduling.automaticRestart",
                                    "is true; GCE refuses automatic restart for Spot VMs",
                                    "set automaticRestart: false"))
    gpus = gpus_of(node_config)
    if (gpus or spot) and scheduling.get("onHostMaintenance") != "TERMINATE" and not is_head:
        problems.append(Problem(name, "node_config.scheduling.onHostMaintenance",
                                f"is {scheduling.get('onHostMaintenance')!r}; Spot and GPU VMs cannot live-migrate and GCE "
                                "rejects them without TERMINATE", "set onHostMaintenance: TERMINATE"))
    if node_config.get("guestAccelerators"):
        attached = attached_gpus(node_config)
        if is_accelerator_optimized(machine):
            problems.append(Problem(name, "node_config.guestAccelerators",
                                    f"{machine} comes with its GPUs ({built_in_gpus(machine) or 'built in'}); "
                                    "GCE takes no guestAccelerators for A2/A3/A4/G2/G4 machine types",
                                    "remove guestAccelerators (pick the machine type for the GPU count)"))
        elif not machine.startswith("n1-"):
            problems.append(Problem(name, "node_config.guestAccelerators",
                                    f"{machine} does not take attached GPUs; only N1 machine types do",
                                    "use an n1-standard-* machine type, or an accelerator-optimized one "
                                    "(a2-highgpu-1g, a3-highgpu-1g, g2-standard-8) without guestAccelerators"))
        elif attached is not None and attached.accelerator_type not in ATTACHABLE_GPUS:
            problems.append(Problem(name, "node_config.guestAccelerators.acceleratorType",
                                    f"{attached.accelerator_type} cannot be attached to N1",
                                    f"use one of {', '.join(sorted(ATTACHABLE_GPUS))}, or the accelerator-"
                                    "optimized machine type that carries it"))
    declared = (node_type.get("resources") or {}).get("GPU", 0)
    if not is_head and gpus is not None and declared != gpus.count:
        problems.append(Problem(name, "resources.GPU", f"is {declared} but {machine} has {gpus}",
                                f"set resources.GPU: {gpus.count}"))
    if not is_head and gpus is None and declared:
        problems.append(Problem(name, "resources.GPU", f"is {declared} but {machine} has no GPUs",
                                "remove the GPU resource or use a GPU machine type"))
    if machine in SPOT_ONLY_MACHINES and not spot:
        problems.append(Problem(name, "node_config.machineType",
                                f"{machine} is sold only as Spot (or flex-start), not on demand",
                                "make this type Spot, or use a3-highgpu-8g / an A2 type for on-demand"))
    return problems


def _check_on_demand_growth(name: str, node_type: dict) -> List[Problem]:
    # An on-demand GPU type with room to grow soaks up demand that Spot should serve,
    # at on-demand prices: the fallback of a hybrid cluster is a fixed count.
    if pricing_of(node_type, gcp=True) != ON_DEMAND or not gpus_of(node_type.get("node_config", {})):
        return []
    low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
    if high > 0 and (low == 0 or low != high):
        return [Problem(name, "min_workers/max_workers",
                        f"the on-demand GPU fallback runs {low}..{high} nodes: the autoscaler may launch on-demand "
                        "GPUs for demand Spot should serve, and with min_workers 0 there is no fallback",
                        "pin it: min_workers: N, max_workers: N with N >= 1 (hybrid), or max_workers: 0 (all Spot)")]
    return []


_ZONE_SEGMENT = re.compile(r"(?:^|/)zones/([^/]+)/")


def _check_zones(config: dict) -> List[Problem]:
    provider = config["provider"]
    if is_multizone(config):
        from raytrain_spot.cluster.gcp.multizone_provider import MultiZoneSettings

        try:
            MultiZoneSettings.from_provider_config(provider)
        except ValueError as error:
            key, _, rest = str(error).partition(": ")
            problem, _, fix = rest.partition(". Fix: ")
            return [Problem("provider", key.removeprefix("provider."), problem, fix.rstrip("."))]
        return []  # the provider writes each VM's zone into its URLs
    zone = provider.get("availability_zone", "")
    problems = []
    if not zone or zone.rsplit("-", 1)[0] != provider.get("region"):
        problems.append(Problem("provider", "availability_zone", f"{zone!r} is not a zone of region "
                                f"{provider.get('region')!r}", "pick a zone of the region, e.g. us-central1-a"))
    for name, node_type in config["available_node_types"].items():
        node_config = node_type.get("node_config", {})
        urls = [("node_config.machineType", str(node_config.get("machineType", "")))]
        urls += [(f"node_config.guestAccelerators[{i}].acceleratorType", str(a.get("acceleratorType", "")))
                 for i, a in enumerate(node_config.get("guestAccelerators") or [])]
        for i, disk in enumerate(node_config.get("disks") or []):
            disk_type = (disk.get("initializeParams") or {}).get("diskType")
            if disk_type is None:
                continue
            key = f"node_config.disks[{i}].initializeParams.diskType"
            if "/" not in str(disk_type):
                problems.append(Problem(name, key, f"{disk_type!r} is a bare name; GCE takes a disk type URL here",
                                        f"write zones/{zone}/diskTypes/{disk_type}"))
            urls.append((key, str(disk_type)))
        for key, url in urls:
            match = _ZONE_SEGMENT.search(url)
            if match and match.group(1) != zone:
                problems.append(Problem(name, key, f"names zone {match.group(1)} but the cluster runs in {zone}",
                                        f"write zones/{zone}/ in it"))
    return problems


def _check_watcher(config: dict) -> List[Problem]:
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


def _boot_image(node_config: dict) -> str:
    for disk in node_config.get("disks") or []:
        if disk.get("boot"):
            return str((disk.get("initializeParams") or {}).get("sourceImage", ""))
    return ""


def _setup_commands_of(config: dict, node_type: dict, is_head: bool) -> List[str]:
    """What Ray runs on a node of the type: its own ``worker_setup_commands`` if it has them, else the
    cluster's (``prepare`` has put ``setup_commands`` in front of both, as Ray does)."""
    if is_head:
        return list(config.get("head_setup_commands", []))
    return list(node_type.get("worker_setup_commands", config.get("worker_setup_commands", [])))


def _check_gpu_stack(config: dict) -> List[Problem]:
    """Every GPU worker type: the image has a driver, the torch build runs on it, and the set-up ends
    with the GPU check for the type's GPU count."""
    problems = []
    for name, node_type in config["available_node_types"].items():
        node_config = node_type.get("node_config", {})
        gpus = gpus_of(node_config)
        if name == config["head_node_type"] or gpus is None:
            continue
        image = _boot_image(node_config)
        branch = driver_branch_of_image(image)
        commands = _setup_commands_of(config, node_type, is_head=False)
        builds = [build for build in map(torch_build_of, commands) if build is not None]
        key = "worker_setup_commands"
        fix_torch = (f'install torch before the package with pip install "torch==VERSION" --index-url '
                     f"https://download.pytorch.org/whl/{CHOSEN_BUILD}")
        if branch is None:
            problems.append(Problem(name, "node_config.disks[0].initializeParams.sourceImage",
                                    f"{image!r} names no NVIDIA driver branch, so {gpus} may have no driver",
                                    "use projects/ubuntu-os-accelerator-images/global/images/family/"
                                    "ubuntu-accelerator-2404-amd64-with-nvidia-570"))
        if not builds:
            problems.append(Problem(name, key, "install no torch before the package, so pip takes PyPI's default "
                                    "build, whatever CUDA it was built for", fix_torch))
        for build in builds:
            if build.cuda is None:
                problems.append(Problem(name, key, f"install torch {build.version} as {build.where} on a node with "
                                        f"{gpus}: it cannot use them", fix_torch))
            elif branch is not None:
                mismatch = driver_problem(branch, build.cuda)
                if mismatch:
                    problems.append(Problem(name, key, f"install torch {build.version} as {build.where} (CUDA "
                                            f"{build.cuda}); {mismatch} ({short_name(image)}), so "
                                            "torch.cuda.is_available() is False on every worker", fix_torch))
        checks = [c for c in commands if GPU_SETUP_CHECK in c]
        expected = re.search(r"--expect-gpus(?:=|\s+)(\d+)", checks[-1]) if checks else None
        if not checks or commands[-1] is not checks[-1]:
            problems.append(Problem(name, key, "do not end with the GPU check, so a node whose torch cannot use its "
                                    "GPUs joins the cluster and trains on nothing",
                                    f"append: python -m {GPU_SETUP_CHECK} --expect-gpus {gpus.count}"))
        elif expected is None or int(expected.group(1)) != gpus.count:
            problems.append(Problem(name, key, f"run the GPU check with --expect-gpus "
                                    f"{expected.group(1) if expected else '(none)'}, but {gpus} come "
                                    "with the machine type, so the check fails every node of this type",
                                    f"pass --expect-gpus {gpus.count} (a type with another count needs its own "
                                    "worker_setup_commands)"))
    return problems


def gpu_stack_of(config: dict, node_type: dict) -> str:
    """The driver a GPU type's image ships and the torch its set-up installs, as the summary shows them."""
    branch = driver_branch_of_image(_boot_image(node_type.get("node_config", {})))
    builds = [b for b in map(torch_build_of, _setup_commands_of(config, node_type, is_head=False)) if b is not None]
    torch_text = ", ".join(f"torch {b.version} as {b.where} (CUDA {b.cuda or 'none'})" for b in builds) or "no torch"
    driver_text = f"NVIDIA driver {branch}" if branch is not None else "no NVIDIA driver in the image"
    verdict = "" if branch is None or not builds or any(b.cuda is None for b in builds) else (
        "; runs" if not any(driver_problem(branch, b.cuda) for b in builds) else "; does NOT run")
    return f"{driver_text}, {torch_text}{verdict} (raytrain_spot/cluster/gpu_stack.py)"


def _check_installs(config: dict) -> List[Problem]:
    """The package is installed with its ``[hf]`` extra on every node, from a path that outlives a reboot."""
    problems = []
    for destination in config.get("file_mounts", {}):
        if os.path.normpath(destination).startswith("/tmp/"):
            problems.append(Problem("cluster", f"file_mounts.{destination}", "lands under /tmp, which a reboot "
                                    "of the head clears; the autoscaler copies file_mounts to every replacement "
                                    "worker from the head's copy, so their set-up then fails",
                                    f"mount it under the home directory, e.g. ~/raytrain-spot/{os.path.basename(destination)}"))
    for name, node_type in config["available_node_types"].items():
        is_head = name == config["head_node_type"]
        key = "head_setup_commands" if is_head else "worker_setup_commands"
        for command in _setup_commands_of(config, node_type, is_head):
            for match in WHEEL.finditer(command):
                if "hf" not in (match.group(1) or ""):
                    problems.append(Problem(name, key, f"install {match.group(0)} without the [hf] extra, so "
                                            "+experiment=hf_vlm stops at import transformers",
                                            f"install {match.group(0)}[hf] (quote it for the shell)"))
    return problems


def warnings(config: dict, catalog: Optional[PriceCatalog] = None) -> List[Problem]:
    """What the YAML cannot get wrong by itself but a new project will meet: quotas, network, the
    inter-zone traffic of a spread placement (priced from ``catalog``, default the packaged one)."""
    if not is_gcp(config):
        return []
    found = []
    head_name = config["head_node_type"]
    region = config["provider"].get("region")
    ssd_gb, vms, without_interfaces, untagged = 0, 0, [], []
    for name, node_type in config["available_node_types"].items():
        count = 1 if name == head_name else node_type.get("max_workers", 0)
        node_config = node_type.get("node_config", {})
        vms += count
        for disk in node_config.get("disks") or []:
            params = disk.get("initializeParams") or {}
            if short_name(str(params.get("diskType", "pd-standard"))) in SSD_DISK_TYPES:
                ssd_gb += count * int(params.get("diskSizeGb", 10))
        if count and "networkInterfaces" not in node_config:
            without_interfaces.append(name)
        if count and NETWORK_TAG not in ((node_config.get("tags") or {}).get("items") or []):
            untagged.append(name)
    quota_command = (f'gcloud compute regions describe {region} --flatten="quotas[]" '
                     '--format="table(quotas.metric,quotas.limit,quotas.usage)"')
    if ssd_gb > TYPICAL_SSD_QUOTA_GB:
        found.append(Problem("cluster", "available_node_types.*.node_config.disks", f"need {ssd_gb} GB of SSD "
                             f"persistent disk at max_workers (pd-balanced counts as SSD); new projects often have "
                             f"SSD_TOTAL_GB {TYPICAL_SSD_QUOTA_GB} in a region, and a VM over it is refused",
                             f"check SSD_TOTAL_GB with {quota_command}, request more, or lower diskSizeGb"))
    if without_interfaces:
        found.append(Problem("cluster", "node_config.networkInterfaces", f"not set on {', '.join(without_interfaces)}: "
                             f"Ray takes the first subnet it lists in {region} (of any VPC) and gives each of the "
                             f"{vms} VMs an external IP (IN_USE_ADDRESSES); with no subnet in {region} `ray up` "
                             "stops with KeyError: 'items'",
                             f"check gcloud compute networks subnets list --filter=region:{region} and "
                             f"IN_USE_ADDRESSES >= {vms} ({quota_command})"))
    if is_multizone(config) and config["provider"].get("zone_placement", "pack") == "spread":
        zones = len(config["provider"].get("availability_zones", []))
        ranks = sum(t.get("max_workers", 0) for n, t in config["available_node_types"].items()
                    if n != head_name and gpus_of(t.get("node_config", {})))
        gib = worst_spread_gib_per_step(GIB, ranks, zones)
        usd = gib * (catalog or PriceCatalog.load()).inter_zone_usd_per_gib()
        found.append(Problem("cluster", "provider.zone_placement", f"spread puts the {ranks} GPU workers in "
                             f"{zones} zones, and DDP's all-reduce then crosses zones at every step: about "
                             f"{gib:.0f} GiB per step per GiB of gradients (a ring over {ranks} ranks), ${usd:.2f} "
                             "per step per GiB of gradients at GCE's inter-zone price (the 256M preset's fp32 "
                             "gradients are about 1 GiB), besides the latency",
                             "set provider.zone_placement: pack (one zone while it has capacity; other zones only "
                             "on a stockout)"))
    if untagged:
        found.append(Problem("cluster", "node_config.tags", f"{', '.join(untagged)} lack the network tag "
                             f"{NETWORK_TAG!r}, so no firewall rule can admit the cluster's traffic to them alone "
                             "(Ray's ports, its metrics endpoint among them, listen on every interface)",
                             f"add tags: {{items: [{NETWORK_TAG}]}} to every node_config (docs/cluster.md, "
                             "Security notes)"))
    return found


def _check_token_auth(config: dict) -> List[Problem]:
    """Every node gets the token, and every Ray process the YAML starts uses it: a Ray client in
    token mode without the token aborts, and a node started without token mode cannot join."""
    problems = []
    if TOKEN_PATH not in config.get("file_mounts", {}):
        problems.append(Problem("cluster", "file_mounts", f"do not copy Ray's token to {TOKEN_PATH} on the nodes, so "
                                "workers and their preemption watchers cannot join the token-authenticated head",
                                f"add `{TOKEN_PATH}: {TOKEN_PATH}` (and create it with python -m "
                                "raytrain_spot.cluster.check --new-token)"))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key, []):
            starts_ray = re.search(r"\bray start\b", command) or WATCHER_MODULE in command
            if starts_ray and TOKEN_MODE not in command:
                problems.append(Problem("cluster", key, f"start {command.split()[-1]!r}... without {TOKEN_MODE}, "
                                        "so it cannot join the token-authenticated cluster",
                                        f"prefix the command with {TOKEN_MODE}"))
    return problems


def check_local_token(config: dict) -> List[Problem]:
    """The token file the YAML mounts exists here, readable by this user alone."""
    source = config.get("file_mounts", {}).get(TOKEN_PATH)
    if source is None:
        return []
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        return [Problem("cluster", f"file_mounts.{TOKEN_PATH}", f"its source {path} does not exist, so `ray up` "
                        "fails to copy it", "create it with python -m raytrain_spot.cluster.check --new-token")]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        return [Problem("cluster", f"file_mounts.{TOKEN_PATH}", f"its source {path} is readable by others "
                        f"(mode {mode:o}), and the token lets anyone who has it run code on the cluster",
                        f"chmod 600 {path}")]
    return []


def new_token(path: str = TOKEN_PATH) -> bool:
    """Create the cluster token at ``path`` (mode 600) unless it exists; never print it."""
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, the format `ray get-auth-token --generate` writes
    return True


# -- summary ------------------------------------------------------------------------------------
def summarize(config: dict, price_lookup: Optional[PriceLookup] = None) -> ClusterSummary:
    price_lookup = price_lookup or catalog_lookup(PriceCatalog.load())
    gcp = is_gcp(config)
    provider = config["provider"]
    region = provider.get("region", "local")
    rows = []
    head_name = config["head_node_type"]
    workers = {name: t for name, t in config["available_node_types"].items() if name != head_name}
    # Room the cluster's max_workers leaves above every worker type's min_workers.
    cluster_room = config.get("max_workers", 0) - sum(t.get("min_workers", 0) for t in workers.values())
    for name, node_type in config["available_node_types"].items():
        node_config = node_type.get("node_config", {})
        pricing = pricing_of(node_type, gcp)
        machine = short_name(str(node_config.get("machineType", "local"))) if gcp else "local"
        gpus = gpus_of(node_config) if gcp else None
        price = None if gcp else 0.0  # a local cluster costs nothing by the hour
        if gcp:
            price = price_lookup(machine, pricing, region)  # the host
            if price is not None and gpus is not None:
                gpu_price = price_lookup(gpus.accelerator_type, pricing, region)
                price = None if gpu_price is None else price + gpus.count * gpu_price
        advance, _ = advance_notice_s(node_config) if gcp else (0, None)
        type_room = node_type.get("max_workers", 0) - node_type.get("min_workers", 0)
        rows.append(NodeTypeSummary(
            name=name, role="head" if name == head_name else "worker", pricing=pricing,
            machine=machine, gpus=str(gpus) if gpus else "-", min_workers=node_type.get("min_workers", 0),
            max_workers=node_type.get("max_workers", 0), price_per_hour=price,
            notice_s=notice_of(node_type, gcp) if name != head_name else None, advance_notice_s=advance or 0,
            replacement_room=max(0, min(type_room, cluster_room)) if name != head_name else 0,
            gpu_stack=gpu_stack_of(config, node_type) if gcp and gpus and name != head_name else None))
    if is_multizone(config):
        zones = f"head {provider.get('availability_zone')}, Spot over {', '.join(provider.get('availability_zones', []))}"
    else:
        zones = provider.get("availability_zone", "-")
    provider_name = provider["module"].rsplit(".", 1)[-1] if provider["type"] == "external" else provider["type"]
    return ClusterSummary(config["cluster_name"], provider_name, region, zones, rows)


def format_summary(summary: ClusterSummary) -> str:
    header = ("node type", "role", "pricing", "machine", "GPUs", "workers", "notice", "$/h each")
    rows = [(t.name, t.role, t.pricing, t.machine, t.gpus,
             "1" if t.role == "head" else f"{t.min_workers}-{t.max_workers}",
             "-" if t.notice_s is None else f"{t.notice_s:.0f} s",
             "?" if t.price_per_hour is None else f"{t.price_per_hour:.2f}") for t in summary.node_types]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [f"cluster {summary.cluster_name}: provider {summary.provider}, region {summary.region}, "
             f"zones {summary.zones}"]
    lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + rows]
    spot = sum(t.max_workers for t in summary.node_types if t.role == "worker" and t.pricing == SPOT)
    on_demand = sum(t.max_workers for t in summary.node_types if t.role == "worker" and t.pricing == ON_DEMAND)
    lines.append(f"  mode: {'hybrid' if spot and on_demand else 'all Spot' if spot else 'all on-demand'} "
                 f"({on_demand} on-demand + {spot} Spot workers at most)")
    for t in summary.node_types:
        if t.notice_s is None:
            continue
        if not t.advance_notice_s:
            lines.append(f"  {t.name}: preemption notice {t.notice_s:.0f} s before the hard stop (GCE's default)")
            continue
        room = (f"the autoscaler can start up to {t.replacement_room} replacement(s) while preempted VMs run out "
                "their notice" if t.replacement_room else
                "no room to start a replacement before a preempted VM stops (raise this type's max_workers and "
                "the top-level max_workers above min_workers)")
        lines.append(f"  {t.name}: preemption notice {t.notice_s:.0f} s before the hard stop ({NOTICE_KEY} "
                     f"{t.advance_notice_s} s, preview, + GCE's {GCE_SHUTDOWN_S:.0f} s); {room}")
    for t in summary.node_types:
        if t.gpu_stack:
            lines.append(f"  {t.name}: {t.gpu_stack}")
    for at in ("min", "max"):
        total, unpriced = summary.cost_per_hour(at)
        note = f" (not counting {', '.join(unpriced)}: no price)" if unpriced else ""
        lines.append(f"  estimated $/h with every type at {at}_workers: {total:.2f}{note}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.cluster.check", description=__doc__.split("\n")[0])
    parser.add_argument("yaml", nargs="*", help="cluster YAML file(s)")
    parser.add_argument("--prices", default=None, help="user price file (JSON or YAML) merged over the catalog")
    parser.add_argument("--new-token", action="store_true",
                        help=f"create the cluster's Ray token at {TOKEN_PATH} (mode 600) if there is none; "
                             "the GCP YAMLs copy it to every node")
    args = parser.parse_args(argv)
    if args.new_token:
        created = new_token()
        print(f"{'created' if created else 'kept the existing'} {os.path.expanduser(TOKEN_PATH)} (mode 600)")
    elif not args.yaml:
        parser.error("name a cluster YAML, or pass --new-token")
    # Ray's config preparation logs defaults it fills in; the summary says what matters.
    logging.getLogger("ray.autoscaler").setLevel(logging.ERROR)
    status = 0
    for path in args.yaml:
        try:
            config = load(path)
        except ClusterConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
            continue
        catalog = PriceCatalog.load(args.prices)
        print(format_summary(summarize(config, catalog_lookup(catalog))))
        for warning in warnings(config, catalog):
            print(f"  warning: {warning}", file=sys.stderr)
        problems = review(config) + check_local_token(config)
        for problem in problems:
            print(f"  problem: {problem}", file=sys.stderr)
        if problems:
            print(f"{path}: {len(problems)} problem(s); fix them before `ray up`.", file=sys.stderr)
            status = max(status, 1)
        else:
            print(f"{path}: ok")
    return status


if __name__ == "__main__":
    sys.exit(main())
