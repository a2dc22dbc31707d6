"""The GCP cluster's nodes, started here with the YAML's own commands, authenticate with the token
the YAML distributes, and the preemption watcher on a worker turns a metadata notice into a drain.

Two "VMs" share this machine: each gets its own HOME, which holds what `ray up` puts there
(the file mounts, the shell set-up of ``setup_commands``), and the environment Ray's node
updater gives its start commands (the node type's resources and labels, ``RAY_HEAD_IP``).
What one machine needs to host both, and nothing else, is changed in the commands:

* ``ray stop`` is left out: it would stop every Ray process of this user here (each "VM" starts clean);
* there is no systemd here: a worker's ``sudo systemd-run`` service runs as a background process with
  only the environment the unit sets (``--setenv``), its output in ``~/.raytrain-spot/<unit>.log``, and
  the ``systemctl`` lines that stop earlier services are left out (what the units do at a preemption's
  soft-off is the simulator's, tests/test_vm_shutdown.py);
* the fixed ports (6379, 8076, and Ray's default dashboard, client and agent ports) become free ones;
* ``--autoscaling-config`` is left out: there is no GCP autoscaler to run here;
* each "VM"'s network address is 127.0.0.1: Ray asks the OS which local address routes outwards (on
  GCE, the VM's NIC); a ``sitecustomize`` on the VMs' PYTHONPATH answers loopback instead. (Ray's
  own loopback switch, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, makes a worker's `ray start` refuse to run.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from raytrain_spot.cluster.cluster_yaml import load
from raytrain_spot.cluster.local_provider import CLUSTER_ENV, stop_cluster
from raytrain_spot.simulator.metadata_server import MetadataEmulator
from raytrain_spot.simulator.shutdown import NodeStart, node_start

pytestmark = pytest.mark.cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCP_YAML = os.path.join(ROOT, "cluster", "gcp-spot.yaml")
MARKER = f"gcp-token-auth-{os.getpid()}"
NOT_ON_THIS_MACHINE = ("apt-get", "venv")  # setup lines that install the VM image's Python

LOOPBACK_NIC = """
import ray._private.services as services
services.node_ip_address_from_perspective = lambda address=None: "127.0.0.1"
"""

NODES = """
import json, ray
from raytrain_spot._ray import GcsClient, GcsNodeInfo, draining_nodes
ray.init(address="{address}", logging_level="ERROR")
client = GcsClient(address="{address}")
draining = draining_nodes()
print(json.dumps([{{"id": node_id.hex(), "head": info.is_head_node, "draining": node_id.hex() in draining,
                   "state": GcsNodeInfo.GcsNodeState.Name(info.state),
                   "death": info.death_info.Reason.Name(info.death_info.reason)}}
                  for node_id, info in client.get_all_node_info().items()]))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _without_systemd(command: str, services: NodeStart, nic) -> str:
    """A ``sudo systemd-run`` service as a background process with the unit's environment alone."""
    unit = next((p for p in (services.ray, services.watcher) if p.in_service and f"--unit={p.unit} " in command), None)
    if unit is None:
        return command
    # Plus what a VM has without asking: its metadata server and network address (here, stand-ins).
    environment = {**unit.environment, CLUSTER_ENV: MARKER, "PYTHONPATH": str(nic),
                   "GCE_METADATA_HOST": "$GCE_METADATA_HOST"}
    program = " ".join(unit.command).replace("$HOME/venv/bin/", os.path.dirname(sys.executable) + "/")
    settings = " ".join(f'{key}="{value}"' for key, value in environment.items())
    log = f"~/.raytrain-spot/{unit.unit}.log"
    # The watcher finds its node by IP; here the head shares it, so it must not start before the worker
    # node has registered (on GCE it waits for its own IP to register).
    registered = "" if unit is services.watcher else \
        f" for i in $(seq 240); do grep -q 'Ray runtime started' {log} && break; sleep 0.5; done"
    return f"mkdir -p ~/.raytrain-spot; env -i {settings} nohup {program} > {log} 2>&1 < /dev/null &{registered}"


def _on_this_machine(command: str, ports: dict) -> str:
    command = command.replace("--port=6379", f"--port={ports['gcs']}").replace(
        "$RAY_HEAD_IP:6379", f"$RAY_HEAD_IP:{ports['gcs']}")
    command = command.replace("--object-manager-port=8076", f"--object-manager-port={_free_port()}")
    command = re.sub(r"\s--autoscaling-config=\S+", "", command)
    extra = f" --dashboard-agent-listen-port={_free_port()}"
    if "ray start --head" in command:
        extra += f" --dashboard-port={_free_port()} --ray-client-server-port={_free_port()}"
    return re.sub(r"\bray start\b", "ray start" + extra, command, count=1)


