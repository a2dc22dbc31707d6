"""A worker group's placement group that Ray Train left behind is removed before the next group
starts (elastic/policy.py), on a real embedded cluster; a placement group of another shape stays."""

from __future__ import annotations

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table

from raytrain_spot.cluster.embedded import connect
from raytrain_spot.config.schema import ClusterConfig
from raytrain_spot.elastic.policy import remove_orphaned_placement_groups

pytestmark = pytest.mark.cluster
WORKER = {"CPU": 1}


def test_an_orphaned_worker_group_placement_group_is_removed_and_its_resources_come_back(monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", "/tmp")
    with connect(ClusterConfig(num_worker_nodes=1, cpus_per_node=2)):
        orphan = placement_group([WORKER], strategy="PACK")  # what a failed start leaves: the worker shape
        someone_elses = placement_group([WORKER], strategy="STRICT_SPREAD")
        ray.get([orphan.ready(), someone_elses.ready()], timeout=60)
        blocked = placement_group([WORKER], strategy="PACK")
        assert blocked.wait(3) is False, "both CPUs of the one worker node are held"

        assert sorted(remove_orphaned_placement_groups(WORKER, "PACK")) == sorted([orphan.id.hex(), blocked.id.hex()])
        assert placement_group_table(orphan)["state"] == "REMOVED"
        assert placement_group_table(someone_elses)["state"] == "CREATED", "another shape is not a worker group's"
        assert placement_group([WORKER], strategy="PACK").wait(30), "the next group gets the orphan's CPU"
