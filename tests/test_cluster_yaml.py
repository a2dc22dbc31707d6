"""Every cluster YAML through Ray's own preparation and schema, and the instances it would create.

The instance bodies are the ones Ray's GCP code sends: ``GCPCompute.create_instance`` (or
the multi-zone provider) inserts through googleapiclient into the local Compute API, which
rejects what GCE rejects (zone URLs for another zone, a list-form ``scheduling``, GPUs
without ``onHostMaintenance: TERMINATE``, Spot with automatic restart).
"""

from __future__ import annotations

import copy
import glob
import os
import re
import tomllib

import pytest
import yaml
from google.auth.credentials import AnonymousCredentials
from ray.autoscaler._private.gcp.node import GCPCompute
from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

import raytrain_spot
from raytrain_spot.cluster import check as cluster_check
from raytrain_spot.preemption.node_events import NODE_TYPE_LABEL, PRICING_LABEL
from raytrain_spot.cluster.cluster_yaml import ClusterConfigError, is_multizone, load, prepare
from raytrain_spot.cluster.gcp.machines import built_in_gpus
from raytrain_spot.cluster.gcp.multizone_provider import MultiZoneGCPNodeProvider, build_compute_client
from raytrain_spot.cluster.gcp_checks import warnings
from raytrain_spot.cluster.yaml_summary import catalog_lookup, format_summary, summarize
from raytrain_spot.elastic.standby import PRELOAD_ENV, PRELOAD_MODULES
from raytrain_spot.simulator.shutdown import node_start
from tests.servers.compute_api import ComputeEngineEmulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_FILES = sorted(glob.glob(os.path.join(ROOT, "cluster", "*.yaml")))
GCP_FILES = [f for f in CLUSTER_FILES if os.path.basename(f).startswith("gcp-")]
MAIN_YAML = os.path.join(ROOT, "cluster", "gcp-spot.yaml")
LOCAL_YAML = os.path.join(ROOT, "cluster", "local.yaml")
STORAGE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"


def names(paths):
    return [os.path.basename(p) for p in paths]


PROJECT = "my-project"


def raw(path: str) -> dict:
    """The YAML as a user has it after filling in the FILL-IN values."""
    with open(path) as f:
        return yaml.safe_load(f.read().replace("FILL-IN-project-id", PROJECT))


def filled(path: str) -> dict:
    return prepare(raw(path), source=path)


def test_the_cluster_directory_has_the_promised_variants():
    assert {"gcp-spot.yaml", "gcp-spot-multizone.yaml", "gcp-spot-h100.yaml", "gcp-spot-l4.yaml",
            "gcp-spot-t4.yaml", "local.yaml"} <= set(names(CLUSTER_FILES))


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=names(CLUSTER_FILES))
def test_ray_prepares_and_validates_the_yaml_and_the_review_finds_nothing_once_filled_in(path):
    config = filled(path)
    assert config["head_node_type"] in config["available_node_types"]
    assert cluster_check.review(config) == []


@pytest.mark.parametrize("path", GCP_FILES, ids=names(GCP_FILES))
def test_the_shipped_files_are_refused_until_the_project_is_filled_in(path):
    problems = cluster_check.review(load(path))
    assert problems and all("placeholder" in p.problem for p in problems)
    assert ("cluster", "provider.project_id") in {(p.node_type, p.key) for p in problems}
    assert ("head", "node_config.serviceAccounts[0].email") in {(p.node_type, p.key) for p in problems}


def create_every_node_type(path: str, api: ComputeEngineEmulator):
    """Insert one VM of each node type (the head included) the way Ray would; return (config, inserts)."""
    config = filled(path)
    provider = config["provider"]
    for name, node_type in config["available_node_types"].items():
        kind = "head" if name == config["head_node_type"] else "worker"
        tags = {TAG_RAY_USER_NODE_TYPE: name, TAG_RAY_NODE_KIND: kind, TAG_RAY_NODE_NAME: f"ray-test-{kind}"}
        if is_multizone(config):
            nodes = MultiZoneGCPNodeProvider(dict(provider, compute_api_endpoint=api.endpoint), config["cluster_name"],
                                             credentials=AnonymousCredentials())
            nodes.create_node(node_type["node_config"], tags, 1 if kind == "head" else 3)
        else:
            compute = GCPCompute(build_compute_client(AnonymousCredentials(), api.endpoint), provider["project_id"],
                                 provider["availability_zone"], config["cluster_name"])
            compute.create_instance(node_type["node_config"], tags)
    return config, api.inserts()


