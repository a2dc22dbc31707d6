"""Replacements at the notice (raytrain_spot/preemption/replacements.py): the decisions with an injected
request function, clock and autoscaler version, no cluster; the driver's ClusterMonitor feeding
them; and, against Ray's own v1 scheduler code, why max_workers bundles are not enough while a
preempted VM runs out an advance notice."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Dict, List

import pytest
import yaml

from raytrain_spot import _ray
from raytrain_spot.observe.records import Add, Drain, ReplacementRequested
from raytrain_spot.preemption.replacements import ReplacementRequester, nodes_to_replace, request_worker_bundles
from raytrain_spot.preemption.node_events import ClusterMonitor, NodeState
from tests.conftest import REPO

NOW = 1_800_000_000.0
GPU_NODE = {"CPU": 12.0, "GPU": 1.0, "memory": 80e9}
WORKER = {"CPU": 8, "GPU": 1}
MAX_WORKERS = 8


def node(name: str, deadline_in_s=None, alive=True, resources=GPU_NODE) -> NodeState:
    deadline_ms = None if deadline_in_s is None else (0 if deadline_in_s == 0 else round((NOW + deadline_in_s) * 1000))
    return NodeState(name, alive, deadline_ms, "gpu-spot", "spot", resources.get("GPU", 0.0), dict(resources))


def cluster(**draining) -> List[NodeState]:
    """8 GPU nodes n0..n7 (and a CPU-only head); ``n3=145`` drains with its deadline 145 s away."""
    nodes = [NodeState("head", True, None, "head", "on_demand", 0.0, {"CPU": 0.0})]
    return nodes + [node(f"n{i}", draining.get(f"n{i}")) for i in range(8)]


class Harness:
    def __init__(self, v2: bool = False, fail_requests: int = 0):
        self.now = NOW
        self.requests: List[List[Dict[str, float]]] = []
        self.events: List[ReplacementRequested] = []
        self.fail_requests = fail_requests
        self.probes = 0

        def request(bundles):
            if self.fail_requests:
                self.fail_requests -= 1
                raise ConnectionError("GCS unreachable")
            self.requests.append(bundles)

        def autoscaler_v2():
            self.probes += 1
            return v2

        self.requester = ReplacementRequester(WORKER, MAX_WORKERS, self.events.append,
                                              request=request, autoscaler_v2=autoscaler_v2, clock=lambda: self.now)

    def update(self, nodes, after_s: float = 0.0):
        self.now += after_s
        self.requester.update(nodes)

    @property
    def sizes(self) -> List[int]:
        return [len(bundles) for bundles in self.requests]


def test_an_advance_notice_asks_for_max_workers_plus_the_noticed_nodes_workers_at_once(caplog):
    caplog.set_level(logging.INFO, logger="raytrain_spot.preemption.replacements")
    h = Harness()
    h.update(cluster())
    assert h.requests == [] and h.probes == 0, "nothing to ask while no node drains (Ray Train's request stands)"
    h.update(cluster(n3=145))  # metadata notice 150 s before the hard stop, margin 5
    assert h.requests == [[{"CPU": 8, "GPU": 1}] * 9]
    assert h.events == [ReplacementRequested(node="n3", workers=1, bundles=9, bundle={"CPU": 8, "GPU": 1},
                                             until=NOW + 115)]
    line = next(r.getMessage() for r in caplog.records if "requested at its notice" in r.getMessage())
    assert "9 worker bundles" in line and "max_workers=8 + 1" in line and "in 145.0 s" in line


def test_the_request_is_reasserted_while_the_notice_runs_and_withdrawn_when_the_shutdown_starts(caplog):
    caplog.set_level(logging.INFO, logger="raytrain_spot.preemption.replacements")
    h = Harness()
    h.update(cluster(n3=145))
    h.update(cluster(n3=144.5), after_s=0.5)
    assert h.sizes == [9], "not every poll"
    h.update(cluster(n3=142.5), after_s=2.0)
    assert h.sizes == [9, 9], "again after REASSERT_S: Ray Train's coordinator replaces it every 20 s"
    # 30 s before the hard stop + margin, GCE's shutdown begins: the VM is STOPPING, which the
    # autoscaler counts as gone; asking for its replacement on top would launch one node too many.
    h.update(cluster(n3=30), after_s=112.5)
    assert h.sizes == [9, 9, 8]
    assert any("back to max_workers=8" in r.getMessage() for r in caplog.records)
    h.update(cluster(n3=20), after_s=10)
    h.update(cluster(), after_s=30)
    assert h.sizes == [9, 9, 8], "nothing more once back at Ray Train's own request"
    assert [e.node for e in h.events] == ["n3"], "one event per node"


def test_a_node_that_dies_inside_its_notice_withdraws_the_request():
    h = Harness()
    h.update(cluster(n3=145))
    nodes = cluster()
    nodes[4] = node("n3", 140, alive=False)
    h.update(nodes, after_s=5)
    assert h.sizes == [9, 8]


def test_two_notices_ask_for_both_and_each_gets_its_event():
    h = Harness()
    h.update(cluster(n3=145))
    h.update(cluster(n3=140, n5=145), after_s=5)
    assert h.sizes == [9, 10]
    assert [(e.node, e.bundles) for e in h.events] == [("n3", 9), ("n5", 10)]
    # One leaves the window while another enters it: same count, but the newcomer is announced.
    h.update(cluster(n3=29, n5=140, n6=145), after_s=0.5)
    assert h.sizes == [9, 10, 10] and [e.node for e in h.events] == ["n3", "n5", "n6"]


@pytest.mark.parametrize("draining, why", [
    (dict(n3=25), "within GCE's 30 s shutdown"),  # GCE's default notice: the VM is STOPPING already
    (dict(n3=0), "has no deadline"),
])
def test_no_request_when_the_autoscaler_already_counts_the_vm_as_gone(draining, why, caplog):
    caplog.set_level(logging.INFO, logger="raytrain_spot.preemption.replacements")
    h = Harness()
    h.update(cluster(**draining))
    h.update(cluster(**draining), after_s=1)
    assert h.requests == [] and h.events == []
    lines = [r.getMessage() for r in caplog.records if "No replacement request for node n3" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0], "said once, with the reason"


def test_a_draining_node_without_a_workers_room_needs_no_replacement():
    h = Harness()
    nodes = cluster() + [node("cpu-only", 145, resources={"CPU": 16.0})]
    h.update(nodes)
    assert h.requests == []


def test_autoscaler_v2_already_leaves_draining_nodes_out_so_nothing_is_requested(caplog):
    caplog.set_level(logging.INFO, logger="raytrain_spot.preemption.replacements")
    h = Harness(v2=True)
    h.update(cluster(n3=145))
    h.update(cluster(n3=140), after_s=5)
    assert h.requests == [] and h.events == [] and h.probes == 1
    assert any("autoscaler v2" in r.getMessage() for r in caplog.records)


def test_a_failed_request_is_retried_and_announced_only_once_it_is_in():
    h = Harness(fail_requests=1)
    h.update(cluster(n3=145))
    assert h.requests == [] and h.events == []
    h.update(cluster(n3=144.5), after_s=0.5)
    assert h.sizes == [9] and [e.node for e in h.events] == ["n3"]


def test_nodes_to_replace_counts_the_workers_each_noticed_node_holds():
    big = node("big", 145, resources={"CPU": 48.0, "GPU": 4.0})
    assert nodes_to_replace([big, node("late", 29), node("dead", 145, alive=False), node("n1")], WORKER, NOW) == {
        "big": 4}


# -- the driver's monitor feeds it ---------------------------------------------------------------
class Events:
    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_the_cluster_monitor_hands_every_view_to_the_requester():
    events, h = Events(), Harness()
    h.requester._emit = events.emit
    views = [{n.node_id: n for n in cluster()}, {n.node_id: n for n in cluster(n3=145)}]
    monitor = ClusterMonitor(events, read=lambda: views.pop(0), replacements=h.requester)
    monitor.poll()
    monitor.poll()
    kinds = [r.ev for r in events.records]
    assert kinds.count(Add.ev) == 9 and kinds[-2:] == [Drain.ev, ReplacementRequested.ev]
    assert h.sizes == [9]


def test_read_cluster_carries_each_nodes_resources():
    from raytrain_spot.elastic.capacity import NodeView
    from raytrain_spot.preemption import node_events

    view = NodeView("n0", True, True, {"CPU": 12.0, "GPU": 1.0}, drain_deadline_ms=5, labels={})
    original = node_events.live_nodes
    node_events.live_nodes = lambda: [view]
    try:
        assert node_events.read_cluster()["n0"].resources == {"CPU": 12.0, "GPU": 1.0}
    finally:
        node_events.live_nodes = original


# -- what Ray 2.60 does, pinned ---------------------------------------------------------------------
def test_the_request_goes_through_rays_public_api_and_the_version_probe_through_the_pinned_module():
    from ray.autoscaler.sdk import request_resources

    assert "bundles" in inspect.signature(request_resources).parameters
    assert "request_resources" in inspect.getsource(request_worker_bundles)
    assert list(inspect.signature(_ray.is_autoscaler_v2).parameters) == ["fetch_from_server", "gcs_client"]


class Provider:
    """What Ray's v1 scheduler asks a node provider: each VM's tags and IP."""

    def __init__(self, vms: Dict[str, str]):
        self.vms = vms  # VM name -> node type

    def node_tags(self, vm):
        from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

        return {TAG_RAY_USER_NODE_TYPE: self.vms[vm], TAG_RAY_NODE_KIND: "head" if vm == "head" else "worker"}

    def internal_ip(self, vm):
        return f"10.0.0.{list(self.vms).index(vm) + 1}"


def v1_launches(spot_max_workers: int, cluster_max_workers: int, bundles: int, spot_vms: int = 7) -> Dict[str, int]:
    """Nodes Ray 2.60's v1 autoscaler would launch for ``request_resources(bundles)`` on the shipped
    hybrid cluster (``spot_vms`` Spot + 1 on-demand A100 VMs its provider lists, one Spot one noticed)."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler

    from raytrain_spot.cluster.cluster_yaml import prepare

    with open(os.path.join(REPO, "cluster", "gcp-spot.yaml")) as f:
        config = prepare(yaml.safe_load(f.read().replace("FILL-IN-project-id", "p")))
    types = config["available_node_types"]
    types["gpu-spot"]["max_workers"] = spot_max_workers
    vms = {"head": "head", **{f"spot-{i}": "gpu-spot" for i in range(spot_vms)}, "od-0": "gpu-on-demand"}
    provider = Provider(vms)
    scheduler = ResourceDemandScheduler(provider, types, cluster_max_workers, "head", upscaling_speed=8.0)
    running = {provider.internal_ip(vm): dict(types[t]["resources"]) for vm, t in vms.items()}
    to_launch, _ = scheduler.get_nodes_to_launch(
        list(vms), {}, [], running, [], running, ensure_min_cluster_size=[dict(WORKER)] * bundles,
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    return dict(to_launch)


def test_rays_v1_autoscaler_counts_a_running_noticed_vm_so_max_workers_bundles_launch_nothing():
    # Ray Train's standing request: max_workers bundles fit on the 8 RUNNING VMs, the noticed one included.
    assert v1_launches(spot_max_workers=8, cluster_max_workers=9, bundles=8) == {}
    # One more bundle per noticed node's worker is unmet: the replacement is launched at the notice...
    assert v1_launches(spot_max_workers=8, cluster_max_workers=9, bundles=9) == {"gpu-spot": 1}
    # ...where the node type and the cluster leave room: the shipped pools are full (min == max).
    assert v1_launches(spot_max_workers=7, cluster_max_workers=8, bundles=9) == {}
    assert v1_launches(spot_max_workers=8, cluster_max_workers=8, bundles=9) == {}
    # Once GCE stops the VM (STOPPING is not listed), the shipped pool replaces it with no request at all.
    assert v1_launches(spot_max_workers=7, cluster_max_workers=8, bundles=8, spot_vms=6) == {"gpu-spot": 1}


def test_rays_gcp_provider_stops_counting_a_vm_once_gce_stops_it():
    from ray.autoscaler._private.gcp.node import GCPComputeNode

    assert GCPComputeNode.NON_TERMINATED_STATUSES == {"PROVISIONING", "STAGING", "RUNNING"}


def test_rays_v2_autoscaler_leaves_a_draining_node_out_of_scheduling():
    from ray.autoscaler.v2.instance_manager.common import InstanceUtil
    from ray.autoscaler.v2.instance_manager.reconciler import Reconciler
    from ray.core.generated.autoscaler_pb2 import NodeStatus
    from ray.core.generated.instance_manager_pb2 import Instance

    stopping = Reconciler._reconciled_im_status_from_ray_status(NodeStatus.DRAINING, Instance.RAY_RUNNING)
    assert stopping == Instance.RAY_STOPPING
    # SchedulingNode.new keeps only instances that may still reach RAY_RUNNING.
    assert not InstanceUtil.is_ray_running_reachable(stopping)
    assert InstanceUtil.is_ray_running_reachable(Instance.RAY_RUNNING)
