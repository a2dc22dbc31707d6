"""The GCE metadata emulator, spoken to over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import threading
import time
from typing import Dict, Optional, Tuple
from urllib.parse import urlencode

import pytest

from raytrain_spot.simulator.metadata_server import MetadataEmulator, etag_of

GOOGLE = {"Metadata-Flavor": "Google"}


def get(host: str, key: str, *, headers: Optional[Dict[str, str]] = None, timeout_s: float = 5.0,
        **query: str) -> Tuple[int, str, http.client.HTTPResponse]:
    """GET /computeMetadata/v1/<key>; (status, body, response)."""
    path = "/computeMetadata/v1/" + key + ("?" + urlencode(query) if query else "")
    connection = http.client.HTTPConnection(host, timeout=timeout_s)
    try:
        connection.request("GET", path, headers=GOOGLE if headers is None else headers)
        response = connection.getresponse()
        return response.status, response.read().decode(), response
    finally:
        connection.close()


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


@pytest.fixture
def metadata():
    with MetadataEmulator(["node-1", "node-2"], project_number=42, zone="europe-west4-a") as emulator:
        yield emulator


def test_requests_without_the_metadata_flavor_header_are_forbidden(metadata):
    status, body, _ = get(metadata.host("node-1"), "instance/preempted", headers={})
    assert status == 403
    assert "Metadata-Flavor" in body
    status, _, _ = get(metadata.host("node-1"), "instance/preempted", headers={"Metadata-Flavor": "Amazon"})
    assert status == 403


def test_serves_instance_values_with_flavor_and_etag_headers(metadata):
    host = metadata.host("node-1")
    expected = {
        "instance/preempted": "FALSE",
        "instance/maintenance-event": "NONE",
        "instance/name": "node-1",
        "instance/zone": "projects/42/zones/europe-west4-a",
    }
    for key, value in expected.items():
        status, body, response = get(host, key)
        assert (status, body) == (200, value), key
        assert response.getheader("Metadata-Flavor") == "Google"
        assert response.getheader("ETag") == etag_of(value)
    status, instance_id, _ = get(host, "instance/id")
    assert status == 200 and instance_id.isdigit()
    assert get(metadata.host("node-2"), "instance/id")[1] != instance_id
    assert get(host, "instance/no-such-key")[0] == 404


def test_fault_injection_changes_the_values(metadata):
    host = metadata.host("node-1")
    metadata.preempt("node-1")
    metadata.set_maintenance("node-1", "TERMINATE_ON_HOST_MAINTENANCE")
    assert get(host, "instance/preempted")[1] == "TRUE"
    assert get(host, "instance/maintenance-event")[1] == "TERMINATE_ON_HOST_MAINTENANCE"
    with pytest.raises(ValueError, match="not one of"):
        metadata.set_maintenance("node-1", "REBOOT")
    with pytest.raises(KeyError, match="node-9"):
        metadata.preempt("node-9")


def test_etag_follows_the_value(metadata):
    host = metadata.host("node-1")
    first = get(host, "instance/maintenance-event")[2].getheader("ETag")
    assert get(host, "instance/maintenance-event")[2].getheader("ETag") == first
    metadata.set_maintenance("node-1", "MIGRATE_ON_HOST_MAINTENANCE")
    changed = get(host, "instance/maintenance-event")[2].getheader("ETag")
    assert changed != first
    metadata.set_maintenance("node-1", "NONE")
    assert get(host, "instance/maintenance-event")[2].getheader("ETag") == first


def test_long_poll_returns_promptly_on_change(metadata):
    host = metadata.host("node-1")
    threading.Timer(0.3, metadata.preempt, ["node-1"]).start()
    (status, body, response), elapsed = timed(get, host, "instance/preempted", wait_for_change="true",
                                              timeout_sec="10")
    assert (status, body) == (200, "TRUE")
    assert response.getheader("ETag") == etag_of("TRUE")
    assert 0.25 <= elapsed < 2.0


def test_long_poll_returns_the_current_value_on_timeout(metadata):
    (status, body, response), elapsed = timed(get, metadata.host("node-1"), "instance/preempted",
                                              wait_for_change="true", timeout_sec="1")
    assert (status, body) == (200, "FALSE")
    assert response.getheader("ETag") == etag_of("FALSE")
    assert 0.9 <= elapsed < 3.0


def test_long_poll_with_a_stale_etag_returns_at_once_and_with_the_current_one_waits(metadata):
    host = metadata.host("node-1")
    (_, body, _), elapsed = timed(get, host, "instance/preempted", wait_for_change="true",
                                  last_etag=etag_of("TRUE"), timeout_sec="10")
    assert body == "FALSE" and elapsed < 1.0
    threading.Timer(0.3, metadata.preempt, ["node-1"]).start()
    (_, body, _), elapsed = timed(get, host, "instance/preempted", wait_for_change="true",
                                  last_etag=etag_of("FALSE"), timeout_sec="10")
    assert body == "TRUE" and 0.25 <= elapsed < 2.0
    # A change that happened between two polls is not missed: the ETag still differs.
    (_, body, _), elapsed = timed(get, host, "instance/preempted", wait_for_change="true",
                                  last_etag=etag_of("FALSE"), timeout_sec="10")
    assert body == "TRUE" and elapsed < 1.0


def test_a_bad_timeout_is_rejected(metadata):
    status, _, _ = get(metadata.host("node-1"), "instance/preempted", wait_for_change="true", timeout_sec="soon")
    assert status == 400


def test_virtual_nodes_are_independent(metadata):
    assert metadata.host("node-1") != metadata.host("node-2")
    assert metadata.env("node-2") == {"GCE_METADATA_HOST": metadata.host("node-2")}
    threading.Timer(0.2, metadata.preempt, ["node-2"]).start()
    (_, body, _), elapsed = timed(get, metadata.host("node-1"), "instance/preempted", wait_for_change="true",
                                  timeout_sec="1")
    assert body == "FALSE" and elapsed >= 0.9, "node-1's long-poll must not wake for node-2's notice"
    assert get(metadata.host("node-2"), "instance/preempted")[1] == "TRUE"
    assert get(metadata.host("node-1"), "instance/name")[1] == "node-1"


def test_go_down_refuses_connections_until_it_comes_back_on_the_same_port(metadata):
    host = metadata.host("node-1")
    metadata.go_down()
    with pytest.raises(ConnectionRefusedError):
        get(host, "instance/preempted")
    with pytest.raises(ConnectionRefusedError):
        get(metadata.host("node-2"), "instance/preempted")
    metadata.come_back()
    assert metadata.host("node-1") == host
    assert get(host, "instance/preempted")[:2] == (200, "FALSE")


def test_go_down_drops_a_waiting_long_poll(metadata):
    threading.Timer(0.3, metadata.go_down).start()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        get(metadata.host("node-1"), "instance/preempted", wait_for_change="true", timeout_sec="10")


def test_a_hung_server_accepts_but_never_answers(metadata):
    metadata.go_down(hang=True, node="node-1")
    (_, elapsed) = timed(pytest.raises, TimeoutError, get, metadata.host("node-1"), "instance/preempted",
                         timeout_s=0.5)
    assert elapsed < 2.0
    assert get(metadata.host("node-2"), "instance/preempted")[:2] == (200, "FALSE")
    metadata.come_back()
    assert get(metadata.host("node-1"), "instance/preempted")[:2] == (200, "FALSE")


def test_answer_with_serves_errors_and_garbage_until_it_comes_back(metadata):
    metadata.answer_with(503, "backend unavailable")
    assert get(metadata.host("node-1"), "instance/preempted")[:2] == (503, "backend unavailable")
    metadata.answer_with(200, "<html>captive portal</html>", node="node-2")
    assert get(metadata.host("node-2"), "instance/preempted")[:2] == (200, "<html>captive portal</html>")
    metadata.come_back()
    assert get(metadata.host("node-1"), "instance/preempted")[:2] == (200, "FALSE")


def test_stall_delays_every_answer_for_its_duration(metadata):
    metadata.stall(1.0)
    (status, _, _), elapsed = timed(get, metadata.host("node-2"), "instance/preempted")
    assert status == 200 and 0.9 <= elapsed < 3.0
    (status, _, _), elapsed = timed(get, metadata.host("node-2"), "instance/preempted")
    assert status == 200 and elapsed < 0.5


def test_close_ends_waiting_long_polls_and_every_thread():
    emulator = MetadataEmulator(["node-1"])
    errors = []

    def long_poll():
        try:
            get(emulator.host("node-1"), "instance/preempted", wait_for_change="true", timeout_sec="30")
        except (http.client.HTTPException, OSError) as error:
            errors.append(error)

    client = threading.Thread(target=long_poll)
    client.start()
    time.sleep(0.3)
    _, elapsed = timed(emulator.close)
    client.join(timeout=5)
    assert elapsed < 2.0 and not client.is_alive()
    assert errors, "the long-poll should have been dropped, not answered"
    leftovers = [thread.name for thread in threading.enumerate()
                 if thread.name.startswith("metadata-") or "process_request" in thread.name]
    assert not leftovers
    with pytest.raises(ConnectionRefusedError):
        get(emulator.host("node-1"), "instance/preempted")
