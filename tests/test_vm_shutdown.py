"""GCE's shutdown of a preempted Spot VM as the simulator models it: the soft-off signals the node's
processes where its start commands put them, the power-off follows. The whole run through it is in
tests/test_chaos_e2e.py (the soft-off tests)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from raytrain_spot.config.errors import ConfigError
from raytrain_spot.config.schema import load_config
from raytrain_spot.observe.records import SoftOff
from raytrain_spot.settings import checked_task
from raytrain_spot.simulator import chaos
from raytrain_spot.simulator.shutdown import (GCP_WORKER_START_COMMANDS, SESSION_SCOPE, StartCommandsError,
                                              node_start, shutdown_times)
from tests.conftest import REPO
from tests.test_chaos_e2e import SSH_STARTED_NODE

GCP_FILES = sorted(glob.glob(os.path.join(REPO, "cluster", "gcp-*.yaml")))


# -- the start commands ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", GCP_FILES, ids=os.path.basename)
def test_every_gcp_yaml_starts_workers_as_the_simulator_models_them(path):
    with open(path) as f:
        commands = yaml.safe_load(f)["worker_start_ray_commands"]
    assert commands == list(GCP_WORKER_START_COMMANDS)
    start = node_start(commands)
    assert start.ray.main_only and start.ray.command[1:3] == ("start", "--block")
    assert start.ray.stop_timeout_s > 30, "systemd must not SIGKILL Ray's node before GCE's power-off"
    assert start.ray_drain_timeout_s == 25, "Ray's drain on SIGTERM ends 5 s before the power-off"
    assert {"RAY_OVERRIDE_RESOURCES", "RAY_OVERRIDE_LABELS"} <= set(start.ray.environment), \
        "a service does not inherit the node type's resources and labels from `ray up`"
    assert start.watcher is not None and start.watcher.in_service and start.watcher.unit != start.ray.unit


def test_commands_run_over_ssh_leave_everything_in_the_session_scope():
    start = node_start(SSH_STARTED_NODE)
    assert start.ray.unit == start.watcher.unit == SESSION_SCOPE
    assert not start.ray.main_only and not start.watcher.main_only


@pytest.mark.parametrize("commands, says", [
    (["sudo systemd-run --unit=r -p KillMode=mixed ray start --address=h:6379"], "add --block"),
    (["ray stop"], "no Ray node"),
    (["ray start --address=a", "ray start --address=b"], "twice"),
    (["sudo systemd-run -p KillMode=gentle ray start --block"], "KillMode=gentle"),
    (["sudo systemd-run -p TimeoutStopSec=soon ray start --block"], "TimeoutStopSec"),
])
def test_start_commands_the_model_cannot_read_are_refused_with_the_fix(commands, says):
    with pytest.raises(StartCommandsError, match=says):
        node_start(commands)


def test_systemd_run_spellings():
    start = node_start(["systemd-run -u ray --property KillMode=process --property=TimeoutStopSec=2min "
                        "-E RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=7 /opt/venv/bin/ray start --block",
                        "systemd-run --scope -p KillMode=mixed python -m raytrain_spot.preemption.watcher"])
    assert (start.ray.unit, start.ray.kill_mode, start.ray.stop_timeout_s, start.ray_drain_timeout_s) == (
        "ray", "process", 120.0, 7.0)
    assert start.watcher.kill_mode == "control-group", "a scope has no main process to signal alone"


def test_chaos_node_start_names_a_yaml_the_model_reads(compose, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"worker_start_ray_commands": ["systemd-run ray start"]}))
    with pytest.raises(ConfigError, match="chaos.node_start: .*add --block"):
        checked_task(load_config(compose("+experiment=vlm", "+chaos=events", f"chaos.node_start={bad}")))
    with pytest.raises(ConfigError, match="chaos.node_start: .*does not exist"):
        load_config(compose("+experiment=vlm", "+chaos=events", f"chaos.node_start={tmp_path}/none.yaml"))


def test_the_soft_off_comes_30_s_before_the_power_off_and_never_before_the_notice():
    assert shutdown_times(30) == shutdown_times(30.0) and shutdown_times(30).soft_off_s == 0
    assert (shutdown_times(150).soft_off_s, shutdown_times(150).power_off_s) == (120, 150)
    assert shutdown_times(6).soft_off_s == 0 and shutdown_times(6).scale == pytest.approx(0.2)


# -- the soft-off on a virtual VM's real processes ------------------------------------------------
class ProcessInfo:
    def __init__(self, process):
        self.process = process


class VirtualNode:
    """A node whose Ray processes are a real parent and child (a raylet and a worker it started)."""

    def __init__(self, index: int):
        self.node_id = f"{index:056x}"
        code = ("import signal, subprocess, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                "print(child.pid, flush=True)\n"
                "time.sleep(600)\n")
        self.raylet = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        self.worker_pid = int(self.raylet.stdout.readline())
        self.all_processes = {"raylet": [ProcessInfo(self.raylet)]}

    def worker_alive(self) -> bool:
        try:
            with open(f"/proc/{self.worker_pid}/stat") as f:
                return f.read().split(") ")[1][0] != "Z"
        except FileNotFoundError:
            return False

    def close(self) -> None:
        for pid in (self.worker_pid, self.raylet.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.raylet.wait()


class VirtualCluster:
    address = "127.0.0.1:1"

    def __init__(self):
        self.workers = [VirtualNode(0)]
        self.removed = []

    def remove_worker_node(self, node):
        self.removed.append(node.node_id)
        node.close()


class Recorder:
    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(record)


def soft_off_of(compose, tmp_path, commands):
    """A simulator preempting the one node 2 simulated seconds in, with a 6 s notice; the soft-off ran."""
    cluster_yaml = tmp_path / "start.yaml"
    cluster_yaml.write_text(yaml.safe_dump({"worker_start_ray_commands": list(commands)}))
    cfg = load_config(compose("+experiment=vlm", "+chaos=events", "chaos.notice_s=6", "chaos.margin_s=1",
                              "chaos.watchers=false", f"chaos.node_start={cluster_yaml}",
                              "chaos.events=[{action:preempt,node:0,at_s:2}]")).chaos
    now, recorder, cluster = {"t": 1000.0}, Recorder(), VirtualCluster()
    simulator = chaos.SpotSimulator(cfg, cluster, recorder, current_step=lambda: 1, on_kill=lambda *_: None,
                                    log_dir=str(tmp_path / "logs"), clock=lambda: now["t"],
                                    ray_reports_dead=lambda node_id: True)
    simulator.tick()
    now["t"] += 2
    simulator.tick()
    return simulator, cluster.workers[0], recorder, now


def wait_for(condition, timeout_s=5.0) -> bool:
    deadline = time.time() + timeout_s
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def test_ssh_started_the_soft_off_sigterms_every_process_of_rays_node(compose, tmp_path):
    simulator, node, recorder, _ = soft_off_of(compose, tmp_path, SSH_STARTED_NODE)
    try:
        assert [e.sigterm for e in recorder.records if isinstance(e, SoftOff)] == ["every process of Ray's node"]
        assert node.raylet.wait(timeout=5) == 143, "the raylet got SIGTERM at the soft-off"
        assert wait_for(lambda: not node.worker_alive()), "and so did the worker it started"
    finally:
        simulator.close()
        node.close()


def test_as_a_service_only_ray_start_block_hears_the_soft_off_and_stops_the_node_after_its_drain(
        compose, tmp_path):
    simulator, node, recorder, now = soft_off_of(compose, tmp_path, GCP_WORKER_START_COMMANDS)
    try:
        [soft_off] = [e for e in recorder.records if isinstance(e, SoftOff)]
        assert soft_off.sigterm == "ray start --block"
        signalled = time.time()
        service = simulator.ray_services[0]
        time.sleep(1.0)
        assert node.raylet.poll() is None and node.worker_alive(), "KillMode=mixed: the node's processes live on"
        # The 25 s drain timeout, compressed like the 6 s window: 5 s, with no GCS here to drain through.
        assert node.raylet.wait(timeout=15) == 143, "after its drain timeout Ray stops the node's processes"
        assert 4.5 < time.time() - signalled and wait_for(lambda: not node.worker_alive())
        assert service.wait(timeout=5) == 1, "and exits as Ray's handler does"
    finally:
        simulator.close()
        node.close()


def test_a_raylet_that_finishes_its_drain_ends_the_wait(compose, tmp_path):
    simulator, node, _, _ = soft_off_of(compose, tmp_path, GCP_WORKER_START_COMMANDS)
    try:
        os.kill(node.worker_pid, signal.SIGKILL)
        node.raylet.terminate()  # a drained, idle raylet exits by itself
        node.raylet.wait(timeout=5)
        assert simulator.ray_services[0].wait(timeout=3) == 1, "no wait left once the raylet is gone"
    finally:
        simulator.close()
        node.close()


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process ("T": stopped), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0]
    except FileNotFoundError:
        return "gone"


def test_the_power_off_freezes_every_process_of_the_vm_until_ray_declares_the_node_dead(compose, tmp_path):
    """A VM that loses power closes no socket: its peers hear nothing, not a reset, so their
    collectives with it hang until Ray's health checks give up on the node. A SIGKILL would have
    the kernel close every socket at once (a reset to every peer), which GCE never does."""
    cfg = load_config(compose("+experiment=vlm", "+chaos=events", "chaos.watchers=false",
                              "chaos.events=[{action:preempt,node:0,at_s:2,no_notice:true}]")).chaos
    now, cluster, killed, dead = {"t": 1000.0}, VirtualCluster(), [], set()
    node = cluster.workers[0]
    simulator = chaos.SpotSimulator(cfg, cluster, Recorder(), current_step=lambda: 1,
                                    on_kill=lambda node_id, noticed: killed.append(node_id),
                                    log_dir=str(tmp_path / "logs"), clock=lambda: now["t"],
                                    ray_reports_dead=lambda node_id: node_id in dead)
    try:
        simulator.tick()
        now["t"] += 2
        simulator.tick()
        assert killed == [node.node_id], "the loss is logged at the power-off"
        assert wait_for(lambda: {process_state(node.raylet.pid), process_state(node.worker_pid)} == {"T"}), \
            "the raylet and the worker it started are frozen, not killed"
        now["t"] += 30
        simulator.tick()
        assert cluster.removed == [] and process_state(node.worker_pid) == "T", "Ray still lists it alive"
        dead.add(node.node_id)
        simulator.tick()
        assert cluster.removed == [node.node_id] and wait_for(lambda: not node.worker_alive())
    finally:
        simulator.close()
        node.close()


# -- the cluster check ------------------------------------------------------------------------------
def test_the_cluster_check_refuses_a_ray_node_the_soft_off_would_kill():
    from raytrain_spot.cluster import check as cluster_check
    from raytrain_spot.cluster.cluster_yaml import prepare

    with open(os.path.join(REPO, "cluster", "gcp-spot.yaml")) as f:
        config = yaml.safe_load(f.read().replace("FILL-IN-project-id", "my-project"))
    assert cluster_check.review(prepare(config)) == []
    for commands, where in ((SSH_STARTED_NODE, "in the SSH session"),
                            ([c.replace("KillMode=mixed", "KillMode=control-group") for c in GCP_WORKER_START_COMMANDS],
                             "KillMode=control-group")):
        config["worker_start_ray_commands"] = [c.replace("--notice-s 30", "--notice-s 150") for c in commands]
        [problem] = cluster_check.review(prepare(config))
        assert (problem.node_type, problem.key) == ("cluster", "worker_start_ray_commands")
        assert where in problem.problem and "soft-off" in problem.problem and "ray start --block" in problem.fix
