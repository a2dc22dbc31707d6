"""Ray's fake multi-node provider, made launchable with ``ray up`` on one machine.

``ray up cluster/local.yaml`` gives a laptop the shape of the cloud cluster: a head with no
training resources plus worker raylets of the same node types and labels, all on 127.0.0.1.

Ray 2.60 ships ``FakeMultiNodeProvider`` (workers are raylets the head's autoscaler starts
in-process) but it only runs under ``RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...``: its ``type: fake_multinode`` cannot go through ``ray up``,
because the wheel lacks the defaults file ``prepare_config`` loads for that type, the
provider cannot create (or tear down) its head, and ``ray up`` would SSH to it. This
subclass, used as ``type: external``, fills those gaps:

- the head exists once ``ray up`` has created it, recorded in a small state file that the
  ``ray up``/``ray down`` processes and the head's autoscaler all read;
- commands for the head run in a local shell (``LocalCommandRunner``) instead of over SSH,
  with this Python environment first on PATH;
- every process of the cluster carries ``RAYTRAIN_SPOT_LOCAL_CLUSTER=<cluster name>`` in its
  environment, so stopping the cluster (``ray stop`` in its commands, ``ray down``) ends
  exactly its processes and leaves any other Ray instance on the machine alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import ray  # noqa: F401  puts Ray's bundled psutil (ray/thirdparty_files) on sys.path
import psutil  # noqa: E402  (Ray's bundled copy, see above)
from raytrain_spot._ray import FakeMultiNodeProvider, ProcessRunnerError, ray_constants, with_environment_variables
from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

from raytrain_spot.elastic.standby import PRELOAD_ENV, PRELOAD_MODULES

logger = logging.getLogger(__name__)

CLUSTER_ENV = "RAYTRAIN_SPOT_LOCAL_CLUSTER"
LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 10.0


def cluster_processes(cluster_name: str) -> List[psutil.Process]:
    """Processes of this machine that belong to the local cluster ``cluster_name``."""
    own = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    found = []
    for process in psutil.process_iter():
        if process.pid in own:
            continue
        try:
            if process.environ().get(CLUSTER_ENV) == cluster_name:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_cluster(cluster_name: str, grace_s: float = STOP_GRACE_S) -> int:
    """End every process of the local cluster: SIGTERM, then SIGKILL after ``grace_s``."""
    processes = cluster_processes(cluster_name)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    logger.info("local cluster %s: stopped %d processes (%d needed SIGKILL)", cluster_name, len(processes),
                len(alive))
    return len(processes)


@contextmanager
def worker_environment(node_type: str) -> Iterator[None]:
    """The environment a worker raylet of ``node_type`` must be created in, for the duration.

    The fake provider builds worker nodes inside the head's autoscaler process, and Ray
    resolves a node's resources, labels and node group from that process's environment.
    `ray up` starts the head with its own overrides there (RAY_OVERRIDE_RESOURCES={"CPU": 0},
    the head's labels, RAY_NODE_TYPE_NAME=head): left in place, every worker would come up
    as another head with no CPUs. Worker processes preload the training stack, as on GCP.
    """
    saved = {key: os.environ.get(key) for key in (ray_constants.RESOURCES_ENVIRONMENT_VARIABLE,
                                                  ray_constants.LABELS_ENVIRONMENT_VARIABLE, "RAY_NODE_TYPE_NAME",
                                                  PRELOAD_ENV)}
    os.environ.pop(ray_constants.RESOURCES_ENVIRONMENT_VARIABLE, None)
    os.environ.pop(ray_constants.LABELS_ENVIRONMENT_VARIABLE, None)
    os.environ["RAY_NODE_TYPE_NAME"] = node_type
    os.environ[PRELOAD_ENV] = ",".join(PRELOAD_MODULES)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class LocalCommandRunner(CommandRunnerInterface):
    """Runs a node's commands in a local shell; `~` in file-mount targets is this user's home."""

    def __init__(self, log_prefix: str, cluster_name: str):
        self.log_prefix = log_prefix
        self.cluster_name = cluster_name

    def _environment(self) -> Dict[str, str]:
        env = dict(os.environ)
        env[CLUSTER_ENV] = self.cluster_name
        # Commands run in the Python environment `ray up` runs in (the laptop's "node image").
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        return env

    def run(self, cmd: Optional[str] = None, timeout: int = 120, exit_on_fail: bool = False,
            port_forward=None, with_output: bool = False, environment_variables: Optional[Dict[str, object]] = None,
            run_env: str = "auto", ssh_options_override_ssh_key: str = "", shutdown_after_run: bool = False) -> str:
        if cmd is None:  # `ray attach`: a shell on the "head", which is this machine
            cmd = "exec bash -i"
        if cmd.strip() == "ray stop":
            # A plain `ray stop` ends every Ray process of the user on the machine, other
            # clusters included; on the local cluster it means "stop this cluster".
            stop_cluster(self.cluster_name)
            return ""
        if environment_variables:
            cmd = with_environment_variables(cmd, environment_variables)
        command = ["bash", "-c", cmd]
        try:
            if with_output:
                return subprocess.check_output(command, env=self._environment()).decode()
            subprocess.check_call(command, env=self._environment())
            return ""
        except subprocess.CalledProcessError as error:
            raise ProcessRunnerError("Command failed", "ssh_command_failed", code=error.returncode,
                                     command=cmd) from None

    def _copy(self, source: str, target: str) -> None:
        source, target = os.path.expanduser(source), os.path.expanduser(target)
        if os.path.abspath(source.rstrip("/")) == os.path.abspath(target.rstrip("/")):
            return
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            shutil.copy2(source, target)

    def run_rsync_up(self, source: str, target: str, options: Optional[Dict[str, Any]] = None) -> None:
        self._copy(source, target)

    def run_rsync_down(self, source: str, target: str, options: Optional[Dict[str, Any]] = None) -> None:
        self._copy(source, target)

    def remote_shell_command_str(self) -> str:
        return "bash\n"


class LocalMultiNodeProvider(FakeMultiNodeProvider):
    """``FakeMultiNodeProvider`` whose head ``ray up`` creates and ``ray down`` removes."""

    def __init__(self, provider_config: Dict[str, Any], cluster_name: str):
        # The fake provider refuses to load without it; this provider is that fake cluster.
        os.environ.setdefault("RAY_FAKE_CLUSTER", "1")
        super().__init__(provider_config, cluster_name)
        state_dir = provider_config.get("state_dir") or os.path.join(tempfile.gettempdir(), "raytrain-spot-local")
        self._state_path = os.path.join(os.path.expanduser(state_dir), f"{cluster_name}.json")
        self._nodes.pop(self._head_node_id)
        self._load_head()

    # -- the head, shared through the state file -----------------------------------------------
    def _load_head(self) -> None:
        try:
            with open(self._state_path) as f:
                tags = json.load(f)["head_tags"]
        except FileNotFoundError:
            self._nodes.pop(self._head_node_id, None)
            return
        self._nodes[self._head_node_id] = {"tags": tags}

    def _save_head(self, tags: Dict[str, str]) -> None:
        os.makedirs(os.path.dirname(self._state_path), exist_ok=True)
        temporary = self._state_path + ".tmp"
        with open(temporary, "w") as f:
            json.dump({"head_tags": tags}, f)
        os.replace(temporary, self._state_path)
        self._nodes[self._head_node_id] = {"tags": tags}

    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            self._load_head()
            return super().non_terminated_nodes(tag_filters)

    def create_node(self, node_config: Dict[str, Any], tags: Dict[str, str], count: int) -> None:
        # `ray up` creates the head this way; workers come from the autoscaler through
        # create_node_with_resources_and_labels, as in the fake provider.
        if tags.get(TAG_RAY_NODE_KIND) != NODE_KIND_HEAD or count != 1:
            raise ValueError(f"{type(self).__name__}.create_node makes the head only, got tags {tags}, count {count}")
        with self.lock:
            self._save_head(dict(tags))

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # The autoscaler launches from several threads; the environment is process-wide.
        with self.lock, worker_environment(tags[TAG_RAY_USER_NODE_TYPE]):
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)

    def set_node_tags(self, node_id: str, tags: Dict[str, str]) -> None:
        with self.lock:
            if node_id == self._head_node_id:
                self._load_head()
                self._save_head(dict(self._nodes[node_id]["tags"], **tags))
            else:
                self._nodes[node_id]["tags"].update(tags)

    def terminate_node(self, node_id: str) -> None:
        with self.lock:
            if node_id != self._head_node_id:
                return super().terminate_node(node_id)
            # The head takes the whole cluster with it, workers included (their raylets
            # were started by the head's autoscaler and carry the cluster's marker too).
            stop_cluster(self.cluster_name)
            self._nodes.pop(node_id, None)
            try:
                os.remove(self._state_path)
            except FileNotFoundError:
                pass

    def _get_ip(self, node_id: str) -> Optional[str]:
        return LOOPBACK if node_id == self._head_node_id else super()._get_ip(node_id)

    def get_command_runner(self, log_prefix, node_id, auth_config, cluster_name, process_runner, use_internal_ip,
                           docker_config=None) -> CommandRunnerInterface:
        return LocalCommandRunner(log_prefix, cluster_name)
