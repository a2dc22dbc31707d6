"""Every process of an embedded cluster ends with its driver, however the driver ends.

Ray ties its GCS and raylets to the process that started them, but not the agents a raylet starts:
once their raylet is gone they report its death to the GCS before they exit (``publish_error``, with a
60 s timeout), and with the GCS gone too that report can wait (on CI, a SIGKILLed driver left one node's two agents
running 30 s later). So the driver starts a reaper in a session of its own that waits for the end of
a pipe only the driver holds. The pipe ends when the driver exits or is killed, or when it closes it
after its cluster's shutdown; the reaper then kills the cluster's processes, and exits: those started
with the cluster's marker in their environment (the GCS, the raylets) and all they started, as last
seen while the driver lived or found then.
"""

from __future__ import annotations

import collections
import os
import select
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Any, Dict, Iterator

MARKER_ENV = "RAYTRAIN_SPOT_CLUSTER"
"""The environment variable that names the embedded cluster a process belongs to."""
TRACK_INTERVAL_S = 1.0
"""How often the reaper looks for the cluster's processes while the driver lives."""
SWEEPS = 10
SWEEP_INTERVAL_S = 0.2
"""A process may start another as it dies: the reaper sweeps until a sweep finds none, at most ``SWEEPS`` times."""


class Reaper:
    """The driver's side: ``marked()`` around starting the cluster's processes, ``release()`` after its
    shutdown (a driver that dies releases it too)."""

    def __init__(self):
        self.marker = uuid.uuid4().hex
        read_end, self._write_end = os.pipe()  # neither end is inherited by the processes Ray starts
        try:
            self._process = subprocess.Popen([sys.executable, "-m", __name__, self.marker], stdin=read_end,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             start_new_session=True)
        finally:
            os.close(read_end)

    @contextmanager
    def marked(self) -> Iterator[None]:
        """The processes started inside carry the marker, and so do the processes they start."""
        os.environ[MARKER_ENV] = self.marker
        try:
            yield
        finally:
            del os.environ[MARKER_ENV]

    def release(self, timeout_s: float = 10.0) -> None:
        """The cluster has shut down: end what is left of it, and wait for that."""
        os.close(self._write_end)
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass


def cluster_processes(marker: str) -> Dict[int, Any]:
    """The processes started with ``marker`` in their environment, and all they started in turn: Ray's
    workers and agents rename themselves over their environment, so they are found by their parents."""
    import psutil

    processes, children, found = {}, collections.defaultdict(list), []
    for process in psutil.process_iter(["ppid"]):
        if process.pid == os.getpid():
            continue
        processes[process.pid] = process
        children[process.info["ppid"]].append(process.pid)
        try:
            if process.environ().get(MARKER_ENV) == marker:
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    cluster: Dict[int, Any] = {}
    while found:
        pid = found.pop()
        if pid not in cluster:
            cluster[pid] = processes[pid]
            found.extend(children[pid])
    return cluster


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(marker: str, known: Dict[int, Any]) -> None:
    """Kill the cluster's processes: those ``known`` from before (an agent whose raylet died no longer
    descends from it) and those found now."""
    import psutil

    for _ in range(SWEEPS):
        alive = [process for process in {**known, **cluster_processes(marker)}.values() if _alive(process)]
        known = {}
        if not alive:
            break
        for process in alive:
            try:
                process.kill()  # psutil refuses a pid reused by another process
            except psutil.NoSuchProcess:
                continue
        time.sleep(SWEEP_INTERVAL_S)


def main() -> None:
    marker = sys.argv[1]
    known: Dict[int, Any] = {}
    while not select.select([sys.stdin], [], [], TRACK_INTERVAL_S)[0]:
        known.update(cluster_processes(marker))
    # The pipe ended: the driver is gone, or done with its cluster.
    reap(marker, known)


if __name__ == "__main__":
    main()
