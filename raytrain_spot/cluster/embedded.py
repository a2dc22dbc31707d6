"""The Ray cluster a run trains on: the embedded local default, or an existing cluster.

The embedded cluster is one head raylet with no training resources (it hosts the driver's
actors, like the on-demand head of a cloud cluster) plus N virtual worker nodes, each a
raylet of its own on this machine, bound to 127.0.0.1. Its processes end with the driver, however
the driver ends (cluster/reaper.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from contextlib import contextmanager
from typing import Iterator, List, Optional

from raytrain_spot.cluster.reaper import Reaper
from raytrain_spot.config.errors import ConfigError
from raytrain_spot.config.schema import ClusterConfig
from raytrain_spot.elastic.standby import PRELOAD_ENV, PRELOAD_MODULES
from raytrain_spot.preemption.node_events import NODE_TYPE_LABEL, PRICING_LABEL

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOCAL_WORKER_TYPE = "local-cpu-spot"
DEFAULT_DASHBOARD_PORT = 8265
# A node that stops answering is declared dead after 3 health checks a second apart that each get
# no answer within 2 s, so a new worker group stops counting it within seconds. Ray's own timeout
# (10 s) made it 33 s for a powered-off node, whose raylet answers nothing; 8-9 s with these
# (bench/bench_node_death.py). The GCP cluster YAMLs set the same.
FAST_DEATH_DETECTION = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
                        "health_check_failure_threshold": 3}
_MB = 1 << 20


def _free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it, else a free port (another cluster may run here)."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind((LOOPBACK, port))
                return probe.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port on 127.0.0.1")


def _descendants(pid: int) -> List[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [p for child in children for p in (int(child), *_descendants(int(child)))]


def force_loopback() -> None:
    # Read by Ray at import time: makes every Ray process of this cluster pick 127.0.0.1
    # rather than the machine's routable address.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@contextmanager
def _preloading_worker_processes() -> Iterator[None]:
    """A raylet started inside reads this Ray setting from its environment: its worker processes
    import the training stack before taking work (worker nodes only, as in the cluster YAMLs)."""
    os.environ[PRELOAD_ENV] = ",".join(PRELOAD_MODULES)
    try:
        yield
    finally:
        del os.environ[PRELOAD_ENV]


def use_token_authentication() -> None:
    """Turn on Ray's token authentication for the clusters this process starts and joins, and for
    every process it starts (raylets, Ray's workers, the simulator's watchers inherit the
    environment): without it any local user could submit jobs to the cluster on 127.0.0.1.

    The token is Ray's: ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``, which is made (mode 600, never printed) when missing.
    """
    import raytrain_spot._ray as _ray
    from raytrain_spot.cluster.token_auth import new_token

    if not os.environ.get("RAY_AUTH_TOKEN"):
        path = os.path.expanduser(os.environ.get("RAY_AUTH_TOKEN_PATH") or default_token_path())
        if not new_token(path) and os.stat(path).st_mode & 0o077 and os.stat(path).st_uid == os.getuid():
            logger.warning("Ray's token %s was readable by other users; made it mode 600", path)
            os.chmod(path, 0o600)  # Ray's own `ray.init()` writes it with the umask's mode
    _ray.enable_token_auth()
    _ray.AuthenticationTokenLoader.instance().reset_cache()


class EmbeddedCluster:
    """A local multi-node Ray cluster, token-authenticated. Node changes must come from the main thread."""

    def __init__(self, cfg: ClusterConfig):
        use_token_authentication()  # before Ray starts a process
        from ray.cluster_utils import Cluster

        self.cfg = cfg
        self.dashboard_port = _free_port(preferred=DEFAULT_DASHBOARD_PORT)
        self._reaper = Reaper()
        with self._reaper.marked():
            self._cluster = Cluster(
                initialize_head=True,
                head_node_args=dict(num_cpus=0, node_ip_address=LOOPBACK, include_dashboard=True,
                                    dashboard_host=LOOPBACK, dashboard_port=self.dashboard_port,
                                    object_store_memory=cfg.head_object_store_mb * _MB,
                                    labels={NODE_TYPE_LABEL: "local-head", PRICING_LABEL: "on_demand"},
                                    _system_config=FAST_DEATH_DETECTION),
            )
        self.workers: List = []
        for _ in range(cfg.num_worker_nodes):
            self.add_worker_node()

    @property
    def address(self) -> str:
        return self._cluster.address

    def add_worker_node(self):
        with _preloading_worker_processes(), self._reaper.marked():
            node = self._cluster.add_node(
                num_cpus=self.cfg.cpus_per_node, node_ip_address=LOOPBACK,
                object_store_memory=self.cfg.object_store_mb_per_node * _MB,
                labels={NODE_TYPE_LABEL: LOCAL_WORKER_TYPE, PRICING_LABEL: "spot"},
            )
        self.workers.append(node)
        return node

    def remove_worker_node(self, node) -> None:
        """Kill a worker node abruptly, like a VM deletion: the raylet and every process it
        started (Ray's workers outlive a killed raylet for a while otherwise)."""
        self.workers.remove(node)
        from raytrain_spot._ray import ray_constants

        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        orphans = _descendants(raylet)
        self._cluster.remove_node(node, allow_graceful=False)
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def shutdown(self) -> None:
        self._cluster.shutdown()
        self._reaper.release()


PROBE_TIMEOUT_S = 3.0
TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def ray_address_file() -> str:
    """Where `ray start` on this machine records its cluster's address (Ray's own rule,
    read without importing Ray: Ray fixes its loopback setting at import)."""
    if "RAY_TMPDIR" in os.environ:
        temp = os.environ["RAY_TMPDIR"]
    else:
        temp = os.environ.get("TMPDIR") or os.path.join(os.sep, "tmp")
    return os.path.join(temp, "ray", "ray_current_cluster")


def default_token_path() -> str:
    return os.path.expanduser("~/.ray/auth_token")


def prepare_existing_cluster(cfg: ClusterConfig) -> str:
    """The ``host:port`` of the running cluster ``cluster.address`` names, checked in seconds.

    ``auto`` means what it means to Ray: ``$RAY_ADDRESS``, else the address the last `ray start`
    on this machine recorded. Sets what this process needs to join it, before Ray is imported:
    a cluster bound to 127.0.0.1 (``ray up cluster/local.yaml``) keeps Ray on loopback, and a
    token on this machine turns on token authentication (every GCP and local YAML cluster uses
    one). Raises ConfigError naming the address tried and the fix when nothing answers there.
    """
    if cfg.address != "auto":
        address, source = cfg.address, "cluster.address"
    elif os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    else:
        recorded = ray_address_file()
        if not os.path.exists(recorded):
            raise ConfigError(f"cluster=existing: no Ray cluster was started on this machine ({recorded} is absent) "
                              "and RAY_ADDRESS is unset; start one (ray up -y cluster/local.yaml, or ray start "
                              "--head), or name it with cluster.address=HOST:PORT")
        with open(recorded) as f:
            address, source = f.read().strip(), recorded
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"cluster.address: {address!r} (from {source}) is not HOST:PORT; "
                          "set cluster.address=127.0.0.1:6379 or the head node's address")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        raise ConfigError(f"cluster=existing: no Ray cluster answers at {address} (from {source}): {error}. Start it "
                          "(ray up -y cluster/local.yaml here; on GCP run on the head node, after ray up "
                          "cluster/gcp-spot.yaml), or set cluster.address=HOST:PORT") from None
    if host in (LOOPBACK, "localhost"):
        force_loopback()
    if "RAY_AUTH_MODE" not in os.environ and (os.path.exists(default_token_path())
                                             or any(os.environ.get(v) for v in TOKEN_SOURCES)):
        os.environ["RAY_AUTH_MODE"] = "token"
    return address


def ray_logs_dir() -> str:
    """Where this Ray session keeps its processes' logs (on the node this driver runs on)."""
    from raytrain_spot._ray import session_logs_dir

    return session_logs_dir()


@contextmanager
def connect(cfg: ClusterConfig, show_ray_logs: bool = False) -> Iterator[Optional[EmbeddedCluster]]:
    """Start (embedded) or join (``cluster.address``) a cluster; yield the embedded one or None.

    Ray's processes' output reaches this process only with ``show_ray_logs``: the run prints
    its own progress and events, and Ray's lines stay in its session logs."""
    if cfg.embedded:
        force_loopback()
    address = None if cfg.embedded else prepare_existing_cluster(cfg)
    import ray

    cluster = EmbeddedCluster(cfg) if cfg.embedded else None
    try:
        ray.init(address=cluster.address if cluster else address, logging_level=logging.WARNING,
                 log_to_driver=show_ray_logs)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