class Vm:
    """One node of the YAML's cluster: its HOME, its environment, its commands."""

    def __init__(self, root, name: str, node_type: dict, env: dict, nic):
        self.home = root / name
        self.home.mkdir()
        # The image's Python: what the skipped set-up lines (a venv, activated from ~/.bashrc) give a VM.
        (self.home / ".bashrc").write_text(f'export PATH="{os.path.dirname(sys.executable)}:$PATH"\n')
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                    "HOME": str(self.home),
                    CLUSTER_ENV: MARKER, "PYTHONPATH": str(nic),
                    "RAY_OVERRIDE_RESOURCES": json.dumps(node_type["resources"]),
                    "RAY_OVERRIDE_LABELS": json.dumps(node_type["labels"]), **env}

    def mount(self, file_mounts: dict, laptop_home) -> None:
        """What `ray up` copies from the laptop (files only: the wheel and conf are installed already here)."""
        for remote, local in file_mounts.items():
            source = os.path.expanduser(local).replace(os.path.expanduser("~"), str(laptop_home), 1)
            if os.path.isfile(source):
                target = os.path.join(str(self.home), remote[2:]) if remote.startswith("~/") else remote
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(source, target)

    def run(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # As Ray's SSH command runner runs it: a login shell that sources ~/.bashrc (and its exports).
        result = subprocess.run(["bash", "--login", "-c", "-i", f"source ~/.bashrc 2>/dev/null; {command}"],
                                env=self.env, cwd=str(self.home),
                                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        return result


def test_the_yamls_start_commands_run_a_token_cluster_whose_watcher_drains_on_notice(tmp_path):
    config = load(GCP_YAML)
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    ports = {"gcs": _free_port()}
    subprocess.run([sys.executable, "-m", "raytrain_spot.cluster.check", "--new-token"],
                   env={**os.environ, "HOME": str(laptop)}, check=True, capture_output=True)
    token = (laptop / ".ray" / "auth_token").read_text()

    nic = tmp_path / "nic"
    nic.mkdir()
    (nic / "sitecustomize.py").write_text(LOOPBACK_NIC)

    types = config["available_node_types"]
    services = node_start(config["worker_start_ray_commands"])
    with MetadataEmulator(["vm-worker"]) as metadata:
        head = Vm(tmp_path, "head", types["head"], {"RAY_USAGE_STATS_ENABLED": "0"}, nic)
        worker = Vm(tmp_path, "worker", types["gpu-spot"], {"RAY_HEAD_IP": "127.0.0.1", **metadata.env("vm-worker")},
                    nic)
        try:
            outputs = []
            for vm, start_commands in ((head, config["head_start_ray_commands"]),
                                       (worker, config["worker_start_ray_commands"])):
                vm.mount(config["file_mounts"], laptop)
                for command in config["setup_commands"]:
                    if not any(word in command for word in NOT_ON_THIS_MACHINE):
                        outputs.append(vm.run(command))
                for command in start_commands:
                    if command.strip() != "ray stop" and "jupyter lab" not in command and \
                            not command.startswith("sudo systemctl"):  # no JupyterLab in [dev], no systemd here
                        outputs.append(vm.run(_on_this_machine(_without_systemd(command, services, nic), ports)))
                assert oct((vm.home / ".ray" / "auth_token").stat().st_mode & 0o777) == "0o600"

            watcher_log = worker.home / ".raytrain-spot" / f"{services.watcher.unit}.log"
            deadline = time.time() + 60
            while "watching node=" not in (watcher_log.read_text() if watcher_log.exists() else ""):
                assert time.time() < deadline, watcher_log.read_text() if watcher_log.exists() else "no watcher log"
                time.sleep(0.5)

            # A driver on the head, in a shell the set-up commands prepared: token authentication applies.
            script = NODES.format(address=f"127.0.0.1:{ports['gcs']}")
            before = json.loads(head.run(f"python -c '{script}'").stdout.strip().splitlines()[-1])
            assert [(n["head"], n["state"], n["draining"]) for n in before] in (
                [(True, "ALIVE", False), (False, "ALIVE", False)], [(False, "ALIVE", False), (True, "ALIVE", False)]), before
            worker_id = next(n["id"] for n in before if not n["head"])
            assert f"watching node={worker_id}" in watcher_log.read_text()

            metadata.preempt("vm-worker")
            deadline = time.time() + 30
            while "drain accepted" not in watcher_log.read_text():
                assert time.time() < deadline, watcher_log.read_text()
                time.sleep(0.5)
            # The GCS took it as a preemption: the node drains, or, with nothing running on it, is gone for that reason.
            after = {n["id"]: n for n in json.loads(head.run(f"python -c '{script}'").stdout.strip().splitlines()[-1])}
            assert after[worker_id]["draining"] or after[worker_id]["death"] == "AUTOSCALER_DRAIN_PREEMPTED", after

            # With another token, the cluster refuses a driver.
            stranger = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                      env={**head.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
            assert stranger.returncode != 0 and "auth" in stranger.stderr.lower(), stranger.stderr[-2000:]
            printed = "".join(o.stdout + o.stderr for o in outputs) + watcher_log.read_text()
            assert token not in printed, "the token must never be printed"
        finally:
            stop_cluster(MARKER)
