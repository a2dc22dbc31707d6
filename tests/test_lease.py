"""One driver owns a run name at a time: the lease, on a filesystem and on GCS (the emulator)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from raytrain_spot.checkpoint.format import MANIFEST, Manifest, checkpoint_key, file_entry
from raytrain_spot.checkpoint.lease import LeaseGuard, LeaseLost, RunInUse, RunLease
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.storage.gcs import GcsStore
from raytrain_spot.storage.store import LocalStore
from tests.servers.fake_gcs import FakeGcsServer


class Clock:
    """A monotonic clock that only ``sleep`` moves; ``on_sleep`` runs at each wait (a holder renewing)."""

    def __init__(self):
        self.now = 1000.0
        self.on_sleep = lambda: None

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        self.on_sleep()


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


def test_a_second_driver_is_refused_while_the_first_renews_and_takes_over_once_it_goes_silent(store):
    clock = Clock()
    first = RunLease(store, "exp", ttl_s=60, clock=clock, sleep=clock.sleep)
    second = RunLease(store, "exp", ttl_s=60, clock=clock, sleep=clock.sleep)
    first.acquire()
    clock.on_sleep = lambda: clock.now % 20 < 3 and first.renew()  # the holder renews every 20 s
    with pytest.raises(RunInUse, match=r"run.name=exp is in use by another driver \(pid \d+ on"):
        second.acquire()
    assert clock.now - 1000 <= 25, "a renewing holder is seen within one renewal period"

    clock.on_sleep = lambda: None  # the first driver goes silent
    watching_from = clock.now
    second.acquire()
    assert clock.now - watching_from >= 60, "taken only after the lease stood still for its TTL on this clock"
    assert not first.renew() and first.lost.is_set(), "the first driver must learn that it lost the run"
    second.release()
    third = RunLease(store, "exp", ttl_s=60, clock=clock, sleep=clock.sleep)
    started = clock.now
    third.acquire()
    assert clock.now == started, "a released lease is free at once"


def test_a_holder_whose_wall_clock_is_behind_keeps_its_lease_while_it_renews(store):
    """Seen: a holder whose clock was 61 s behind looked expired although it had renewed 0 s ago."""
    key = "exp/lease.json"

    def renew_as_the_other_host():
        _, version = store.get_versioned(key)
        record = {"owner": "other", "host": "other-host", "pid": 1, "ttl_s": 60, "renewed_at": time.time() - 61}
        assert store.put_if_version(key, json.dumps(record).encode(), version)

    store.put_if_version(key, json.dumps({"owner": "other", "host": "other-host", "pid": 1, "ttl_s": 60,
                                          "renewed_at": time.time() - 61}).encode(), None)
    clock = Clock()
    clock.on_sleep = lambda: clock.now % 20 < 3 and renew_as_the_other_host()
    with pytest.raises(RunInUse, match="pid 1 on other-host"):
        RunLease(store, "exp", ttl_s=60, clock=clock, sleep=clock.sleep).acquire()
    assert json.loads(store.get_versioned(key)[0])["owner"] == "other"


def test_a_holder_that_cannot_renew_stops_itself_before_an_observer_takes_over(gcs_server):
    """Renewals that hang on storage (a server that accepts and never answers, longer than the TTL)."""
    bucket = f"lease-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(bucket)
    store = GcsStore(f"gs://{bucket}/runs", client=gcs_server.client(), emulator_host=gcs_server.endpoint)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        holder = RunLease(store, "exp", ttl_s=3)
        holder.acquire()
        holder.store = GcsStore(f"gs://{bucket}/runs", emulator_host=f"http://127.0.0.1:{silent.getsockname()[1]}",
                                request_timeout_s=60, retry_deadline_s=60)
        lost_at = []
        threading.Thread(target=lambda: lost_at.append(holder.lost.wait(10) and time.monotonic()), daemon=True).start()
        started = time.monotonic()
        holder.start_renewing()
        RunLease(store, "exp", ttl_s=3).acquire()  # the observer: the version stood still for 3 s
        taken_at = time.monotonic()
        assert holder.lost.is_set() and lost_at[0] < taken_at, "the holder must stop before it can be taken over"
        assert 2.0 <= lost_at[0] - started <= 3.0, "stopped at the TTL less the margin, not after a 60 s request"
        assert not holder.held()
    finally:
        silent.close()


def test_durable_publish_and_retention_check_the_lease(store, tmp_path):
    clock = Clock()
    first = RunLease(store, "exp", ttl_s=60, clock=clock, sleep=clock.sleep)
    first.acquire()
    tier = StoreTier("durable", store, "exp", keep_latest_k=2, lease_check=LeaseGuard(store, "exp", first.owner))
    (tmp_path / "state.pt").write_bytes(b"weights")

    def manifest(step):
        return Manifest(step=step, samples_seen=step, kind="periodic", world_size=1,
                        files={"state.pt": file_entry(str(tmp_path / "state.pt"))}, config={})

    for step in (1, 2):
        tier.commit(checkpoint_key("exp", step), {"state.pt": str(tmp_path / "state.pt")}, manifest(step))
    second = RunLease(store, "exp", ttl_s=60, clock=clock, sleep=clock.sleep)
    second.acquire()  # the first went silent for its TTL: the second owns the run
    with pytest.raises(LeaseLost, match="no longer this driver's lease"):
        tier.commit(checkpoint_key("exp", 3), {"state.pt": str(tmp_path / "state.pt")}, manifest(3))
    assert not store.exists(f"{checkpoint_key('exp', 3)}/{MANIFEST}"), "no publish after the lease was lost"
    tier.keep_latest_k = 1
    with pytest.raises(LeaseLost):
        tier.apply_retention()
    assert store.exists(f"{checkpoint_key('exp', 1)}/{MANIFEST}"), "no retention after the lease was lost"


def test_a_holder_counts_its_lease_lost_once_the_ttl_less_the_margin_passes_without_a_renewal(store):
    clock = Clock()
    lease = RunLease(store, "exp", ttl_s=60, clock=clock, sleep=clock.sleep)
    lease.acquire()
    clock.now += 45
    assert lease.held()
    clock.now += 6  # 51 s since the last renewal began: an observer may count it free 9 s from now
    assert not lease.held() and lease.lost.is_set() and not lease.renew()


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


def test_the_head_uploads_nothing_once_its_driver_lost_the_lease(tmp_path):
    from raytrain_spot.checkpoint.head import HeadStore
    from raytrain_spot.observe.events import EventLog

    durable = LocalStore(str(tmp_path / "durable"))
    clock = Clock()
    first = RunLease(durable, "exp", ttl_s=60, clock=clock, sleep=clock.sleep)
    first.acquire()
    head = HeadStore(str(tmp_path / "head"), "exp", durable.uri, keep_latest_k=2, milestone_every=0,
                     durable_interval_s=0.0, events=EventLog(), lease_owner=first.owner)

    def commit_on_the_head(step):
        data = f"weights of step {step}".encode()
        (tmp_path / "state.pt").write_bytes(data)
        manifest = Manifest(step=step, samples_seen=step, kind="periodic", world_size=1,
                            files={"state.pt": file_entry(str(tmp_path / "state.pt"))}, config={})
        head.write_chunk(checkpoint_key("exp", step), "state.pt", 0, data)
        head.commit(checkpoint_key("exp", step), manifest.to_json())
        return head.wait_for_uploads(timeout_s=30)

    assert commit_on_the_head(1) == 1
    RunLease(durable, "exp", ttl_s=60, clock=clock, sleep=clock.sleep).acquire()  # another driver took the run
    assert commit_on_the_head(2) == 1 and head.lease_lost
    assert not durable.exists(f"{checkpoint_key('exp', 2)}/{MANIFEST}"), "a head whose driver lost the run uploaded"
    assert head.steps() == [2, 1], "what the head holds stays on the head"
