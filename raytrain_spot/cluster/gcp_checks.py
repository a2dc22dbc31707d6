"""The GCE-specific checks of a cluster YAML: scheduling of Spot and GPU VMs, machine types and their
GPUs, the on-demand fallback, zones, the provider that survives self-deleting Spot VMs, the package
install; and the warnings a new project meets (SSD quota, network, inter-zone traffic of a spread)."""

from __future__ import annotations

import os
import re
from typing import List, Optional

from raytrain_spot.cluster.cluster_yaml import (MAX_ADVANCE_NOTICE_S, NOTICE_KEY, ON_DEMAND, SPOT, Problem,
                                                advance_notice_s, is_gcp, is_multizone, pricing_of, provider_class,
                                                setup_commands_of)
from raytrain_spot.cluster.gcp.machines import (
    ATTACHABLE_GPUS,
    SPOT_ONLY_MACHINES,
    attached_gpus,
    built_in_gpus,
    gpus_of,
    is_accelerator_optimized,
    short_name,
)
from raytrain_spot.cost.inter_zone import GIB, worst_spread_gib_per_step
from raytrain_spot.cost.pricing import PriceCatalog
from raytrain_spot.preemption.drain_decision import GCE_SHUTDOWN_S

WHEEL = re.compile(r"raytrain_spot-[^\s\"']*\.whl(\[[^\]]*\])?")
TYPICAL_SSD_QUOTA_GB = 500
"""A regional SSD_TOTAL_GB limit new projects are often given (pd-balanced and pd-ssd count
against it): a YAML needing more gets a warning to check the project's own limit."""
SSD_DISK_TYPES = ("pd-ssd", "pd-balanced", "hyperdisk-balanced")
NETWORK_TAG = "raytrain-spot"
"""The network tag every GCP node carries: the firewall rule for the cluster's own traffic targets it."""


def check_provider(config: dict) -> List[Problem]:
    """Spot VMs that delete themselves need a provider that takes their 404 as done."""
    from raytrain_spot.cluster.gcp.spot_provider import SpotGCPNodeProvider

    if issubclass(provider_class(config), SpotGCPNodeProvider):
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


def check_gcp_node(name: str, node_type: dict, is_head: bool) -> List[Problem]:
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


def check_on_demand_growth(name: str, node_type: dict) -> List[Problem]:
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


def check_zones(config: dict) -> List[Problem]:
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


def check_installs(config: dict) -> List[Problem]:
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
        for command in setup_commands_of(config, node_type, is_head):
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
