import os
import re
import sys

# Every Ray process the tests start binds to 127.0.0.1. Ray reads this at import time, so it
# is set here, before any test module imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(REPO, "conf")


@pytest.fixture
def compose():
    """Compose the real Hydra config the way the main command does."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from raytrain_spot.config import register_configs

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
