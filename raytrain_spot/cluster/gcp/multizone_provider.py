"""Ray's GCP node provider, spreading Spot workers over several zones with failover.

Ray 2.60's ``GCPNodeProvider`` bakes one ``availability_zone`` into every Compute call, while
Spot capacity differs by zone and runs out zone by zone. This subclass keeps one Ray
``GCPCompute`` per zone and sends each new Spot VM to the zone ``ZonePolicy`` picks; a
stockout or quota error blocks the zone for a while and the VM is retried in the next one.
Everything that is not Spot (the head, the on-demand fallback) stays in ``availability_zone``.
A VM GCE already deleted (preempted Spot) counts as terminated, as in ``SpotGCPNodeProvider``.

Use it from a cluster YAML (the package must be installed where ``ray up`` runs and on the
head, whose autoscaler loads it)::

    provider:
      type: external
      module: raytrain_spot.cluster.gcp.multizone_provider.MultiZoneGCPNodeProvider
      project_id: my-project
      region: us-central1
      availability_zone: us-central1-a          # head and on-demand nodes
      availability_zones: [us-central1-a, us-central1-b, us-central1-c]   # Spot workers
      zone_block_s: 600                          # optional
      zone_placement: pack                       # optional: pack (default) | spread

Zone-specific URLs in a node config (``machineType``, ``acceleratorType``, ``diskType``) may
be bare names or name any zone: they are rewritten for the zone each VM goes to.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from googleapiclient.errors import HttpError

from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

from raytrain_spot._ray import (
    GCPTPU,
    GCPCompute,
    GCPNodeType,
    GCPResource,
    construct_clients_from_provider_config,
    gcp_retry,
    get_node_type,
)
from raytrain_spot.cluster.gcp.spot_provider import SpotGCPNodeProvider, build_compute_client
from raytrain_spot.cluster.gcp.zone_policy import (
    LaunchFailure,
    Placement,
    ZonePolicy,
    ZonePolicyConfig,
    classify_failure,
)

logger = logging.getLogger(__name__)

_ZONE_SEGMENT = re.compile(r"(^|/)zones/[^/]+/")


class NoZoneAvailableError(RuntimeError):
    """Every configured zone is blocked after capacity or quota failures."""


@dataclass(frozen=True)
class MultiZoneSettings:
    """The provider section keys this provider reads on top of Ray's GCP ones."""

    project_id: str
    """GCP project the cluster runs in."""
    region: str
    """Region of every zone below (subnets are regional)."""
    head_zone: str
    """``availability_zone``: where the head and every non-Spot node type go."""
    policy: ZonePolicyConfig
    """``availability_zones``, ``zone_block_s`` and ``zone_placement``: where Spot workers go."""
    compute_api_endpoint: Optional[str] = None
    """Compute API base URL, e.g. a Private Service Connect endpoint; unset: Google's public one."""

    @classmethod
    def from_provider_config(cls, provider: Dict[str, Any]) -> "MultiZoneSettings":
        def required(key: str, example: str) -> Any:
            if not provider.get(key):
                raise ValueError(f"provider.{key}: missing. Fix: set provider.{key}, e.g. {example}")
            return provider[key]

        region = required("region", "us-central1")
        head_zone = required("availability_zone", f"{region}-a")
        zones = required("availability_zones", f"[{region}-a, {region}-b, {region}-c]")
        if not isinstance(zones, list) or not all(isinstance(z, str) for z in zones):
            raise ValueError(f"provider.availability_zones: {zones!r} is not a list of zone names. "
                             f"Fix: availability_zones: [{region}-a, {region}-b]")
        for key, zone_list in (("availability_zone", [head_zone]), ("availability_zones", zones)):
            for zone in zone_list:
                if zone.rsplit("-", 1)[0] != region:
                    raise ValueError(f"provider.{key}: zone {zone} is outside region {region} (subnets are "
                                     f"regional). Fix: use zones of {region} or change provider.region")
        placement = provider.get("zone_placement", Placement.PACK.value)
        if placement not in {p.value for p in Placement}:
            raise ValueError(f"provider.zone_placement: {placement!r} is unknown. Fix: set it to spread or pack")
        policy = ZonePolicyConfig(zones=tuple(zones), block_s=float(provider.get("zone_block_s", 600.0)),
                                  placement=Placement(placement))
        return cls(project_id=required("project_id", "my-project"), region=region, head_zone=head_zone,
                   policy=policy, compute_api_endpoint=provider.get("compute_api_endpoint"))

    @property
    def all_zones(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys((self.head_zone,) + self.policy.zones))


