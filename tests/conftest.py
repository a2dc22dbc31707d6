import importlib.util
import os
import re
import sys
import time

import pytest

from raytrain_spot.cluster.embedded import force_loopback
from raytrain_spot.observe.records import to_line

# Every Ray process the tests start binds to 127.0.0.1, as the embedded cluster's do. Ray reads
# the setting at import time, so it is made here, before any test module imports ray.
force_loopback()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(REPO, "conf")


def load_bench(name: str):
    """A benchmark script of bench/ as a module (bench/ is scripts, not a package the tests import)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def compose():
    """Compose the real Hydra config the way the main command does."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from raytrain_spot.config.schema import register_configs

    register_configs()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))

    return _compose


def run_main(*overrides: str, cwd: str, timeout: float = 600, env: dict | None = None):
    """Run ``python -m raytrain_spot.run`` as a user would; return the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "raytrain_spot.run", *overrides],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


# Lines only Ray itself prints: worker/actor output relayed to the driver, log deduplication
# notices, C++ log lines and stack traces. A run's console shows none of them by default.
RAY_INTERNAL = re.compile(r"\(\w+ pid=\d+(, ip=[\d.]+)?\)|\b\w+\.cc:\d+|RAY_DEDUP_LOGS|\[repeated \d+x|"
                          r"^\s*@\s+0x[0-9a-f]+|^\*\*\* ")


def ray_internal_lines(output: str) -> list:
    return [line for line in output.splitlines() if RAY_INTERNAL.search(line)]


def processes_of(ray_tmp: str) -> list:
    """Processes still running with this run's RAY_TMPDIR: the driver's cluster, its watchers, anything it started."""
    import psutil

    left = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.environ().get("RAY_TMPDIR") == ray_tmp or ray_tmp in " ".join(process.info["cmdline"] or []):
                left.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


def assert_clean_audit(run_name: str, storage_uri: str, head_dir: str, local_dir: str, last_step: int,
                       ray_tmp: str | None = None, damaged: tuple = ()) -> None:
    """The chaos suite's closing check: every committed checkpoint on every tier verifies, the
    newest valid one is at least the last reported step, and no process of the run is left.

    ``damaged``: (tier, step) copies the scenario itself damaged; the audit must report exactly
    those as invalid (and a restore must have skipped them)."""
    from raytrain_spot.checkpoint.verify import INVALID, VALID, audit, format_findings

    findings = audit(run_name, storage_uri, head_dir, local_dir)
    invalid = {(f.tier, f.step) for f in findings if f.status == INVALID}
    assert invalid == set(damaged), format_findings(findings)
    newest = max((f.step for f in findings if f.status == VALID), default=None)
    assert newest is not None and newest >= last_step, f"newest valid checkpoint {newest} < {last_step}"
    if ray_tmp is not None:
        import time

        deadline = time.time() + 15  # a driver's cluster takes a moment to go after it exits
        while (left := processes_of(ray_tmp)) and time.time() < deadline:
            time.sleep(0.5)
        assert left == [], f"processes left behind: {left}"


def stored_path(store, key: str, name: str) -> str:
    """Where a local store keeps file ``name`` of the committed checkpoint at ``key`` (the tiers
    store each file under a writer-unique name that the manifest lists)."""
    from raytrain_spot.checkpoint.format import read_manifest, stored_key

    return store.local_path(stored_key(key, name, read_manifest(store, key).files[name]))


@pytest.fixture(scope="module")
def single_rank_group(tmp_path_factory):
    """A one-rank gloo process group for a module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Recorder:
    """An event log that keeps what is emitted, for tests without an event-log actor."""

    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(to_line(record, time.time()))  # as the event-log actor's records

    emit_soon = emit

    def last_step(self):
        return next((r["step"] for r in reversed(self.records) if r["ev"] == "step"), None)

    def send(self):
        pass

    def flush(self):
        pass
