"""The reaper of an embedded cluster, with real processes: what the cluster started ends with its driver,
however the driver ends, and nothing else does. (tests/test_chaos_e2e.py SIGKILLs a driver with its cluster.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil

from raytrain_spot.cluster.reaper import Reaper

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]

# A driver whose cluster started a process that outlives it, as Ray's agents outlive their raylet while
# they report its death to a GCS that died too: in a session of its own, tied to nothing.
DRIVER = textwrap.dedent(f"""
    import subprocess, time
    from raytrain_spot.cluster.reaper import Reaper
    reaper = Reaper()
    with reaper.marked():
        straggler = subprocess.Popen({SLEEPER!r}, start_new_session=True)
    bystander = subprocess.Popen({SLEEPER!r}, start_new_session=True)
    print(straggler.pid, bystander.pid, flush=True)
    time.sleep(600)
""")


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def end(*pids: int) -> None:
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def test_a_sigkilled_driver_takes_the_processes_its_cluster_started_along_and_no_other():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    straggler, bystander = map(int, driver.stdout.readline().split())
    try:
        assert not gone_within(straggler, 1), "the cluster's process ends only with its driver"
        driver.kill()
        driver.wait()
        assert gone_within(straggler, 5), "the cluster's process outlived its SIGKILLed driver"
        assert not gone_within(bystander, 1), "a process the driver started outside its cluster was killed"
    finally:
        end(straggler, bystander)


def test_a_release_after_the_clusters_shutdown_ends_what_it_left():
    reaper = Reaper()
    with reaper.marked():
        left = subprocess.Popen(SLEEPER)
    other = subprocess.Popen(SLEEPER)
    try:
        reaper.release()
        assert left.wait(timeout=5) is not None
        assert other.poll() is None, "only the cluster's processes are ended"
    finally:
        end(left.pid, other.pid)