def localize_node_config(node_config: Dict[str, Any], zone: str) -> Dict[str, Any]:
    """A copy of ``node_config`` whose zonal URLs point at ``zone``.

    Ray expands bare ``machineType``/``acceleratorType`` names itself, but keeps URLs as
    written and never touches ``diskType``, which GCE only accepts as a URL.
    """
    config = copy.deepcopy(node_config)

    def rezone(value: str) -> str:
        return _ZONE_SEGMENT.sub(lambda m: f"{m.group(1)}zones/{zone}/", value)

    if isinstance(config.get("machineType"), str):
        config["machineType"] = rezone(config["machineType"])
    for accelerator in config.get("guestAccelerators", []) or []:
        accelerator["acceleratorType"] = rezone(accelerator["acceleratorType"])
    for disk in config.get("disks", []) or []:
        params = disk.get("initializeParams") or {}
        disk_type = params.get("diskType")
        if isinstance(disk_type, str):
            params["diskType"] = rezone(disk_type) if "/" in disk_type else f"zones/{zone}/diskTypes/{disk_type}"
    return config


def is_spot(node_config: Dict[str, Any]) -> bool:
    scheduling = node_config.get("scheduling")
    return isinstance(scheduling, dict) and scheduling.get("provisioningModel") == "SPOT"


def failure_from_error(error: BaseException) -> Optional[LaunchFailure]:
    """Capacity/quota failure behind an insert error, or None for any other error.

    Two shapes reach us: ``HttpError`` from the insert call itself (quota), and the plain
    ``Exception(operation["error"])`` Ray's ``wait_for_operation`` raises (stockouts).
    """
    if isinstance(error, HttpError):
        details = getattr(error, "error_details", None)
        entries = details if isinstance(details, list) else []
        for entry in entries:
            if isinstance(entry, dict):
                failure = classify_failure(str(entry.get("reason", "")), str(entry.get("message", "")))
                if failure:
                    return failure
        return classify_failure("", str(getattr(error, "reason", "") or error))
    payload = error.args[0] if error.args else None
    if isinstance(payload, dict):
        for entry in payload.get("errors", []):
            failure = classify_failure(str(entry.get("code", "")), str(entry.get("message", "")))
            if failure:
                return failure
    return None


