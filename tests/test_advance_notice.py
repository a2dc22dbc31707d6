"""GCE's advance preemption notice (``scheduling.preemptionNoticeDuration``, 120 s) end to end without a
cloud: the cluster YAMLs' option and the check's review of it, the instance body Ray's GCP code
inserts, and the Spot simulator with ``chaos.notice_s=150`` down to the watcher each node gets.
The watcher's own deadlines (HTTP emulator, real GCS) are in tests/test_watcher.py."""

from __future__ import annotations

import copy
import glob
import json
import os
from types import SimpleNamespace

import pytest
import yaml
from google.auth.credentials import AnonymousCredentials
from ray.autoscaler._private.gcp.node import GCPCompute
from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

from raytrain_spot.cluster import check as cluster_check
from raytrain_spot.cluster.cluster_yaml import NOTICE_KEY, advance_notice_s, prepare
from raytrain_spot.preemption.node_events import PRICING_LABEL
from raytrain_spot.cluster.gcp.multizone_provider import build_compute_client
from raytrain_spot.cluster.yaml_summary import format_summary, summarize
from raytrain_spot.config.schema import load_config
from raytrain_spot.observe import records
from raytrain_spot.preemption.drain_decision import Notice, decide_drain
from raytrain_spot.preemption.gce_metadata import HttpPreemptedPoller
from raytrain_spot.preemption.watcher import _parse_args
from raytrain_spot.simulator import chaos
from tests.servers.compute_api import ComputeEngineEmulator
from tests.conftest import REPO

GCP_FILES = sorted(glob.glob(os.path.join(REPO, "cluster", "gcp-*.yaml")))
MAIN_YAML = os.path.join(REPO, "cluster", "gcp-spot.yaml")
NOTICE_LINE = "        preemptionNoticeDuration: {seconds: 120}\n"
WATCHER = "-m raytrain_spot.preemption.watcher --margin-s 5 --notice-s 150"


def text_of(path: str) -> str:
    with open(path) as f:
        return f.read().replace("FILL-IN-project-id", "my-project")


def turned_off(text: str) -> dict:
    """What the YAML's comments tell a user to do to turn it off: delete the line, pass --notice-s 30."""
    return yaml.safe_load(text.replace(NOTICE_LINE, "").replace(WATCHER, WATCHER[:-3] + "30"))


def spot_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items()
            if t["labels"][PRICING_LABEL] == "spot"}


def problems_of(config: dict):
    return [(p.node_type, p.key, p.problem, p.fix) for p in cluster_check.review(prepare(config))]


# -- the YAML option and the check ---------------------------------------------------------------
@pytest.mark.parametrize("path", GCP_FILES, ids=os.path.basename)
def test_turning_the_notice_off_as_the_comments_say_passes_the_check_and_reports_30_s(path):
    text = text_of(path)
    assert text.count(NOTICE_LINE) == len(spot_types(yaml.safe_load(text))) >= 1, "one line per Spot type"
    config = turned_off(text)
    assert all(NOTICE_KEY not in t["node_config"]["scheduling"] for t in spot_types(config).values())
    assert any(WATCHER[:-3] + "30" in c for c in config["worker_start_ray_commands"])
    prepared = prepare(config)
    assert cluster_check.review(prepared) == []
    summary = summarize(prepared, lambda *_: 1.0)
    assert {t.name: t.notice_s for t in summary.node_types if t.notice_s} == dict.fromkeys(spot_types(config), 30)


@pytest.mark.parametrize("path", GCP_FILES, ids=os.path.basename)
def test_every_spot_type_has_the_120_s_notice_on_and_the_check_reports_150_s(path):
    config = yaml.safe_load(text_of(path))
    assert any(WATCHER in c for c in config["worker_start_ray_commands"])
    assert all(t["node_config"]["scheduling"][NOTICE_KEY] == {"seconds": 120}
               for t in spot_types(config).values())
    prepared = prepare(config)
    assert cluster_check.review(prepared) == []
    summary = summarize(prepared, lambda *_: 1.0)
    for row in summary.node_types:
        assert (row.notice_s, row.advance_notice_s) == ((150, 120) if row.name in spot_types(config) else (None, 0))
    text = format_summary(summary)
    assert "preemption notice 150 s before the hard stop (preemptionNoticeDuration 120 s" in text
    # The shipped pools are full (min == max): the check says a replacement must wait for the VM to go.
    assert "no room to start a replacement" in text


def test_the_check_counts_the_room_for_replacements_at_the_notice():
    config = yaml.safe_load(text_of(MAIN_YAML))
    config["available_node_types"]["gpu-spot"]["max_workers"] = 9
    config["max_workers"] = 9  # 1 on-demand + 7 Spot at min: the cluster leaves room for 1 more, the type for 2
    spot = next(t for t in summarize(prepare(config), lambda *_: 1.0).node_types
                if t.name == "gpu-spot")
    assert spot.replacement_room == 1
    assert "can start up to 1 replacement(s)" in format_summary(
        summarize(prepare(config), lambda *_: 1.0))


