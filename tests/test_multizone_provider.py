"""The multi-zone Spot provider, driven through Ray's googleapiclient path against a local Compute API.

Every test runs Ray's own GCP code (GCPCompute's inserts, operation polling, list filters,
setLabels, deletes) through a googleapiclient client built from the static discovery
document, pointed at ``ComputeEngineEmulator`` on 127.0.0.1.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import ray
from google.auth.credentials import AnonymousCredentials
from ray.autoscaler._private.gcp import config as gcp_config
from ray.autoscaler._private.gcp import node as gcp_node
from ray.autoscaler._private.gcp.node_provider import GCPNodeProvider
from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

from raytrain_spot.cluster.gcp.multizone_provider import (
    MultiZoneGCPNodeProvider,
    MultiZoneSettings,
    NoZoneAvailableError,
    localize_node_config,
)
from raytrain_spot.cluster.gcp.zone_policy import (
    FailureKind,
    Placement,
    ZonePolicy,
    ZonePolicyConfig,
    classify_failure,
)
from tests.servers.compute_api import ComputeEngineEmulator

PROJECT = "test-project"
ZONES = ["us-central1-a", "us-central1-b", "us-central1-c"]
BLOCK_S = 600.0
SPOT_CONFIG = {
    "machineType": "a2-highgpu-1g",
    "disks": [{"boot": True, "autoDelete": True, "initializeParams": {"diskType": "pd-balanced",
                                                                     "sourceImage": "family/ubuntu"}}],
    "scheduling": {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
                   "onHostMaintenance": "TERMINATE", "automaticRestart": False},
}
ON_DEMAND_CONFIG = dict(SPOT_CONFIG, scheduling={"provisioningModel": "STANDARD", "onHostMaintenance": "TERMINATE",
                                                 "automaticRestart": True})


class ManualClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def worker_tags(node_type: str) -> dict:
    return {TAG_RAY_USER_NODE_TYPE: node_type, TAG_RAY_NODE_NAME: "ray-mz-worker", TAG_RAY_NODE_KIND: "worker"}


def zone_of(instance: dict) -> str:
    return instance["zone"].rsplit("/", 1)[-1]


@pytest.fixture
def api():
    with ComputeEngineEmulator(PROJECT) as emulator:
        yield emulator


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def provider(api, clock):
    def make(**overrides):
        config = dict(type="external", module="raytrain_spot.cluster.gcp.multizone_provider.MultiZoneGCPNodeProvider",
                      project_id=PROJECT, region="us-central1", availability_zone=ZONES[0],
                      availability_zones=ZONES, zone_block_s=BLOCK_S, compute_api_endpoint=api.endpoint)
        config.update(overrides)
        return MultiZoneGCPNodeProvider(config, "mz", clock=clock, credentials=AnonymousCredentials())

    return make


def test_ray_gcp_provider_is_the_version_this_subclass_was_written_against():
    # MultiZoneGCPNodeProvider overrides and calls private parts of Ray's GCP provider;
    # a Ray upgrade must come back here and re-read them.
    assert ray.__version__ == "2.60.0"
    for name in ("_construct_clients", "non_terminated_nodes", "create_node", "terminate_node",
                 "_get_resource_depending_on_node_name"):
        assert callable(getattr(GCPNodeProvider, name)), name
    assert list(inspect.signature(GCPNodeProvider.create_node).parameters) == ["self", "base_config", "tags", "count"]
    assert list(inspect.signature(GCPNodeProvider._get_resource_depending_on_node_name).parameters) == [
        "self", "node_name"]
    assert list(inspect.signature(gcp_node.GCPCompute.create_instance).parameters) == [
        "self", "base_config", "labels", "wait_for_operation"]
    assert list(inspect.signature(gcp_node.GCPCompute.wait_for_operation).parameters) == [
        "self", "operation", "max_polls", "poll_interval"]
    assert list(inspect.signature(gcp_node.GCPCompute.list_instances).parameters) == [
        "self", "label_filters", "is_terminated"]
    assert list(inspect.signature(gcp_node.GCPResource.__init__).parameters) == [
        "self", "resource", "project_id", "availability_zone", "cluster_name"]
    assert list(inspect.signature(gcp_config.build_request).parameters)[0] == "http"
    assert callable(gcp_config.construct_clients_from_provider_config)
    source = inspect.getsource(GCPNodeProvider.__init__)
    assert "self._construct_clients()" in source and "self.cached_nodes" in source


def test_spot_workers_pack_into_one_zone_by_default(api, provider):
    # Spread would send every step's all-reduce across zones, which GCE bills per GiB.
    provider().create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 4)

    assert [zone_of(i) for i in api.instances()] == [ZONES[0]] * 4


def test_spot_workers_spread_evenly_with_each_zone_in_its_own_urls(api, provider):
    created = provider(zone_placement="spread").create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 6)

    assert len(created) == 6
    zones = [zone_of(i) for i in api.instances()]
    assert sorted(zones) == sorted(ZONES * 2)
    for record in api.inserts():
        assert record.accepted
        assert record.body["machineType"] == f"zones/{record.zone}/machineTypes/a2-highgpu-1g"
        assert record.body["disks"][0]["initializeParams"]["diskType"] == f"zones/{record.zone}/diskTypes/pd-balanced"
        assert record.body["scheduling"]["provisioningModel"] == "SPOT"
        assert record.body["labels"]["ray-cluster-name"] == "mz"


def test_a_stockout_fails_over_to_the_next_zone_and_blocks_the_zone(api, provider, clock, caplog):
    api.exhaust(zone=ZONES[0])
    nodes = provider(zone_placement="spread")
    with caplog.at_level(logging.INFO, logger="raytrain_spot.cluster.gcp.multizone_provider"):
        nodes.create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 3)

    assert sorted(zone_of(i) for i in api.instances()) == [ZONES[1], ZONES[1], ZONES[2]]
    assert [r.accepted for r in api.inserts(zone=ZONES[0])] == [False]
    decisions = [r.getMessage() for r in caplog.records if r.name == "raytrain_spot.cluster.gcp.multizone_provider"]
    failure = next(m for m in decisions if "failed" in m)
    assert "ZONE_RESOURCE_POOL_EXHAUSTED" in failure and ZONES[0] in failure and f"{BLOCK_S:.0f}s" in failure
    assert any(f"blocked: {ZONES[0]}" in m for m in decisions)

    # Still blocked: no new insert goes to the exhausted zone.
    api.restore(zone=ZONES[0])
    clock.now += BLOCK_S - 1
    nodes.create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 1)
    assert len(api.inserts(zone=ZONES[0])) == 1

    # Block over: the emptiest zone is the one that failed.
    clock.now += 2
    nodes.create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 1)
    assert [zone_of(i) for i in api.instances(zone=ZONES[0])] == [ZONES[0]]


def test_stockout_with_details_is_a_stockout_too(api, provider):
    api.exhaust(zone=ZONES[0], with_details=True)
    provider().create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 1)
    assert [zone_of(i) for i in api.instances()] == [ZONES[1]]


def test_regional_quota_blocks_every_zone_of_the_region_and_launch_fails_with_the_reason(api, provider):
    api.quota_exceeded(region="us-central1", metric="PREEMPTIBLE_NVIDIA_A100_GPUS")
    with pytest.raises(NoZoneAvailableError) as raised:
        provider().create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 2)

    # One try is enough: another zone under the same regional quota fails the same way.
    assert len(api.inserts()) == 1
    assert "2 of 2 gpu-spot nodes not launched" in str(raised.value)
    assert all(zone in str(raised.value) for zone in ZONES)
    assert api.instances() == []


def test_every_zone_stocked_out_tries_each_once_then_fails(api, provider):
    for zone in ZONES:
        api.exhaust(zone=zone)
    with pytest.raises(NoZoneAvailableError):
        provider().create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 1)
    assert sorted(r.zone for r in api.inserts()) == ZONES


def test_non_spot_nodes_stay_in_the_head_zone_even_when_spot_fails_there(api, provider):
    api.exhaust(zone=ZONES[1])
    provider().create_node(ON_DEMAND_CONFIG, worker_tags("gpu-on-demand"), 2)
    records = api.inserts()
    assert [r.zone for r in records] == [ZONES[0], ZONES[0]]
    assert records[0].body["disks"][0]["initializeParams"]["diskType"] == f"zones/{ZONES[0]}/diskTypes/pd-balanced"


def test_pack_placement_fills_one_zone_first(api, provider):
    provider(zone_placement="pack").create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 3)
    assert [zone_of(i) for i in api.instances()] == [ZONES[0]] * 3


def test_nodes_are_listed_labelled_and_deleted_in_their_own_zone(api, provider):
    nodes = provider(zone_placement="spread")  # one node per zone
    nodes.create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 3)
    by_zone = {zone_of(i): i["name"] for i in api.instances()}
    assert sorted(nodes.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: "gpu-spot"})) == sorted(by_zone.values())

    fresh = provider()  # a restarted autoscaler knows nothing but the API
    fresh.set_node_tags(by_zone[ZONES[1]], {"ray-node-status": "up-to-date"})
    assert api.instances(zone=ZONES[1])[0]["labels"]["ray-node-status"] == "up-to-date"
    assert fresh.internal_ip(by_zone[ZONES[2]]) == api.instances(zone=ZONES[2])[0]["networkInterfaces"][0]["networkIP"]

    fresh.terminate_node(by_zone[ZONES[2]])
    assert api.instances(zone=ZONES[2]) == []
    assert len(api.instances()) == 2


def test_terminating_a_node_gce_already_deleted_is_not_an_error(api, provider):
    nodes = provider()
    created = list(nodes.create_node(SPOT_CONFIG, worker_tags("gpu-spot"), 2))
    api.preempt(created[0])  # Spot with instanceTerminationAction: DELETE
    assert nodes.non_terminated_nodes({}) == [created[1]]

    nodes.terminate_node(created[0])
    assert [i["name"] for i in api.instances()] == [created[1]]


@pytest.mark.parametrize("overrides, key", [
    ({"availability_zones": ["us-east1-b"]}, "provider.availability_zones"),
    ({"availability_zone": "europe-west4-a"}, "provider.availability_zone"),
    ({"availability_zones": []}, "provider.availability_zones"),
    ({"zone_placement": "random"}, "provider.zone_placement"),
])
def test_settings_errors_name_the_key_and_the_fix(overrides, key):
    config = dict(project_id=PROJECT, region="us-central1", availability_zone=ZONES[0], availability_zones=ZONES)
    config.update(overrides)
    with pytest.raises(ValueError) as raised:
        MultiZoneSettings.from_provider_config(config)
    assert str(raised.value).startswith(key) and "Fix:" in str(raised.value)


def test_localize_rewrites_every_zonal_url_and_leaves_the_rest():
    config = dict(SPOT_CONFIG, machineType="projects/p/zones/us-central1-a/machineTypes/n1-standard-8",
                  guestAccelerators=[{"acceleratorType": "zones/us-central1-a/acceleratorTypes/nvidia-tesla-t4",
                                      "acceleratorCount": 1}])
    localized = localize_node_config(config, "us-central1-f")
    assert localized["machineType"] == "projects/p/zones/us-central1-f/machineTypes/n1-standard-8"
    assert localized["guestAccelerators"][0]["acceleratorType"] == "zones/us-central1-f/acceleratorTypes/nvidia-tesla-t4"
    assert localized["disks"][0]["initializeParams"]["diskType"] == "zones/us-central1-f/diskTypes/pd-balanced"
    assert localized["disks"][0]["initializeParams"]["sourceImage"] == "family/ubuntu"
    assert config["machineType"].startswith("projects/p/zones/us-central1-a/")  # input untouched


# -- the pure policy --------------------------------------------------------------------------
@pytest.mark.parametrize("code, message, kind", [
    ("ZONE_RESOURCE_POOL_EXHAUSTED", "The zone 'z' does not have enough resources available", FailureKind.STOCKOUT),
    ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "...", FailureKind.STOCKOUT),
    ("UNSUPPORTED_OPERATION", "A stockout in this zone", FailureKind.STOCKOUT),
    ("", "Insufficient resource availability for a2-highgpu-1g", FailureKind.STOCKOUT),
    ("QUOTA_EXCEEDED", "Quota 'NVIDIA_A100_GPUS' exceeded.  Limit: 0.0 in region us-central1.", FailureKind.QUOTA),
    ("quotaExceeded", "Quota 'GPUS_ALL_REGIONS' exceeded.  Limit: 0.0 globally.", FailureKind.QUOTA),
    ("INVALID_FIELD_VALUE", "Invalid value for field 'resource.machineType'", None),
])
def test_classify_failure(code, message, kind):
    failure = classify_failure(code, message)
    assert (failure.kind if failure else None) == kind


def test_quota_scope_decides_which_zones_are_blocked():
    clock = ManualClock()
    zones = ("us-central1-a", "us-central1-b", "us-east1-b")
    policy = ZonePolicy(ZonePolicyConfig(zones=zones, block_s=60), clock)
    regional = classify_failure("QUOTA_EXCEEDED", "Quota 'X' exceeded.  Limit: 0.0 in region us-central1.")
    assert policy.record_failure("us-central1-a", regional).zones == ("us-central1-a", "us-central1-b")
    assert policy.choose({}).zone == "us-east1-b"

    everywhere = ZonePolicy(ZonePolicyConfig(zones=zones, block_s=60), clock)
    decision = everywhere.record_failure("us-east1-b", classify_failure("quotaExceeded", "Quota 'G' exceeded. globally"))
    assert decision.zones == zones
    choice = everywhere.choose({"us-central1-a": 2})
    assert choice.zone is None and "every zone is blocked" in choice.reason and "us-central1-a=2" in choice.reason


def test_choice_reason_carries_the_numbers_and_blocks_expire():
    clock = ManualClock()
    policy = ZonePolicy(ZonePolicyConfig(zones=("a-1-x", "a-1-y"), block_s=30, placement=Placement.SPREAD), clock)
    policy.record_failure("a-1-x", classify_failure("ZONE_RESOURCE_POOL_EXHAUSTED", ""))
    choice = policy.choose({"a-1-x": 0, "a-1-y": 5})
    assert choice.zone == "a-1-y"
    assert "a-1-x=0" in choice.reason and "a-1-y=5" in choice.reason and "30s left" in choice.reason
    clock.now += 30
    assert policy.choose({"a-1-x": 0, "a-1-y": 5}).zone == "a-1-x"


def test_policy_config_rejects_bad_values():
    with pytest.raises(ValueError, match="repeats"):
        ZonePolicyConfig(zones=("a", "a"))
    with pytest.raises(ValueError, match="zone_block_s"):
        ZonePolicyConfig(zones=("a",), block_s=-1)


def test_stopped_on_demand_nodes_are_restarted_when_ray_caches_them(api, provider):
    nodes = provider(cache_stopped_nodes=True)
    tags = worker_tags("gpu-on-demand")
    [first] = nodes.create_node(ON_DEMAND_CONFIG, tags, 1)
    nodes.terminate_node(first)
    assert api.instances()[0]["status"] == "TERMINATED"
    assert nodes.non_terminated_nodes({}) == []

    assert list(nodes.create_node(ON_DEMAND_CONFIG, tags, 1)) == [first]
    assert api.instances()[0]["status"] == "RUNNING" and len(api.inserts()) == 1