class MultiZoneGCPNodeProvider(SpotGCPNodeProvider):
    """``SpotGCPNodeProvider`` with Spot workers spread over ``availability_zones``."""

    def __init__(self, provider_config: Dict[str, Any], cluster_name: str, *,
                 clock: Callable[[], float] = time.monotonic, credentials: Any = None):
        self.settings = MultiZoneSettings.from_provider_config(provider_config)
        self._clock = clock
        self._credentials = credentials
        self._policies: Dict[str, ZonePolicy] = {}
        self.zone_resources: Dict[str, GCPCompute] = {}
        super().__init__(provider_config, cluster_name)  # calls _construct_clients

    # -- clients ---------------------------------------------------------------------------
    def _construct_clients(self) -> None:
        settings = self.settings
        if self._credentials is not None:
            compute, tpu = build_compute_client(self._credentials, settings.compute_api_endpoint), None
        else:
            # Ray's own credential handling (gcp_credentials in the YAML, else ADC).
            _, _, compute, tpu = construct_clients_from_provider_config(self.provider_config)
            if settings.compute_api_endpoint:
                compute = build_compute_client(compute._http.credentials, settings.compute_api_endpoint)
        self.zone_resources = {zone: GCPCompute(compute, settings.project_id, zone, self.cluster_name)
                               for zone in settings.all_zones}
        self.resources: Dict[GCPNodeType, GCPResource] = {
            GCPNodeType.COMPUTE: self.zone_resources[settings.head_zone]}
        if tpu is not None:
            self.resources[GCPNodeType.TPU] = GCPTPU(tpu, settings.project_id, settings.head_zone, self.cluster_name)

    def _listing_resources(self) -> List[GCPResource]:
        tpu = [self.resources[GCPNodeType.TPU]] if GCPNodeType.TPU in self.resources else []
        return list(self.zone_resources.values()) + tpu

    # -- queries across zones ----------------------------------------------------------------
    @gcp_retry
    def non_terminated_nodes(self, tag_filters: dict) -> List[str]:
        with self.lock:
            instances = []
            for resource in self._listing_resources():
                instances += resource.list_instances(dict(tag_filters))
            self.cached_nodes = {instance["name"]: instance for instance in instances}
            return list(self.cached_nodes)

    def _get_resource_depending_on_node_name(self, node_name: str) -> GCPResource:
        # A node lives in the zone it was listed in; Ray's version assumes the one zone.
        node = self.cached_nodes.get(node_name)
        if node is None:
            self.non_terminated_nodes({})
            node = self.cached_nodes.get(node_name)
        if node is not None:
            return node.resource
        return super()._get_resource_depending_on_node_name(node_name)

    def nodes_per_zone(self, node_type: str) -> Dict[str, int]:
        """Non-terminated nodes of ``node_type`` in each configured zone."""
        counts: Counter = Counter()
        for zone, resource in self.zone_resources.items():
            counts[zone] += len(resource.list_instances({TAG_RAY_USER_NODE_TYPE: node_type}))
        return dict(counts)

    # -- launching -------------------------------------------------------------------------
    def policy_for(self, node_type: str) -> ZonePolicy:
        """The zone policy of one node type (each type keeps its own blocked zones)."""
        if node_type not in self._policies:
            self._policies[node_type] = ZonePolicy(self.settings.policy, self._clock)
        return self._policies[node_type]

    @gcp_retry
    def create_node(self, base_config: dict, tags: dict, count: int) -> Dict[str, dict]:
        if get_node_type(base_config) != GCPNodeType.COMPUTE or not is_spot(base_config):
            return super().create_node(localize_node_config(base_config, self.settings.head_zone), tags, count)
        node_type = tags.get(TAG_RAY_USER_NODE_TYPE, "unknown")
        with self.lock:
            policy = self.policy_for(node_type)
            counts = Counter(self.nodes_per_zone(node_type))
            created: Dict[str, dict] = {}
            while len(created) < count:
                planned = self._plan(node_type, policy, counts, count - len(created))
                if not planned:
                    raise NoZoneAvailableError(
                        f"{count - len(created)} of {count} {node_type} nodes not launched: "
                        f"{policy.choose(counts).reason}")
                created.update(self._launch(node_type, policy, counts, planned, base_config, tags))
            return created

    def _plan(self, node_type: str, policy: ZonePolicy, counts: Counter, wanted: int) -> List[str]:
        planned = []
        for _ in range(wanted):
            choice = policy.choose(counts)
            logger.info("zone for a new %s node: %s", node_type, choice.reason)
            if choice.zone is None:
                break
            counts[choice.zone] += 1
            planned.append(choice.zone)
        return planned

    def _launch(self, node_type: str, policy: ZonePolicy, counts: Counter, planned: List[str],
                base_config: dict, tags: dict) -> Dict[str, dict]:
        """Insert one VM per planned zone, then wait for all; failed zones get blocked."""
        operations: List[Tuple[str, str, dict]] = []
        for zone in planned:
            if zone in policy.blocked():  # an earlier insert of this batch failed there
                counts[zone] -= 1
                continue
            try:
                operation, name = self.zone_resources[zone].create_instance(
                    localize_node_config(base_config, zone), tags, wait_for_operation=False)
            except HttpError as error:
                self._record_failure(node_type, policy, counts, zone, error)
                continue
            operations.append((zone, name, operation))
        launched = {}
        for zone, name, operation in operations:
            try:
                launched[name] = self.zone_resources[zone].wait_for_operation(operation)
            except Exception as error:  # Ray raises a bare Exception(operation["error"])
                self._record_failure(node_type, policy, counts, zone, error)
                continue
            logger.info("launched %s node %s in %s", node_type, name, zone)
        return launched

    def _record_failure(self, node_type: str, policy: ZonePolicy, counts: Counter, zone: str,
                        error: BaseException) -> None:
        failure = failure_from_error(error)
        if failure is None:
            raise error
        counts[zone] -= 1
        decision = policy.record_failure(zone, failure)
        logger.warning("launch of a %s node in %s failed, %s (GCE: %s)", node_type, zone, decision.reason,
                       failure.message)
