"""The checkpoint tiers' directories on this machine: private to their user, and free of what a
killed worker left behind.

A save serializes into a ``save-<pid>-...`` directory and a restore copies into a
``restore-<pid>-...`` one (under the node-local root, or ``/dev/shm`` when that disk is full). A
worker killed mid-save never removes its own, so every checkpoint manager sweeps, at start,
those whose process is gone (and only its user's: ``/dev/shm`` is shared).
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from raytrain_spot.config.errors import ConfigError

logger = logging.getLogger(__name__)

_SCRATCH = re.compile(r"(save|restore)-(\d+)-")


def scratch_prefix(kind: str) -> str:
    """The name prefix of a ``save`` or ``restore`` scratch directory of this process."""
    return f"{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(root: str) -> int:
    """Remove the scratch directories under ``root`` of this user's processes that are gone; return how many."""
    removed = 0
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = _SCRATCH.match(name)
        path = os.path.join(root, name)
        try:
            mine = os.lstat(path).st_uid == os.getuid()
        except FileNotFoundError:
            continue
        if match and mine and os.path.isdir(path) and not _alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    if removed:
        logger.info("Removed %d scratch directories of killed workers from %s", removed, root)
    return removed


def private_dir(path: str, setting: str) -> str:
    """``path`` created with its missing parents readable by this user only (0700), and checked to
    be this user's up to the first directory root owns (``/tmp``, ``/home``): one that another
    user owns could read or replace the checkpoints, and is refused, naming ``setting``."""
    path = os.path.abspath(path)
    missing, directory = [], path
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
    directory = path
    while True:
        owner = os.stat(directory).st_uid
        if owner == 0 and owner != os.getuid() or directory == os.path.dirname(directory):
            break
        if owner != os.getuid():
            raise ConfigError(f"{setting}: {directory} belongs to another user (uid {owner}), who could read or "
                              f"replace this run's checkpoints. Fix: set {setting} to a directory of your own "
                              "(the default is under ~/.cache/raytrain_spot)")
        directory = os.path.dirname(directory)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