@pytest.mark.parametrize("path", GCP_FILES, ids=names(GCP_FILES))
def test_instances_the_gcp_provider_would_create(path):
    project = PROJECT
    with ComputeEngineEmulator(project) as api:
        config, inserts = create_every_node_type(path, api)
    provider = config["provider"]
    assert inserts and all(r.accepted for r in inserts), [r.body["name"] for r in inserts if not r.accepted]

    for record in inserts:
        body, zone = record.body, record.zone
        node_type = body["labels"]["ray-user-node-type"]
        spec = config["available_node_types"][node_type]
        is_head = node_type == config["head_node_type"]
        labels = spec["labels"]

        # Spot scheduling on Spot workers only, as a dict, deleted on preemption.
        scheduling = body["scheduling"]
        assert isinstance(scheduling, dict)
        if labels[PRICING_LABEL] == "spot":
            assert not is_head
            assert scheduling == {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
                                  "onHostMaintenance": "TERMINATE", "automaticRestart": False,
                                  "preemptionNoticeDuration": {"seconds": 120}}  # GCE's Preview, on by default
        else:
            assert scheduling["provisioningModel"] == "STANDARD"

        # Zone URLs: the zone the VM goes to, in every zonal field.
        if is_multizone(config):
            expected_zones = provider["availability_zones"] if not is_head and labels[
                PRICING_LABEL] == "spot" else [provider["availability_zone"]]
            assert zone in expected_zones
        else:
            assert zone == provider["availability_zone"]
        assert body["machineType"] == f"zones/{zone}/machineTypes/{spec['node_config']['machineType']}"
        for disk in body["disks"]:
            assert disk["initializeParams"]["diskType"].startswith(f"zones/{zone}/diskTypes/")

        # GPUs: built into A2/A3/G2 machine types, attached (with a zonal URL) on N1.
        machine = spec["node_config"]["machineType"]
        if built_in_gpus(machine):
            assert "guestAccelerators" not in body
            assert spec["resources"]["GPU"] == built_in_gpus(machine).count
        for accelerator in body.get("guestAccelerators", []):
            assert machine.startswith("n1-")
            assert re.fullmatch(rf"projects/{project}/zones/{zone}/acceleratorTypes/nvidia-[a-z0-9-]+",
                                accelerator["acceleratorType"])
        if is_head:
            assert not built_in_gpus(machine) and "guestAccelerators" not in body
            assert spec["resources"] == {"CPU": 0}

        # Labels: Ray's tags plus the billing labels; scopes: storage everywhere, compute on the head only.
        assert body["labels"]["ray-cluster-name"] == config["cluster_name"]
        assert body["labels"]["raytrain-spot-pricing"] == labels[PRICING_LABEL]
        assert labels[NODE_TYPE_LABEL] == node_type
        scopes = body["serviceAccounts"][0]["scopes"]
        assert STORAGE_SCOPE in scopes
        assert (COMPUTE_SCOPE in scopes) == is_head
        assert not any(s.endswith("/cloud-platform") for s in scopes)


@pytest.mark.parametrize("path", GCP_FILES, ids=names(GCP_FILES))
def test_hybrid_files_keep_a_fixed_on_demand_fallback_and_all_spot_files_have_none(path):
    config = filled(path)
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    on_demand = [t for t in workers.values() if t["labels"][PRICING_LABEL] == "on_demand"]
    spot = [t for t in workers.values() if t["labels"][PRICING_LABEL] == "spot"]
    assert spot
    all_spot = os.path.basename(path) in ("gcp-spot-h100.yaml", "gcp-spot-t4.yaml")
    assert (on_demand == []) == all_spot
    for fallback in on_demand:
        assert fallback["min_workers"] == fallback["max_workers"] >= 1
    assert config["max_workers"] == sum(t["max_workers"] for t in workers.values())