def test_the_compute_v1_api_ray_inserts_through_has_the_field_in_the_shape_the_yamls_write():
    """google-api-python-client's own copy of the Compute v1 discovery document (the version the head installs)."""
    from googleapiclient.discovery_cache import get_static_doc

    schemas = json.loads(get_static_doc("compute", "v1"))["schemas"]
    field = schemas["Scheduling"]["properties"][NOTICE_KEY]
    assert field["$ref"] == "Duration" and "Spot VMs only" in field["description"]
    assert {"seconds", "nanos"} == set(schemas["Duration"]["properties"])
    spot = spot_types(yaml.safe_load(text_of(MAIN_YAML)))["gpu-spot"]
    assert set(spot["node_config"]["scheduling"][NOTICE_KEY]) <= set(schemas["Duration"]["properties"])


def test_ray_inserts_the_notice_as_written():
    """Ray's GCP code sends node_config unchanged as the instances.insert body (GCE's own spelling)."""
    config = prepare(yaml.safe_load(text_of(MAIN_YAML)))
    node_config = config["available_node_types"]["gpu-spot"]["node_config"]
    with ComputeEngineEmulator("my-project") as api:
        compute = GCPCompute(build_compute_client(AnonymousCredentials(), api.endpoint), "my-project",
                             config["provider"]["availability_zone"], config["cluster_name"])
        compute.create_instance(node_config, {TAG_RAY_USER_NODE_TYPE: "gpu-spot", TAG_RAY_NODE_KIND: "worker",
                                              TAG_RAY_NODE_NAME: "ray-test-worker"})
        [insert] = api.inserts()
    assert insert.accepted
    assert insert.body["scheduling"] == {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
                                         "onHostMaintenance": "TERMINATE", "automaticRestart": False,
                                         "preemptionNoticeDuration": {"seconds": 120}}


def notice_on(node_type: str, value):
    def mistake(config):
        config["available_node_types"][node_type]["node_config"]["scheduling"][NOTICE_KEY] = value
    return mistake


def watcher_notice(value: str):
    def mistake(config):
        config["worker_start_ray_commands"] = [c.replace("--notice-s 150", f"--notice-s {value}")
                                               for c in config["worker_start_ray_commands"]]
    return mistake


def two_spot_types_with_other_notices(config):
    types = config["available_node_types"]
    other = copy.deepcopy(types["gpu-spot"])
    other["labels"]["raytrain-spot/node-type"] = "gpu-spot-b"
    del other["node_config"]["scheduling"][NOTICE_KEY]
    types["gpu-spot-b"] = dict(other, min_workers=0, max_workers=0)


def margin_beyond_the_notice(config):
    config["worker_start_ray_commands"] = [c.replace("--margin-s 5", "--margin-s 150")
                                           for c in config["worker_start_ray_commands"]]


TYPE_KEY = f"node_config.scheduling.{NOTICE_KEY}"


@pytest.mark.parametrize("mistake, node_type, key, says", [
    (notice_on("gpu-spot", {"seconds": 121}), "gpu-spot", TYPE_KEY, "0 to 120 s"),
    (notice_on("gpu-spot", {"seconds": -1}), "gpu-spot", TYPE_KEY, "0 to 120 s"),
    (notice_on("gpu-spot", {"seconds": 1.5}), "gpu-spot", TYPE_KEY, "whole seconds"),
    (notice_on("gpu-spot", {"seconds": 120, "nanos": 5}), "gpu-spot", TYPE_KEY, "whole seconds"),
    (notice_on("gpu-spot", "120s"), "gpu-spot", TYPE_KEY, "Duration mapping"),
    (notice_on("gpu-spot", {"sec": 120}), "gpu-spot", TYPE_KEY, "Duration mapping"),
    (notice_on("gpu-on-demand", {"seconds": 120}), "gpu-on-demand", TYPE_KEY, "Spot VMs only"),
    (notice_on("head", {"seconds": 120}), "head", TYPE_KEY, "Spot VMs only"),
    (watcher_notice("30"), "cluster", "worker_start_ray_commands", "waste the advance notice"),
    (watcher_notice("200"), "cluster", "worker_start_ray_commands", "after the VM is gone"),
    (watcher_notice("soon"), "cluster", "worker_start_ray_commands", "not a number"),
    (two_spot_types_with_other_notices, "cluster", f"available_node_types.*.{TYPE_KEY}", "gpu-spot-b 30 s"),
    (margin_beyond_the_notice, "cluster", "worker_start_ray_commands", "refuse to start"),
])
def test_the_check_refuses_a_notice_gce_or_the_watcher_would_get_wrong(mistake, node_type, key, says):
    config = yaml.safe_load(text_of(MAIN_YAML))
    mistake(config)
    problems = problems_of(config)
    assert any(p[0] == node_type and p[1] == key and says in p[2] and p[3] for p in problems), problems


def test_a_watcher_told_150_s_on_vms_without_the_notice_is_refused():
    config = yaml.safe_load(text_of(MAIN_YAML).replace(NOTICE_LINE, ""))
    [problem] = problems_of(config)
    assert problem[:2] == ("cluster", "worker_start_ray_commands")
    assert "no preemptionNoticeDuration" in problem[2] and "after the VM is gone" in problem[2]
    assert problem[3] == "pass --notice-s 30 to the watcher"


