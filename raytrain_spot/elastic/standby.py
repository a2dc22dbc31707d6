"""Warm standby worker processes: a restarted worker group starts in seconds, not in imports.

Every Ray Train worker group runs in fresh worker processes, and a fresh process spends
seconds importing torch, Ray Train and the training code before its first step
(``python bench/bench_startup.py``). Two Ray mechanisms take that off the restart path:

* ``RAY_preload_python_modules`` (a Ray setting, read by a raylet from its environment;
  the embedded cluster and the cluster YAMLs set it on worker nodes): every worker process
  that raylet starts imports ``PRELOAD_MODULES`` before it takes work, which imports the
  training stack at idle priority (elastic/preload.py);
* the raylet's ``PrestartWorkers`` call: it starts idle worker processes for a job and a
  runtime environment and keeps them alive; the next actor of that job and environment on
  the node is placed in one of them instead of a new process.

Once a group has trained for ``elastic.standby_delay_s`` the lowest rank on each node tops its
node up to one idle process per rank there, with the group's own runtime environment (marked with the run's name, so
the processes can be counted), and rank 0 starts standbys on every node that joins while the
group runs. When the group restarts, after a notice or for a regrow, its new workers start
in those. ``PrestartWorkers`` has no Python API in Ray 2.60; ``tests/test_standby.py`` fails
loudly if an upgrade moves or changes it. A failed top-up is logged and costs only the speed-up.

Each group decides whether to keep standbys (``decide_standbys``): ``elastic.warm_standby``, or
where it is unset, whether the imports would take cores the training leaves idle (GPU training on
nodes of their own: yes). On the embedded cluster, CPU training on nodes that share the machine's
cores, a standby's imports were measured to cost the group more steps than its faster restarts
save (docs/benchmarks.md), so standbys are off there by default.

A process that has preloaded the stack says so in the GCS's key-value store (``announce_warm``):
rank 0 regrows onto a node that joined only once it is warm (``warm_nodes``, read by
elastic/capacity.py), since a group restarted onto a node still importing waits for the import.

A group without standbys still restarts warm after a notice that leaves it somewhere to go
(``NoticeStandbys``, ``elastic.notice_standby_wait_s``): rank 0 starts one standby per rank on each node that
stays, tells them to import at normal priority (``hurry_standbys``: they are wanted within seconds,
and training pays for their imports once, not for as long as the group runs), and the group trains
on until each standby says it is warm (``warm_standbys``), within the drain deadline
(preemption/hold.py's notice hold).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional, Set

import psutil

if TYPE_CHECKING:  # the preload imports this module before it lowers its priority: keep it light
    from raytrain_spot.config.schema import Config

logger = logging.getLogger(__name__)

PRELOAD_MODULES = ("raytrain_spot.elastic.preload",)
"""What every worker process on a worker node imports before it takes work."""

PRELOAD_ENV = "RAY_preload_python_modules"

STANDBY_MARKER = "RAYTRAIN_SPOT_STANDBY"
"""Environment variable in the Train workers' runtime environment; its value is the run name."""

NO_PRELOAD = "RAYTRAIN_SPOT_NO_PRELOAD"
"""Environment variable in the runtime environment of a process that needs none of the stack (the
controller's copy-on, checkpoint/copy_on.py): set, its preload imports nothing and it takes work at once."""

TASK_MODULES = "RAYTRAIN_SPOT_TASK_MODULES"
"""Environment variable in the Train workers' runtime environment: the modules the run's task needs
(its module and ``TrainingTask.preload_modules``), comma-separated, which the preload imports after the stack."""


def this_runs_task_modules() -> List[str]:
    """The task modules this process preloads: none outside a run's Train workers."""
    return [module for module in os.environ.get(TASK_MODULES, "").split(",") if module]

# Idle standbys are started per group; the job's end removes them, so they may wait long.
KEEP_ALIVE_S = 7 * 24 * 3600
IDLE_TITLE = "ray::IDLE"


WARM_NAMESPACE = "raytrain_spot_warm"
"""GCS key-value namespace: one key per node id that has a process with the stack preloaded."""

STANDBY_NAMESPACE = "raytrain_spot_standby"
"""GCS key-value namespace: ``warm/<run>/<node id>/<pid>`` for each idle process of a run with the
stack preloaded (removed when a Train worker starts in it: ``claim_standby``), and ``hurry/<run>``,
until when (unix seconds) the run's new standbys import at normal priority (``hurry_standbys``)."""


