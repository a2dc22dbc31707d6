"""`ray up cluster/local.yaml`: the local provider's parts, and the whole flow with the main command.

The slow test really runs `ray up`, trains on the cluster with `cluster=existing`, and
`ray down`s it, checking that no process of the cluster is left. Every process it starts
carries the cluster's marker, so nothing else on the machine is touched.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import ray
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FakeMultiNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    TAG_RAY_LAUNCH_CONFIG,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from raytrain_spot.cluster.local_provider import (
    CLUSTER_ENV,
    LocalCommandRunner,
    LocalMultiNodeProvider,
    cluster_processes,
    stop_cluster,
    worker_environment,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_YAML = os.path.join(ROOT, "cluster", "local.yaml")
CLUSTER_NAME = "raytrain-spot-local"  # cluster/local.yaml's cluster_name
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def test_ray_fake_provider_is_the_version_this_subclass_was_written_against():
    assert ray.__version__ == "2.60.0"
    assert FAKE_HEAD_NODE_ID.endswith("00000")
    assert list(inspect.signature(FakeMultiNodeProvider._create_node_with_resources_and_labels).parameters) == [
        "self", "node_config", "tags", "count", "resources", "labels"]
    source = inspect.getsource(FakeMultiNodeProvider.__init__)
    assert "self._nodes = {" in source and "self._head_node_id" in source and "RAY_FAKE_CLUSTER" in source
    assert "return node_id" in inspect.getsource(FakeMultiNodeProvider._get_ip)
    # The reason the subclass exists: the wheel has no defaults file for type fake_multinode.
    import ray.autoscaler._private.fake_multi_node as fake

    assert not os.path.exists(os.path.join(os.path.dirname(fake.__file__), "example.yaml"))


@pytest.fixture
def provider_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")
    return {"type": "external", "module": "raytrain_spot.cluster.local_provider.LocalMultiNodeProvider",
            "state_dir": str(tmp_path), "gcs_address": "127.0.0.1:1"}


def test_the_head_ray_up_creates_is_seen_by_every_later_provider_until_terminated(provider_config):
    name = f"state-test-{os.getpid()}"
    up = LocalMultiNodeProvider(provider_config, name)
    assert up.non_terminated_nodes({}) == []

    up.create_node({}, {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: "head",
                        TAG_RAY_LAUNCH_CONFIG: "hash-1"}, 1)
    up.set_node_tags(FAKE_HEAD_NODE_ID, {TAG_RAY_NODE_STATUS: "up-to-date"})

    autoscaler = LocalMultiNodeProvider(provider_config, name)  # another process, same machine
    assert autoscaler.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD}) == [FAKE_HEAD_NODE_ID]
    assert autoscaler.node_tags(FAKE_HEAD_NODE_ID)[TAG_RAY_LAUNCH_CONFIG] == "hash-1"
    assert autoscaler.node_tags(FAKE_HEAD_NODE_ID)[TAG_RAY_NODE_STATUS] == "up-to-date"
    assert autoscaler.internal_ip(FAKE_HEAD_NODE_ID) == "127.0.0.1"

    LocalMultiNodeProvider(provider_config, name).terminate_node(FAKE_HEAD_NODE_ID)
    assert autoscaler.non_terminated_nodes({}) == []
    with pytest.raises(ValueError, match="head only"):
        autoscaler.create_node({}, {TAG_RAY_NODE_KIND: "worker"}, 1)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stopping_a_cluster_ends_its_processes_and_no_others():
    name = f"stop-test-{os.getpid()}"
    ours = subprocess.Popen(["sleep", "60"], env=dict(os.environ, **{CLUSTER_ENV: name}))
    other_cluster = subprocess.Popen(["sleep", "60"], env=dict(os.environ, **{CLUSTER_ENV: name + "-other"}))
    unmarked = subprocess.Popen(["sleep", "60"])
    try:
        assert [p.pid for p in cluster_processes(name)] == [ours.pid]
        assert stop_cluster(name, grace_s=5) == 1
        assert not running(ours.pid), "stop_cluster returns once its processes are gone"
        assert other_cluster.poll() is None and unmarked.poll() is None
    finally:
        for process in (ours, other_cluster, unmarked):
            process.kill()
            process.wait()


def test_the_runner_runs_commands_locally_in_this_environment_and_scopes_ray_stop(tmp_path):
    name = f"runner-test-{os.getpid()}"
    runner = LocalCommandRunner("test: ", name)
    output = runner.run('echo "$RAYTRAIN_SPOT_LOCAL_CLUSTER $GREETING"; command -v python',
                        with_output=True, environment_variables={"GREETING": "hello"})
    marker, python = output.split("\n")[0], output.split("\n")[1]
    assert marker == f'{name} "hello"'
    assert os.path.dirname(python) == os.path.dirname(sys.executable)

    sleeper = subprocess.Popen(["sleep", "60"], env=dict(os.environ, **{CLUSTER_ENV: name}))
    try:
        assert runner.run("ray stop") == ""  # the cluster's own processes only
        assert not running(sleeper.pid), "the runner's ray stop ended the cluster's process before returning"
    finally:
        sleeper.kill()
        sleeper.wait()

    source = tmp_path / "config.json"
    source.write_text("{}")
    runner.run_rsync_up(str(source), str(tmp_path / "copied" / "config.json"))
    assert (tmp_path / "copied" / "config.json").read_text() == "{}"


def test_worker_environment_replaces_the_head_overrides_and_restores_them(monkeypatch):
    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", '{"CPU": 0}')
    monkeypatch.setenv("RAY_OVERRIDE_LABELS", '{"raytrain-spot/node-type": "head"}')
    monkeypatch.setenv("RAY_NODE_TYPE_NAME", "head")
    with worker_environment("gpu-spot"):
        assert "RAY_OVERRIDE_RESOURCES" not in os.environ and "RAY_OVERRIDE_LABELS" not in os.environ
        assert os.environ["RAY_NODE_TYPE_NAME"] == "gpu-spot"
    assert os.environ["RAY_OVERRIDE_RESOURCES"] == '{"CPU": 0}' and os.environ["RAY_NODE_TYPE_NAME"] == "head"


# -- the whole flow ------------------------------------------------------------------------------
def readme_local_cluster_commands() -> list:
    """The README's lines for the local cluster, exactly as a user copies them."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = readme.split("<!-- local-cluster-commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_gives_up_train_down():
    commands = readme_local_cluster_commands()
    assert [c.split()[:2] for c in commands] == [["ray", "up"], ["python", "-m"], ["ray", "down"]]