@pytest.mark.parametrize("path", GCP_FILES, ids=names(GCP_FILES))
def test_setup_installs_torch_then_this_package_version_and_starts_watcher_and_jupyter_on_loopback(path):
    config = filled(path)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert version == raytrain_spot.__version__
    wheel = f'"$HOME/raytrain-spot/dist/raytrain_spot-{version}-py3-none-any.whl[hf]"'
    assert config["file_mounts"]["~/raytrain-spot/dist"] == "./dist"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not any("conf" in target for target in config["file_mounts"])  # the wheel holds the configs
    # Token authentication: the token is private on every node, and every shell and Ray process uses it.
    assert "chmod 700 ~/.ray && chmod 600 ~/.ray/auth_token" in config["setup_commands"]
    assert any("echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in c for c in config["setup_commands"])
    head_processes = [c for c in config["head_start_ray_commands"] if "ray start" in c or "jupyter lab" in c]
    assert len(head_processes) == 2 and all("RAY_AUTH_MODE=token" in c for c in head_processes)
    # A worker's Ray node and watcher run as services (tests/test_vm_shutdown.py): the token mode is theirs.
    worker = node_start(config["worker_start_ray_commands"])
    assert worker.ray.environment["RAY_AUTH_MODE"] == worker.watcher.environment["RAY_AUTH_MODE"] == "token"

    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        torch_at = next(i for i, c in enumerate(commands) if '"torch==' in c)
        package_at = next(i for i, c in enumerate(commands) if wheel in c)
        assert torch_at < package_at
    assert "whl/cpu" in next(c for c in config["head_setup_commands"] if '"torch==' in c)
    assert "whl/cu126" in next(c for c in config["worker_setup_commands"] if '"torch==' in c)
    assert config["worker_setup_commands"][-1] == "python -m raytrain_spot.cluster.gpu_setup_check --expect-gpus 1"

    worker_start = config["worker_start_ray_commands"]
    ray_start_at = next(i for i, c in enumerate(worker_start) if "start --block --address=$RAY_HEAD_IP:6379" in c)
    watcher_at = next(i for i, c in enumerate(worker_start) if "-m raytrain_spot.preemption.watcher --margin-s 5" in c)
    assert ray_start_at < watcher_at
    assert worker.watcher.in_service and worker.watcher.environment["RAY_ADDRESS"] == "$RAY_HEAD_IP:6379"

    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "jupyter lab --ip=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert 'JUPYTER_TOKEN="$(cat ~/.raytrain-spot/jupyter_token)"' in head_start
    assert "token_urlsafe" in " ".join(config["head_setup_commands"])


def test_local_yaml_mirrors_the_gcp_node_types_on_loopback():
    local, gcp = load(LOCAL_YAML), filled(MAIN_YAML)
    assert local["provider"]["module"] == "raytrain_spot.cluster.local_provider.LocalMultiNodeProvider"
    assert {n: t["labels"] for n, t in local["available_node_types"].items()} == {
        n: t["labels"] for n, t in gcp["available_node_types"].items()}
    assert local["available_node_types"]["head"]["resources"] == {"CPU": 0}
    head_start = " ".join(local["head_start_ray_commands"])
    assert "--node-ip-address=127.0.0.1" in head_start and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in head_start
    port = re.search(r"--port=(\d+)", head_start).group(1)
    assert local["provider"]["gcs_address"] == f"127.0.0.1:{port}"


# -- refusals -------------------------------------------------------------------------------------
def spot_head(c):
    c["available_node_types"]["head"]["node_config"]["scheduling"] = {
        "provisioningModel": "SPOT", "instanceTerminationAction": "DELETE", "onHostMaintenance": "TERMINATE"}


def list_scheduling(c):
    c["available_node_types"]["gpu-spot"]["node_config"]["scheduling"] = [{"provisioningModel": "SPOT"}]


def fallback_made_spot(c):
    c["available_node_types"]["gpu-on-demand"]["node_config"]["scheduling"] = dict(
        c["available_node_types"]["gpu-spot"]["node_config"]["scheduling"])


def no_termination_action(c):
    del c["available_node_types"]["gpu-spot"]["node_config"]["scheduling"]["instanceTerminationAction"]


def stop_on_preemption(c):
    c["available_node_types"]["gpu-spot"]["node_config"]["scheduling"]["instanceTerminationAction"] = "STOP"


def live_migrating_gpu(c):
    c["available_node_types"]["gpu-on-demand"]["node_config"]["scheduling"]["onHostMaintenance"] = "MIGRATE"


def accelerators_on_a2(c):
    c["available_node_types"]["gpu-spot"]["node_config"]["guestAccelerators"] = [
        {"acceleratorType": "nvidia-tesla-a100", "acceleratorCount": 1}]


def accelerators_on_n2(c):
    node_config = c["available_node_types"]["gpu-spot"]["node_config"]
    node_config["machineType"] = "n2-standard-8"
    node_config["guestAccelerators"] = [{"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 1}]


def head_with_gpus(c):
    c["available_node_types"]["head"]["resources"] = {"CPU": 0, "GPU": 1}


def head_with_cpus(c):
    c["available_node_types"]["head"]["resources"] = {"CPU": 8}


def growing_fallback(c):
    c["available_node_types"]["gpu-on-demand"].update(min_workers=0, max_workers=2)


def disk_in_other_zone(c):
    c["available_node_types"]["gpu-spot"]["node_config"]["disks"][0]["initializeParams"]["diskType"] = \
        "zones/us-central1-b/diskTypes/pd-balanced"


def no_watcher(c):
    c["worker_start_ray_commands"] = [cmd for cmd in c["worker_start_ray_commands"] if "watcher" not in cmd]


def no_token_mount(c):
    del c["file_mounts"]["~/.ray/auth_token"]


def worker_without_token_mode(c):
    c["worker_start_ray_commands"] = [cmd.replace("RAY_AUTH_MODE=token ", "") for cmd in c["worker_start_ray_commands"]]


def h100_on_demand(c):
    c["available_node_types"]["gpu-on-demand"]["node_config"]["machineType"] = "a3-highgpu-1g"


def wrong_gpu_count(c):
    c["available_node_types"]["gpu-spot"]["resources"]["GPU"] = 2


def wrong_type_label(c):
    c["available_node_types"]["gpu-spot"]["labels"]["raytrain-spot/node-type"] = "workers"


def torch_from_pypi(c):
    """PyPI's torch 2.13.0 is the CUDA 13.0 build: the images' 570 driver cannot run it."""
    c["worker_setup_commands"] = [cmd.replace(" --index-url https://download.pytorch.org/whl/cu126", "")
                                  for cmd in c["worker_setup_commands"]]


def cpu_torch_on_gpu_workers(c):
    c["worker_setup_commands"] = [cmd.replace("whl/cu126", "whl/cpu") for cmd in c["worker_setup_commands"]]


def image_without_driver(c):
    c["available_node_types"]["gpu-spot"]["node_config"]["disks"][0]["initializeParams"]["sourceImage"] = \
        "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"


def no_gpu_check(c):
    c["worker_setup_commands"] = [cmd for cmd in c["worker_setup_commands"] if "gpu_setup_check" not in cmd]


def gpu_check_for_two(c):
    c["worker_setup_commands"] = [cmd.replace("--expect-gpus 1", "--expect-gpus 2")
                                  for cmd in c["worker_setup_commands"]]


def head_without_hf(c):
    c["head_setup_commands"] = [cmd.replace(".whl[hf]", ".whl") for cmd in c["head_setup_commands"]]


def workers_without_hf(c):
    c["worker_setup_commands"] = [cmd.replace(".whl[hf]", ".whl") for cmd in c["worker_setup_commands"]]


def wheel_under_tmp(c):
    c["file_mounts"]["/tmp/raytrain-spot-dist"] = c["file_mounts"].pop("~/raytrain-spot/dist")


@pytest.mark.parametrize("mistake, node_type, key", [
    (torch_from_pypi, "gpu-spot", "worker_setup_commands"),
    (torch_from_pypi, "gpu-on-demand", "worker_setup_commands"),
    (cpu_torch_on_gpu_workers, "gpu-spot", "worker_setup_commands"),
    (image_without_driver, "gpu-spot", "node_config.disks[0].initializeParams.sourceImage"),
    (no_gpu_check, "gpu-spot", "worker_setup_commands"),
    (gpu_check_for_two, "gpu-on-demand", "worker_setup_commands"),
    (head_without_hf, "head", "head_setup_commands"),
    (workers_without_hf, "gpu-spot", "worker_setup_commands"),
    (wheel_under_tmp, "cluster", "file_mounts./tmp/raytrain-spot-dist"),
    (spot_head, "head", "node_config.scheduling"),
    (list_scheduling, "gpu-spot", "node_config.scheduling"),
    (fallback_made_spot, "gpu-on-demand", "node_config.scheduling.provisioningModel"),
    (no_termination_action, "gpu-spot", "node_config.scheduling.instanceTerminationAction"),
    (stop_on_preemption, "gpu-spot", "node_config.scheduling.instanceTerminationAction"),
    (live_migrating_gpu, "gpu-on-demand", "node_config.scheduling.onHostMaintenance"),
    (accelerators_on_a2, "gpu-spot", "node_config.guestAccelerators"),
    (accelerators_on_n2, "gpu-spot", "node_config.guestAccelerators"),
    (head_with_gpus, "head", "resources.GPU"),
    (head_with_cpus, "head", "resources.CPU"),
    (growing_fallback, "gpu-on-demand", "min_workers/max_workers"),
    (disk_in_other_zone, "gpu-spot", "node_config.disks[0].initializeParams.diskType"),
    (no_watcher, "cluster", "worker_start_ray_commands"),
    (no_token_mount, "cluster", "file_mounts"),
    (worker_without_token_mode, "cluster", "worker_start_ray_commands"),
    (h100_on_demand, "gpu-on-demand", "node_config.machineType"),
    (wrong_gpu_count, "gpu-spot", "resources.GPU"),
    (wrong_type_label, "gpu-spot", "labels.raytrain-spot/node-type"),
])
def test_review_refuses_the_mistake_naming_node_type_key_and_fix(mistake, node_type, key):
    config = raw(MAIN_YAML)
    mistake(config)
    problems = cluster_check.review(prepare(config))
    assert any(p.node_type == node_type and p.key == key and p.fix for p in problems), [str(p) for p in problems]


def test_the_emulated_gce_rejects_what_the_review_refuses():
    # The two must agree: a list-form scheduling is refused by the review and by the API.
    config = raw(MAIN_YAML)
    list_scheduling(config)
    prepared = prepare(config)
    with ComputeEngineEmulator(config["provider"]["project_id"]) as api:
        compute = GCPCompute(build_compute_client(AnonymousCredentials(), api.endpoint), api.project,
                             config["provider"]["availability_zone"], "c")
        with pytest.raises(Exception, match="scheduling"):
            compute.create_instance(prepared["available_node_types"]["gpu-spot"]["node_config"],
                                    {TAG_RAY_NODE_NAME: "ray-c-worker"})


def test_ray_schema_errors_are_reported_as_config_errors():
    config = raw(MAIN_YAML)
    config["available_node_types"]["gpu-spot"]["max_workers"] = "many"
    with pytest.raises(ClusterConfigError, match="max_workers"):
        prepare(config)


def test_summary_prices_every_type_with_the_injected_lookup():
    prices = {("n2-standard-8", "on_demand"): 0.5, ("a2-highgpu-1g", "spot"): 0.5, ("a2-highgpu-1g", "on_demand"): 1.0,
              ("nvidia-tesla-a100", "spot"): 1.5, ("nvidia-tesla-a100", "on_demand"): 4.0}  # host + its built-in GPU
    asked = []

    def lookup(item, pricing, region):
        asked.append(region)
        return prices.get((item, pricing))

    config = filled(MAIN_YAML)
    summary = summarize(config, lookup)
    types = config["available_node_types"]
    expected = 0.5 + types["gpu-spot"]["max_workers"] * 2.0 + types["gpu-on-demand"]["max_workers"] * 5.0
    assert summary.cost_per_hour("max") == (pytest.approx(expected), [])
    assert set(asked) == {config["provider"]["region"]}
    text = format_summary(summary)
    assert "hybrid" in text and f"{expected:.2f}" in text and "1x A100 40GB" in text


def test_attached_gpus_are_priced_per_gpu_and_unknown_prices_are_named():
    config = filled(os.path.join(ROOT, "cluster", "gcp-spot-t4.yaml"))
    summary = summarize(config, lambda item, pricing, region: {"n1-standard-8": 1.0,
                                                                             "nvidia-tesla-t4": 0.25}.get(item))
    worker = next(t for t in summary.node_types if t.name == "gpu-spot")
    assert worker.price_per_hour == pytest.approx(1.25)
    total, unpriced = summary.cost_per_hour("max")
    assert unpriced == ["head"] and total == pytest.approx(worker.max_workers * 1.25)


def test_the_default_prices_are_the_ledgers_catalog_and_a_price_file_overrides_them(tmp_path):
    from raytrain_spot.cost.pricing import PriceCatalog

    config = filled(MAIN_YAML)
    catalog = PriceCatalog.load()
    spot = next(t for t in summarize(config).node_types if t.name == "gpu-spot")
    expected = (catalog.machine_price("a2-highgpu-1g", "spot").usd_per_hour
                + catalog.gpu_price("nvidia-tesla-a100", "spot").usd_per_hour)
    assert spot.price_per_hour == pytest.approx(expected)
    own = tmp_path / "prices.yaml"
    own.write_text("accelerators:\n  nvidia-tesla-a100:\n    prices:\n      us-central1:\n        spot: "
                   "{usd: 9.0, date: '2026-12-01', source: mine}\n")
    lookup = catalog_lookup(PriceCatalog.load(str(own)))
    spot = next(t for t in summarize(config, lookup).node_types if t.name == "gpu-spot")
    assert spot.price_per_hour == pytest.approx(catalog.machine_price("a2-highgpu-1g", "spot").usd_per_hour + 9.0)


def test_command_line_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(raw(MAIN_YAML)))
    assert cluster_check.main([str(good)]) == 1
    assert "auth_token does not exist" in capsys.readouterr().err, "ray up would fail to copy the token"

    assert cluster_check.main(["--new-token"]) == 0
    token = tmp_path / ".ray" / "auth_token"
    secret = token.read_text()
    assert len(secret) == 64 and secret not in capsys.readouterr().out, "the token is never printed"
    assert (token.stat().st_mode & 0o777, (tmp_path / ".ray").stat().st_mode & 0o777) == (0o600, 0o700)
    assert cluster_check.main(["--new-token"]) == 0 and token.read_text() == secret, "an existing token is kept"
    assert cluster_check.main([str(good)]) == 0
    assert "ok" in capsys.readouterr().out

    token.chmod(0o644)
    assert cluster_check.main([str(good)]) == 1
    assert "readable by others (mode 644)" in capsys.readouterr().err
    token.chmod(0o600)

    assert cluster_check.main([MAIN_YAML]) == 1  # as shipped: the project is still to fill in
    assert "placeholder" in capsys.readouterr().err

    broken = copy.deepcopy(raw(MAIN_YAML))
    spot_head(broken)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(broken))
    assert cluster_check.main([str(bad)]) == 1
    assert "head: node_config.scheduling: makes the head Spot" in capsys.readouterr().err

    unreadable = tmp_path / "unreadable.yaml"
    unreadable.write_text("provider: [unclosed")
    assert cluster_check.main([str(unreadable)]) == 2


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "cluster", "gcp-spot*.yaml"))))
def test_worker_raylets_preload_the_training_stack(path):
    """Warm standbys (standby.py) need the preload on every worker node, with the package's own list."""
    assert node_start(raw(path)["worker_start_ray_commands"]).ray.environment[PRELOAD_ENV] == ",".join(PRELOAD_MODULES)
    assert PRELOAD_ENV not in " ".join(raw(path)["head_start_ray_commands"])


