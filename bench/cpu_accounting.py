"""Where a benchmark run's CPU went: CPU seconds by kind of process over a time window.

On the embedded cluster every process of a run (the driver, Ray's GCS, raylets and dashboard,
the Train controller and workers, the framework's actors, idle standbys) descends from the
process a benchmark starts, and all of them share this machine's cores. ``CpuSampler`` reads the
CPU time (user + system) of each of them twice a second; ``cores_by_kind`` turns two instants
into cores used by kind over the window between them (CPU seconds / wall seconds), so a
throughput gap between two runs can be read as "who took the cores". A process's kind is
its Ray process title without the method (``ray::RayTrainWorker``, ``ray::IDLE``), or its
program (``gcs_server``, ``raylet``, ``dashboard``), or ``driver`` for the process started.

Inside the Train workers, ``profile_train_workers`` samples their Python stacks (py-spy) and
``loop_own_share`` says how much of their CPU the training loop's own code took, outside the
step and the batch loading that every loop does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import psutil

SAMPLE_PERIOD_S = 0.5
IDLE_WORKER = "ray::IDLE"
"""The title of a Ray worker process that hosts nothing yet (a warm standby)."""
TRAIN_WORKER = "ray::RayTrainWorker"
TRAIN_WORKER_CALL = "ray::execute."
"""Ray Train names its calls into a worker ``execute.<function>`` (its ``Worker.execute_async``), and
the process takes the call's title while it runs one: the training function itself among them."""
PYTHON_WORKER_START = "default_worker"
"""What a Ray worker process is before it sets its title."""


def process_kind(process: psutil.Process, root_pid: int) -> Tuple[str, bool]:
    """(kind, whether it is final). A Ray worker's title is provisional until it names an actor
    class (``ray::Class.method``) or a Ray Train call (``ray::execute.<function>``): before that it
    is starting or idle (``ray::IDLE``), and becomes what it hosts."""
    if process.pid == root_pid:
        return "driver", True
    cmdline = process.cmdline()
    if not cmdline:
        return process.name(), True
    if cmdline[0].startswith("ray::"):
        title = cmdline[0].split()[0]
        if title.startswith(TRAIN_WORKER_CALL):
            return TRAIN_WORKER, True
        return title.split(".")[0], "." in title
    for marker in ("raytrain_spot.preemption.watcher", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if any(marker in arg for arg in cmdline):
            return marker.removesuffix(".py"), True
    if any(PYTHON_WORKER_START in arg for arg in cmdline):
        return PYTHON_WORKER_START, False
    return os.path.basename(cmdline[0]), True


class CpuSampler:
    """Samples the CPU time of a process and its descendants in a thread until ``stop``."""

    def __init__(self, root_pid: int):
        self._root_pid = root_pid
        # (pid, start time) -> the process's samples: times, cumulative CPU seconds, and its kind
        # then (kind, final); and the last final kind it had.
        self._samples: Dict[Tuple[int, float], Tuple[List[float], List[float], List[Tuple[str, bool]]]] = {}
        self._final: Dict[Tuple[int, float], str] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="cpu-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _sample_until_stopped(self) -> None:
        while not self._stopped.wait(SAMPLE_PERIOD_S):
            try:
                root = psutil.Process(self._root_pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue  # the run is exiting
            now = time.time()
            for process in processes:
                try:
                    with process.oneshot():
                        key = (process.pid, process.create_time())
                        cpu = process.cpu_times()
                        kind = process_kind(process, self._root_pid)
                except psutil.Error:
                    continue  # exited between the listing and the read
                times, totals, kinds = self._samples.setdefault(key, ([], [], []))
                times.append(now)
                totals.append(cpu.user + cpu.system)
                kinds.append(kind)
                if kind[1]:
                    self._final[key] = kind[0]

    def cores_by_kind(self, start: float, end: float) -> Dict[str, float]:
        """Cores each kind of process used between two instants (CPU seconds over the window / its
        length), largest first. The CPU between two samples goes to the kind the process had at the
        second: a standby's imports to ``ray::IDLE``, its training to the Train worker it became;
        other provisional titles (a worker between tasks) to the process's final kind."""
        used: Dict[str, float] = {}
        for key, (times, totals, kinds) in self._samples.items():
            previous = 0.0  # a process first sampled inside the window started there: all its CPU counts
            for at, total, (kind, final) in zip(times, totals, kinds):
                if start < at <= end:
                    if not final and kind != IDLE_WORKER:
                        kind = self._final.get(key, kind)
                    used[kind] = used.get(kind, 0.0) + total - previous
                previous = total
        return {kind: round(cpu / (end - start), 3) for kind, cpu in sorted(used.items(), key=lambda kv: -kv[1])}


# -- inside the Train workers: what share of their CPU the loop's own code takes -----------------

STEP_AND_DATA = ("accumulate (raytrain_spot/loop/step.py", "update (raytrain_spot/loop/step.py",
                 "next (raytrain_spot/loop/batches.py", "__next__ (torch/utils/data/dataloader.py")
"""Frames of the work both loops share: the forward/backward, the optimizer step, and taking the
batch from the loader (the framework's StepBatches, the plain loop's DataLoader)."""


def profile_train_workers(root_pid: int, after_s: float, seconds: float, out_dir: str) -> List[str]:
    """Sample the Python stacks of every Train worker under ``root_pid`` with py-spy (installed with
    Ray's dashboard) for ``seconds``, ``after_s`` after the workers appear; the raw profiles' paths."""
    py_spy = shutil.which("py-spy", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    deadline = time.time() + 600
    workers: List[psutil.Process] = []
    while not workers and time.time() < deadline:
        time.sleep(1)
        try:
            candidates = psutil.Process(root_pid).children(recursive=True)
        except psutil.Error:
            return []  # the run ended first
        workers = [p for p in candidates if _is_train_worker(p, root_pid)]
    time.sleep(after_s)
    try:  # the whole group by now: the first worker found may have been the first of several
        workers = [p for p in psutil.Process(root_pid).children(recursive=True) if _is_train_worker(p, root_pid)]
    except psutil.Error:
        return []
    paths = [os.path.join(out_dir, f"py-spy-{worker.pid}.txt") for worker in workers]
    recorders = [subprocess.Popen([py_spy, "record", "--nonblocking", "--rate", "50", "--format", "raw",
                                   "--duration", str(int(seconds)), "--output", path, "--pid", str(worker.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for worker, path in zip(workers, paths)]
    for recorder in recorders:
        recorder.wait()
    return [path for path in paths if os.path.exists(path)]


def _is_train_worker(process: psutil.Process, root_pid: int) -> bool:
    try:
        return process_kind(process, root_pid)[0] == TRAIN_WORKER
    except psutil.Error:
        return False  # exited since the listing


def loop_own_share(profile_path: str, loop_frame: str) -> Optional[float]:
    """Share of a worker's on-CPU samples inside its training loop (frames containing ``loop_frame``)
    that are outside the step and the batch loading: what the loop itself costs per step."""
    in_loop = own = 0
    with open(profile_path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if not any(loop_frame in frame for frame in frames):
                continue
            in_loop += int(count)
            if not any(shared in frame for frame in frames for shared in STEP_AND_DATA):
                own += int(count)
    return own / in_loop if in_loop else None