def _warm_key(run_name: str, node_id: str, pid: int) -> str:
    return f"warm/{run_name}/{node_id}/{pid}"


def announce_warm() -> None:
    """Called by a worker process once it has preloaded the stack (elastic/preload.py): its node is
    warm, and if it is one of a run's processes, it is a warm standby of that run. Outside a Ray worker
    (nothing connected) it does nothing."""
    import ray
    from raytrain_spot._ray import internal_kv_initialized, internal_kv_put

    if ray.is_initialized() and internal_kv_initialized():
        node_id = ray.get_runtime_context().get_node_id()
        internal_kv_put(node_id, str(time.time()), namespace=WARM_NAMESPACE)
        if run_name := os.environ.get(STANDBY_MARKER):
            internal_kv_put(_warm_key(run_name, node_id, os.getpid()), "", namespace=STANDBY_NAMESPACE)


def claim_standby(run_name: str) -> None:
    """A Train worker of ``run_name`` starts in this process: whether it was a standby or not, it is none now."""
    import ray
    from raytrain_spot._ray import internal_kv_del

    node_id = ray.get_runtime_context().get_node_id()
    internal_kv_del(_warm_key(run_name, node_id, os.getpid()), namespace=STANDBY_NAMESPACE)


def warm_standbys(run_name: str) -> Counter:
    """Idle standbys of ``run_name`` with the stack preloaded, by node id (dead nodes included: callers filter)."""
    from raytrain_spot._ray import internal_kv_list

    keys = internal_kv_list(f"warm/{run_name}/", namespace=STANDBY_NAMESPACE)
    return Counter(key.decode().split("/")[2] for key in keys)


def hurry_standbys(run_name: str, until: float) -> None:
    """Until ``until`` (unix seconds), the run's new standbys import at normal priority (``standbys_hurried``)."""
    from raytrain_spot._ray import internal_kv_put

    internal_kv_put(f"hurry/{run_name}", str(until), namespace=STANDBY_NAMESPACE)


def standbys_hurried() -> bool:
    """Asked by a preloading process before it picks its priority: whether it is a standby of a run
    that wants its standbys warm now (a notice warm-up)."""
    import ray
    from raytrain_spot._ray import internal_kv_get, internal_kv_initialized

    run_name = os.environ.get(STANDBY_MARKER)
    if not (run_name and ray.is_initialized() and internal_kv_initialized()):
        return False
    until = internal_kv_get(f"hurry/{run_name}", namespace=STANDBY_NAMESPACE)
    return until is not None and float(until) > time.time()


def warm_nodes() -> Set[str]:
    """Node ids that have had a process with the stack preloaded (dead nodes included: callers filter)."""
    from raytrain_spot._ray import internal_kv_list

    return {key.decode() for key in internal_kv_list("", namespace=WARM_NAMESPACE)}


@dataclass(frozen=True)
class StandbyDecision:
    enabled: bool
    reason: str


def decide_standbys(cfg: "Config", spot_aware: bool, nodes_share_cores: Callable[[], bool]) -> StandbyDecision:
    """``elastic.warm_standby``; where unset, on only where a standby's imports take cores the training
    leaves idle: training on GPUs, on nodes that do not share a machine. CPU training keeps its node's
    cores busy, and nodes on one machine share its cores; there the imports come out of the training
    they would speed up (measured on the embedded cluster: docs/benchmarks.md). ``nodes_share_cores``
    (a read of the node table) is called only where it decides."""
    if not spot_aware:
        return StandbyDecision(False, "plain Ray Train (a benchmark baseline) starts every group cold")
    if cfg.elastic.warm_standby is not None:
        return StandbyDecision(cfg.elastic.warm_standby, f"elastic.warm_standby={cfg.elastic.warm_standby}")
    if not cfg.trainer.use_gpu:
        return StandbyDecision(False, "CPU training keeps the nodes' cores busy, and a standby's imports would "
                                      "come out of it; set elastic.warm_standby=true to keep standbys anyway")
    if nodes_share_cores():
        return StandbyDecision(False, "Ray nodes of this cluster share a machine's cores, and a standby's imports "
                                      "would come out of training; set elastic.warm_standby=true to keep standbys "
                                      "anyway")
    return StandbyDecision(True, "GPU training on nodes of their own leaves their cores idle for a standby's imports")


def nodes_share_cores() -> bool:
    """Whether two live Ray nodes of this cluster run on one machine (one address): they share its cores."""
    import ray

    addresses = [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]]
    return len(addresses) > len(set(addresses))