# -- warnings: what a new project meets that the YAML cannot settle ---------------------------------
def warning_keys(config: dict) -> set:
    return {(w.node_type, w.key) for w in warnings(prepare(config))}


def test_nine_200_gb_balanced_disks_warn_about_the_ssd_quota_and_smaller_disks_do_not():
    config = raw(MAIN_YAML)
    [ssd] = [w for w in warnings(prepare(config))
             if w.key == "available_node_types.*.node_config.disks"]
    assert "1800 GB" in ssd.problem and "SSD_TOTAL_GB" in ssd.problem and '--flatten="quotas[]"' in ssd.fix
    for node_type in config["available_node_types"].values():
        node_type["node_config"]["disks"][0]["initializeParams"]["diskSizeGb"] = 50
    assert ("cluster", "available_node_types.*.node_config.disks") not in warning_keys(config)
    config = raw(MAIN_YAML)
    for node_type in config["available_node_types"].values():  # pd-standard counts against another quota
        node_type["node_config"]["disks"][0]["initializeParams"]["diskType"] = "zones/us-central1-a/diskTypes/pd-standard"
    assert ("cluster", "available_node_types.*.node_config.disks") not in warning_keys(config)


def test_nodes_without_network_interfaces_warn_about_the_subnet_and_external_addresses():
    config = raw(MAIN_YAML)
    [subnet] = [w for w in warnings(prepare(config))
                if w.key == "node_config.networkInterfaces"]
    assert "KeyError: 'items'" in subnet.problem and "9 VMs" in subnet.problem
    assert "subnets list --filter=region:us-central1" in subnet.fix and "IN_USE_ADDRESSES >= 9" in subnet.fix
    for node_type in config["available_node_types"].values():
        node_type["node_config"]["networkInterfaces"] = [
            {"subnetwork": "regions/us-central1/subnetworks/default", "accessConfigs": []}]
    assert ("cluster", "node_config.networkInterfaces") not in warning_keys(config)


