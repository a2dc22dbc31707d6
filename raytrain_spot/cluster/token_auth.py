"""Ray's token authentication for a cluster: the YAML copies the token to every node and starts every
Ray process in token mode; the token file here exists, readable by this user alone; making one."""

from __future__ import annotations

import os
import re
import secrets
import stat
from typing import List

from raytrain_spot.cluster.cluster_yaml import Problem
from raytrain_spot.cluster.watcher_checks import WATCHER_MODULE

TOKEN_PATH = "~/.ray/auth_token"
"""Ray's default token file: the YAMLs mount the laptop's copy there on every node."""
TOKEN_MODE = "RAY_AUTH_MODE=token"


def check_token_auth(config: dict) -> List[Problem]:
    """Every node gets the token, and every Ray process the YAML starts uses it: a Ray client in
    token mode without the token aborts, and a node started without token mode cannot join."""
    problems = []
    if TOKEN_PATH not in config.get("file_mounts", {}):
        problems.append(Problem("cluster", "file_mounts", f"do not copy Ray's token to {TOKEN_PATH} on the nodes, so "
                                "workers and their preemption watchers cannot join the token-authenticated head",
                                f"add `{TOKEN_PATH}: {TOKEN_PATH}` (and create it with python -m "
                                "raytrain_spot.cluster.check --new-token)"))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key, []):
            starts_ray = re.search(r"\bray start\b", command) or WATCHER_MODULE in command
            if starts_ray and TOKEN_MODE not in command:
                problems.append(Problem("cluster", key, f"start {command.split()[-1]!r}... without {TOKEN_MODE}, "
                                        "so it cannot join the token-authenticated cluster",
                                        f"prefix the command with {TOKEN_MODE}"))
    return problems


def check_local_token(config: dict) -> List[Problem]:
    """The token file the YAML mounts exists here, readable by this user alone."""
    source = config.get("file_mounts", {}).get(TOKEN_PATH)
    if source is None:
        return []
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        return [Problem("cluster", f"file_mounts.{TOKEN_PATH}", f"its source {path} does not exist, so `ray up` "
                        "fails to copy it", "create it with python -m raytrain_spot.cluster.check --new-token")]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        return [Problem("cluster", f"file_mounts.{TOKEN_PATH}", f"its source {path} is readable by others "
                        f"(mode {mode:o}), and the token lets anyone who has it run code on the cluster",
                        f"chmod 600 {path}")]
    return []


def new_token(path: str = TOKEN_PATH) -> bool:
    """Create the cluster token at ``path`` (mode 600) unless it exists; never print it."""
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, the format `ray get-auth-token --generate` writes
    return True