def idle_standbys(run_name: str) -> int:
    """Idle worker processes of this run on this node (siblings of this worker under its raylet)."""
    count = 0
    for process in psutil.Process(os.getppid()).children():
        try:
            if process.cmdline()[:1] == [IDLE_TITLE] and process.environ().get(STANDBY_MARKER) == run_name:
                count += 1
        except (psutil.Error, IndexError):
            continue  # exited or not ours to read
    return count


def prestart(node_id: str, count: int) -> None:
    """Ask ``node_id``'s raylet for ``count`` idle workers with this worker's job and runtime environment."""
    import ray
    from raytrain_spot._ray import (
        common_pb2,
        init_grpc_channel,
        node_manager_pb2,
        node_manager_pb2_grpc,
        runtime_environment_pb2,
    )

    node = next(n for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"])
    context = ray.get_runtime_context()
    request = node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.PYTHON,
        job_id=bytes.fromhex(context.get_job_id()),
        runtime_env_info=runtime_environment_pb2.RuntimeEnvInfo(
            serialized_runtime_env=context.get_runtime_env_string()),
        keep_alive_duration_secs=KEEP_ALIVE_S,
        num_workers=count,
    )
    # Ray's own channel: it adds the cluster's auth token and TLS where the cluster uses them.
    with init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}") as channel:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=10)


def top_up(run_name: str, node_id: str, wanted: int, delay_s: float = 0.0) -> Optional[int]:
    """After ``delay_s`` (the group trains first: a standby's imports would slow its first steps on
    shared cores), start idle standbys on this node until it has ``wanted``; returns how many were
    started, or None if that failed (logged: a failed top-up only loses the speed-up)."""
    time.sleep(delay_s)
    try:
        missing = wanted - idle_standbys(run_name)
        if missing > 0:
            prestart(node_id, missing)
        return max(missing, 0)
    except Exception:
        _log_cold_start(node_id)
        return None


def start_standbys(node_id: str, count: int) -> None:
    """Start ``count`` standbys on ``node_id`` (a node that joined while the group runs, before the regrow;
    a node that stays after a notice); a failure is logged and costs only the speed-up."""
    try:
        if count > 0:
            prestart(node_id, count)
    except Exception:
        _log_cold_start(node_id)


class NoticeStandbys:
    """Rank 0's warm-up at a notice: a warm standby for every worker of the restarted group, on the nodes
    that stay (one per rank they keep) and, up to ``max_workers``, on the usable nodes outside the group
    (``room_outside``: how many workers fit on each, at most the given number in all), where the
    restarted group places the rest. The notice hold (preemption/hold.py) waits for ``missing`` to be 0."""

    def __init__(self, run_name: str, group_keeps_standbys: bool, hurry_s: float, max_workers: int,
                 room_outside: Callable[[int], Mapping[str, int]], clock: Callable[[], float] = time.time,
                 poll_s: float = 0.2):
        self._run_name = run_name
        self._group_keeps_standbys = group_keeps_standbys
        self._hurry_s = hurry_s
        self._max_workers = max_workers
        self._room_outside = room_outside
        self._clock = clock
        self._poll_s = poll_s
        self._outside: Mapping[str, int] = {}
        self._warm: Counter = Counter()
        self._read_at = -float("inf")

    def start(self, staying: Mapping[str, int]) -> None:
        """Standbys for the group restarted without the noticed nodes (``staying``: node id -> ranks it keeps).
        A group that keeps standbys has them started already, or about to be: it only waits for them."""
        self._outside = self._room_outside(self._max_workers - sum(staying.values()))
        if self._group_keeps_standbys:
            return
        hurry_standbys(self._run_name, self._clock() + self._hurry_s)
        warm = warm_standbys(self._run_name)
        wanted = {**staying, **self._outside}
        threading.Thread(target=lambda: [start_standbys(node_id, count - warm[node_id])
                                         for node_id, count in wanted.items()],
                         name="notice-warmup", daemon=True).start()

    def missing(self, staying: Mapping[str, int]) -> int:
        """How many of the restarted group's standbys are not warm yet (the store is read at most every ``poll_s``)."""
        if self._clock() - self._read_at >= self._poll_s:
            self._warm, self._read_at = warm_standbys(self._run_name), self._clock()
        wanted = {**staying, **self._outside}
        return sum(max(count - self._warm[node_id], 0) for node_id, count in wanted.items())


def _log_cold_start(node_id: str) -> None:
    logger.warning("Could not start standby worker processes on node %s; the next group starts cold there",
                   node_id, exc_info=True)