def test_string_seconds_as_json_writes_an_int64_are_taken():
    assert advance_notice_s({"scheduling": {NOTICE_KEY: {"seconds": "120"}}}) == (120, None)
    assert advance_notice_s({"scheduling": {}}) == (0, None)


def test_the_command_line_prints_the_notice_column(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "on.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(text_of(MAIN_YAML))))
    assert cluster_check.main(["--new-token"]) == 0
    capsys.readouterr()
    assert cluster_check.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "notice" in out.splitlines()[1] and "150 s" in out and out.rstrip().endswith("ok")


# -- the simulator with chaos.notice_s=150 -------------------------------------------------------
def test_chaos_notice_s_150_composes_and_the_default_script_takes_it(compose):
    cfg = load_config(compose("+experiment=vlm", "+chaos=events", "chaos.notice_s=150")).chaos
    assert cfg.notice_s == 150 and cfg.margin_s == 5
    assert [e.notice_s for e in cfg.events if e.action == "preempt"] == [None], \
        "the default event must inherit chaos.notice_s, not pin 30"
    # Nothing caps the margin at GCE's 30 s either: only the notice bounds it.
    assert load_config(compose("+experiment=vlm", "+chaos=events", "chaos.notice_s=150",
                               "chaos.margin_s=40")).chaos.margin_s == 40


class FakeNode:
    all_processes: dict = {}  # no process of its own: what the soft-off signals is tests/test_vm_shutdown.py's

    def __init__(self, index: int):
        self.node_id = f"{index:056x}"


class FakeCluster:
    address = "127.0.0.1:1"

    def __init__(self, n: int):
        self.workers = [FakeNode(i) for i in range(n)]
        self.removed = []

    def remove_worker_node(self, node):
        self.removed.append(node.node_id)


class Events:
    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_the_simulator_gives_150_s_and_starts_watchers_that_drain_for_it(compose, tmp_path, monkeypatch):
    # Nodes started over SSH (no service whose main process the simulator would play against a GCS).
    session = tmp_path / "session.yaml"
    session.write_text(yaml.safe_dump({"worker_start_ray_commands": ["ray start --address=$RAY_HEAD_IP:6379"]}))
    cfg = load_config(compose("+experiment=vlm", "+chaos=events", "chaos.notice_s=150",
                              f"chaos.node_start={session}")).chaos
    commands = []

    def spawn(command, env, log):
        commands.append(command)
        return SimpleNamespace(poll=lambda: 0, kill=lambda: None, wait=lambda timeout=None: 0)

    monkeypatch.setattr(chaos, "spawn_tied", spawn)
    now = {"t": 1000.0}
    cluster, events, killed = FakeCluster(3), Events(), []
    simulator = chaos.SpotSimulator(cfg, cluster, events, current_step=lambda: 1,
                                    on_kill=lambda node, noticed: killed.append((node, noticed)),
                                    log_dir=str(tmp_path), clock=lambda: now["t"],
                                    ray_reports_dead=lambda node_id: True)
    try:
        assert len(commands) == 3
        # The watcher each node runs: --notice-s 150, so its deadline is 145 s after the notice.
        settings = _parse_args(commands[0][commands[0].index("--node-id"):]).settings
        assert (settings.notice_s, settings.margin_s) == (150, 5)
        assert decide_drain(Notice("metadata", 0.0), "n", settings).deadline_s == 145
        simulator.tick()  # the clock starts at the first step
        now["t"] += 20
        simulator.tick()  # the default script: node 2 preempted 20 s in
        assert [e for e in events.records if isinstance(e, records.Notice)] == [
            records.Notice(node=cluster.workers[2].node_id, notice_s=150)]
        assert HttpPreemptedPoller(simulator.metadata.host("worker-2")).read(None, None).preempted
        assert not HttpPreemptedPoller(simulator.metadata.host("worker-1")).read(None, None).preempted
        now["t"] += 119.9
        simulator.tick()
        assert [e for e in events.records if isinstance(e, records.SoftOff)] == [], (
            "the soft-off comes 120 s after the notice")
        now["t"] += 0.2
        simulator.tick()
        assert [e.node for e in events.records if isinstance(e, records.SoftOff)] == [cluster.workers[2].node_id]
        now["t"] += 29.8
        simulator.tick()
        assert killed == [], "killed before the 150 s notice ran out"
        now["t"] += 0.2
        simulator.tick()
        assert killed == [(cluster.workers[2].node_id, True)] and cluster.removed == [cluster.workers[2].node_id]
    finally:
        simulator.close()


def test_a_trace_replayed_with_150_s_kills_150_s_after_each_notice():
    actions = chaos.trace_actions([2, 1, 1], tick_s=3, notice_s=150, provisioning_s=5, pick=lambda alive, k: alive[:k])
    assert [(a.kind, a.at_s, a.node, a.notice_s) for a in actions] == [
        ("notice", 3, 0, 150), ("soft_off", 123, 0, 150), ("kill", 153, 0, 0.0)]
