"""The embedded local cluster uses Ray's token authentication, as every other cluster here does: its
own driver and workers connect, a client without the token is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.cluster

CLUSTER = """
import sys, ray
from raytrain_spot.cluster.embedded import EmbeddedCluster, force_loopback
from raytrain_spot.config.schema import ClusterConfig
force_loopback()
cluster = EmbeddedCluster(ClusterConfig(num_worker_nodes=1))
ray.init(address=cluster.address, logging_level="ERROR")
assert ray.get(ray.remote(num_cpus=1)(lambda: 42).remote()) == 42  # a worker on a worker node connects
print(cluster.address, flush=True)
sys.stdin.read()
ray.shutdown()
cluster.shutdown()
"""
CLIENT = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print("connected", ray.cluster_resources(), flush=True)
"""


def _client(address: str, env: dict) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", CLIENT, address], capture_output=True, text=True, timeout=120,
                              env=env)
    except subprocess.TimeoutExpired as timeout:  # kept waiting, never let in
        return subprocess.CompletedProcess(timeout.cmd, -1, timeout.stdout or "", str(timeout.stderr or ""))


def test_a_client_without_the_token_is_refused_by_the_embedded_cluster(tmp_path):
    home, stranger_home = tmp_path / "home", tmp_path / "stranger"
    home.mkdir()
    stranger_home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")  # Ray's socket paths must stay short
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.update(RAY_TMPDIR=ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    with subprocess.Popen([sys.executable, "-c", CLUSTER], env={**base, "HOME": str(home)}, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as cluster:
        try:
            address = cluster.stdout.readline().strip()
            assert address, cluster.stderr.read()[-3000:] if cluster.poll() is not None else "no address"
            no_token = _client(address, {**base, "HOME": str(stranger_home)})
            assert "connected" not in no_token.stdout, "a client without the token joined the embedded cluster"
            assert "InvalidAuthToken" in no_token.stderr, no_token.stderr[-3000:]
            wrong = _client(address, {**base, "HOME": str(stranger_home), "RAY_AUTH_MODE": "token",
                                      "RAY_AUTH_TOKEN": "0" * 64})
            assert "connected" not in wrong.stdout and "InvalidAuthToken" in wrong.stderr, wrong.stderr[-3000:]
            token = home / ".ray" / "auth_token"
            assert oct(token.stat().st_mode & 0o777) == "0o600", "the token was made, readable by its user only"
            right = _client(address, {**base, "HOME": str(home), "RAY_AUTH_MODE": "token"})
            assert "connected" in right.stdout, right.stderr[-3000:]
            assert token.read_text() not in no_token.stderr + wrong.stderr + right.stderr + right.stdout
        finally:
            cluster.communicate("", timeout=60)
