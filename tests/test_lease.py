"""One driver owns a run name at a time: the lease, on a filesystem and on GCS (the emulator)."""

import os
import subprocess
import sys
import uuid

import pytest

from raytrain_spot.checkpoint.lease import RunInUse, RunLease
from raytrain_spot.storage.gcs import GcsStore
from raytrain_spot.storage.store import LocalStore
from raytrain_spot.testing.fake_gcs import FakeGcsServer


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def gcs_server():
    with FakeGcsServer() as running:
        yield running


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(str(tmp_path / "storage"))
    server = request.getfixturevalue("gcs_server")
    bucket = f"lease-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    return GcsStore(f"gs://{bucket}/runs", client=server.client(), emulator_host=server.endpoint)


def test_a_second_driver_is_refused_until_the_first_lets_go_or_goes_silent(store):
    clock = Clock()
    first, second = RunLease(store, "exp", ttl_s=60, clock=clock), RunLease(store, "exp", ttl_s=60, clock=clock)
    first.acquire()
    with pytest.raises(RunInUse, match=r"run.name=exp is in use by another driver \(pid \d+ on"):
        second.acquire()
    clock.now += 30
    assert first.renew()
    clock.now += 45  # 45 s after the last renewal: still within the lease
    with pytest.raises(RunInUse):
        second.acquire()
    clock.now += 20  # 65 s of silence: the first driver is gone
    second.acquire()
    assert not first.renew() and first.lost.is_set(), "the first driver must learn that it lost the run"
    second.release()
    RunLease(store, "exp", ttl_s=60, clock=clock).acquire()  # released: free at once


def test_the_compare_and_swap_lets_one_of_two_racing_writers_win(store):
    version = None
    assert store.put_if_version("run/lease.json", b"a", version)
    _, version = store.get_versioned("run/lease.json")
    assert store.put_if_version("run/lease.json", b"b", version)
    assert not store.put_if_version("run/lease.json", b"c", version), "a stale version must lose"
    assert not store.put_if_version("run/lease.json", b"d", None), "create-if-absent on an existing key must lose"
    assert store.get_versioned("run/lease.json")[0] == b"b"


def test_a_dead_driver_on_this_machine_frees_its_lease_at_once(tmp_path):
    store = LocalStore(str(tmp_path / "storage"))
    script = ("import sys; from raytrain_spot.checkpoint.lease import RunLease; "
              "from raytrain_spot.storage.store import LocalStore; "
              f"RunLease(LocalStore({str(tmp_path / 'storage')!r}), 'exp', ttl_s=3600).acquire()")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    RunLease(store, "exp", ttl_s=3600).acquire()  # the holder's process is gone: no wait for the hour