@pytest.mark.slow
@pytest.mark.cluster
def test_the_readmes_local_cluster_commands_work_as_written():
    # A user's shell: none of the Ray settings the test process runs with.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # the venv, activated
    up, train, down = readme_local_cluster_commands()
    state_file = os.path.join(tempfile.gettempdir(), "raytrain-spot-local", f"{CLUSTER_NAME}.json")
    assert not cluster_processes(CLUSTER_NAME), "a local cluster from elsewhere is running; ray down it first"
    outputs = os.path.join(ROOT, "outputs")
    before = set(os.listdir(outputs)) if os.path.isdir(outputs) else set()
    try:
        started = time.time()
        result = subprocess.run(up, shell=True, env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert os.path.exists(state_file)

        result = subprocess.run(train, shell=True, env=env, cwd=ROOT, timeout=900, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        run_dir = next(os.path.join(outputs, d) for d in set(os.listdir(outputs)) - before
                       if os.path.exists(os.path.join(outputs, d, "summary.json")))
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        assert summary["status"] == "finished" and summary["world_sizes"][-1] == 3
        events = [json.loads(line) for line in open(os.path.join(run_dir, "events.jsonl"))]
        added = [e for e in events if e["ev"] == "add"]
        assert sorted(e["node_type"] for e in added) == ["gpu-on-demand", "gpu-spot", "gpu-spot", "head"]
        print(f"ray up + training: {time.time() - started:.0f}s")
    finally:
        result = subprocess.run(down, shell=True, env=env, cwd=ROOT, timeout=180, capture_output=True, text=True)
        left = cluster_processes(CLUSTER_NAME)
        if left:  # leave nothing behind even when `ray down` failed
            stop_cluster(CLUSTER_NAME)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert left == []
    assert not os.path.exists(state_file)