@pytest.mark.parametrize("path", GCP_FILES, ids=names(GCP_FILES))
def test_every_gcp_node_carries_the_network_tag_the_firewall_rule_targets(path):
    config = raw(path)
    assert ("cluster", "node_config.tags") not in warning_keys(config)
    del config["available_node_types"]["head"]["node_config"]["tags"]
    assert ("cluster", "node_config.tags") in warning_keys(config)


def test_warnings_do_not_change_the_exit_status(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cluster_check.main(["--new-token"]) == 0
    path = tmp_path / "gcp.yaml"
    with open(MAIN_YAML) as f:
        path.write_text(f.read().replace("FILL-IN-project-id", PROJECT))
    assert cluster_check.main([str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: cluster: available_node_types.*.node_config.disks" in err and "problem:" not in err


def test_spot_vms_that_delete_themselves_on_ray_own_gcp_provider_are_refused():
    config = raw(MAIN_YAML)
    config["provider"] = dict(config["provider"], type="gcp")
    del config["provider"]["module"]
    problems = cluster_check.review(prepare(config))
    [problem] = [p for p in problems if (p.node_type, p.key) == ("provider", "type")]
    assert "gpu-spot" in problem.problem and "SpotGCPNodeProvider" in problem.fix
    assert summarize(filled(MAIN_YAML)).provider == "SpotGCPNodeProvider"


def test_spread_placement_warns_with_the_inter_zone_price_and_pack_does_not():
    path = os.path.join(ROOT, "cluster", "gcp-spot-multizone.yaml")
    config = raw(path)
    config["provider"]["zone_placement"] = "spread"
    [spread] = [w for w in warnings(prepare(config)) if w.key == "provider.zone_placement"]
    assert "14 GiB per step per GiB of gradients" in spread.problem and "$0.14" in spread.problem
    config["provider"]["zone_placement"] = "pack"
    assert ("cluster", "provider.zone_placement") not in warning_keys(config)


def test_the_summary_shows_each_gpu_types_driver_and_torch_build():
    config = raw(MAIN_YAML)
    rows = {t.name: t.gpu_stack for t in summarize(prepare(config), lambda *a: 1.0).node_types}
    assert rows["head"] is None
    assert rows["gpu-spot"].startswith("NVIDIA driver 570, torch 2.13.0 as the cu126 build") and "; runs" in rows["gpu-spot"]
    torch_from_pypi(config)
    stack = summarize(prepare(config), lambda *a: 1.0).node_types[1].gpu_stack
    assert "PyPI's default build (CUDA 13.0); does NOT run" in stack
