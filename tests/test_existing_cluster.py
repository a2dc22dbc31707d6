"""`cluster=existing`: the cluster to join is found as Ray finds it, checked in seconds, and joined
with what the user's shell lacks (loopback, token authentication)."""

import os
import socket
import time

import pytest

from raytrain_spot.config.errors import ConfigError
from raytrain_spot.config.schema import ClusterConfig
from raytrain_spot.cluster.embedded import prepare_existing_cluster, ray_address_file
from tests.conftest import run_main


@pytest.fixture
def shell(tmp_path):
    """A user's shell: its own HOME and Ray temp dir, none of Ray's variables set. The code under
    test sets variables for Ray itself; all of them are undone after the test, so that no later
    test's Ray cluster inherits token authentication from this one."""
    saved = dict(os.environ)
    os.environ.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=str(tmp_path / "raytmp"))
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def listening():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def _closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_the_address_file_is_the_one_ray_writes(shell):
    from ray._common.utils import get_ray_address_file

    assert ray_address_file() == get_ray_address_file(None)


def test_auto_with_no_cluster_started_here_names_the_file_and_the_fix(shell):
    with pytest.raises(ConfigError, match=r"ray_current_cluster is absent.*ray up -y cluster/local.yaml"):
        prepare_existing_cluster(ClusterConfig(address="auto"))


def test_auto_takes_the_recorded_address_and_turns_on_token_auth_when_a_token_is_here(shell, listening):
    os.makedirs(os.path.dirname(ray_address_file()))
    with open(ray_address_file(), "w") as f:
        f.write(listening)
    assert prepare_existing_cluster(ClusterConfig(address="auto")) == listening
    assert "RAY_AUTH_MODE" not in os.environ, "no token on this machine: no token authentication"

    os.makedirs(shell / "home" / ".ray")
    (shell / "home" / ".ray" / "auth_token").write_text("secret")
    assert prepare_existing_cluster(ClusterConfig(address="auto")) == listening
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_nothing_answering_fails_in_seconds_naming_the_address(shell):
    address = _closed_port()
    started = time.time()
    with pytest.raises(ConfigError, match=f"no Ray cluster answers at {address} \\(from cluster.address\\)"):
        prepare_existing_cluster(ClusterConfig(address=address))
    assert time.time() - started < 5


def test_the_main_command_stops_with_the_error_before_training(shell):
    address = _closed_port()
    started = time.time()
    result = run_main("+experiment=vlm", "cluster=existing", f"cluster.address={address}", cwd=str(shell), timeout=120,
                      env={"HOME": str(shell / "home"), "RAY_TMPDIR": str(shell / "raytmp"),
                           "GCE_METADATA_HOST": "127.0.0.1:1"})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "WARNING: GCE_METADATA_HOST is set: preemption notices are read from 127.0.0.1:1" in result.stderr
    assert f"no Ray cluster answers at {address}" in result.stderr and "Traceback" not in result.stderr
    assert time.time() - started < 60
