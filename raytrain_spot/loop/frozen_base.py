"""Weights that never train, built once per node: the base of a LoRA fine-tuning.

Every worker group builds its model in new processes, and a restart pays for it again: the frozen
base is loaded from the model directory (or drawn from the seed when it has no weights), although it
comes out the same every time. The first process on a node to build it therefore publishes it into
the node's memory (``/dev/shm``, checksummed), and every later build on that node, in this group or
any later one, maps those bytes into a model built on the meta device instead: no load, no init,
and the node's ranks share the pages (a private mapping, so a rank that writes into a weight, as
DDP's first broadcast does, writes its own copy of that page).

A copy is read like any checkpoint tier: its size and CRC32C are checked before it is mapped, and
one that is damaged, cut short, gone, or holds other names or shapes than the model has is skipped
(logged) and replaced by a fresh build. A copy is named after a digest of everything that decides
the weights (``identity``: the model directory's files, dtype, seed, library versions), so a changed
model gets a new copy rather than a stale one, which replaces the last (one copy per node and
user: two runs with different bases on a node take turns). It is published only while the node's memory keeps
half its size free after it (Ray's object store lives there too), by one process at a time, through
a staging directory and a rename. Layout::

    <root>/raytrain-spot-bases-<uid>/<digest>/weights.pt   the tensors (``torch.save``, mapped when read)
    <root>/raytrain-spot-bases-<uid>/<digest>/entry.json   the identity, size and CRC32C
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from typing import Any, Callable, Dict, Optional

import torch

from raytrain_spot.checkpoint.format import FileEntry, InvalidCheckpoint, load_state, verify_file, write_state
from raytrain_spot.checkpoint.manager import MEMORY_SCRATCH
from raytrain_spot.checkpoint.scratch import scratch_prefix

logger = logging.getLogger(__name__)

WEIGHTS = "weights.pt"
ENTRY = "entry.json"
KEEP_FREE = 0.5
"""The share of the node's memory file system a published copy leaves free."""


def built_once_per_node(identity: Dict[str, Any], build: Callable[[], torch.nn.Module],
                        skeleton: Callable[[], torch.nn.Module], root: str = MEMORY_SCRATCH,
                        keep_free: float = KEEP_FREE) -> torch.nn.Module:
    """The module ``build`` builds, from the node's copy when it has a good one.

    ``identity`` names everything that decides the weights (JSON values); ``build`` builds the module
    the slow way, on the CPU; ``skeleton`` builds the same module on the meta device (shapes, no
    storage), which the copy's tensors then fill; a copy is published only while it leaves
    ``keep_free`` of ``root``'s file system free. A build draws from torch's generator and a mapping
    does not: a caller that draws next (a LoRA adapter's init) forks the generator around this call."""
    if not _is_private(copies_dir(root)):
        logger.warning("Not using %s for the frozen weights: another user owns it or can write it (it could plant "
                       "weights). Every build loads them from the model directory", copies_dir(root))
        return build()
    directory = copy_dir(root, identity)
    started = time.monotonic()
    try:
        module = _mapped(directory, skeleton)
    except InvalidCheckpoint as damage:
        logger.warning("The node's copy of the frozen weights in %s is not usable (%s): building them anew",
                       directory, damage)
        shutil.rmtree(directory, ignore_errors=True)  # its mappers keep their pages: unlinked, never rewritten
        module = None
    if module is not None:
        logger.info("Frozen weights mapped from the node's copy %s in %.2f s", directory, time.monotonic() - started)
        return module
    module = build()
    publish(directory, identity, module, keep_free)
    return module


def copies_dir(root: str = MEMORY_SCRATCH) -> str:
    """This user's directory of node copies under ``root``."""
    return os.path.join(root, f"raytrain-spot-bases-{os.getuid()}")


def copy_dir(root: str, identity: Dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(copies_dir(root), digest)


def module_tensors(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied ones under each of their names (stored once)."""
    return {name: tensor.detach() for name, tensor in (*module.named_parameters(remove_duplicate=False),
                                                       *module.named_buffers(remove_duplicate=False))}


def publish(directory: str, identity: Dict[str, Any], module: torch.nn.Module, keep_free: float) -> None:
    """Write ``module``'s tensors as the node's copy, unless one is there, another process is
    writing it, or the file system would keep less than ``keep_free`` of itself free."""
    tensors = module_tensors(module)
    size = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}.values())
    parent = os.path.dirname(directory)
    usage = shutil.disk_usage(parent)
    replaced = sum(os.path.getsize(path) for path in glob.glob(os.path.join(parent, "*", WEIGHTS)))
    if usage.free + replaced - size < keep_free * usage.total:
        logger.warning("Not keeping the frozen weights (%.2f GB) in %s: %.2f of its %.2f GB are free, and a copy "
                       "leaves %.0f%% free. Every build loads them from the model directory", size / 1e9, parent,
                       usage.free / 1e9, usage.total / 1e9, 100 * keep_free)
        return
    with open(os.path.join(parent, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another process of this node is publishing the same or another copy
        if os.path.exists(os.path.join(directory, ENTRY)):
            return
        staging = tempfile.mkdtemp(prefix=scratch_prefix("save"), dir=parent)
        try:
            entry = write_state(tensors, os.path.join(staging, WEIGHTS))
            with open(os.path.join(staging, ENTRY), "w") as f:
                json.dump({"identity": identity, "size": entry.size, "crc32c": entry.crc32c}, f)
            # One copy per node and user: the last one's memory comes back, and a killed publisher's staging.
            for name in os.listdir(parent):
                if name != ".lock" and os.path.join(parent, name) != staging:
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            os.rename(staging, directory)
            logger.info("Frozen weights (%.2f GB) kept in the node's memory: %s", size / 1e9, directory)
        except OSError as error:
            logger.warning("Could not keep the frozen weights in %s (%s): every build loads them from the model "
                           "directory", parent, error)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _is_private(path: str) -> bool:
    """``path`` is a directory of this user's that no one else may write (created so when missing)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    status = os.lstat(path)  # a link is not a directory here
    return stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid() and not status.st_mode & 0o022


def _mapped(directory: str, skeleton: Callable[[], torch.nn.Module]) -> Optional[torch.nn.Module]:
    """The skeleton filled with the verified copy's tensors; None when there is no copy."""
    try:
        with open(os.path.join(directory, ENTRY)) as f:
            entry = json.load(f)
        expected = FileEntry(size=int(entry["size"]), crc32c=str(entry["crc32c"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidCheckpoint(f"{ENTRY} is unreadable: {error!r}") from None
    weights = os.path.join(directory, WEIGHTS)
    if not os.path.exists(weights):
        raise InvalidCheckpoint(f"{WEIGHTS} is missing")
    verify_file(weights, expected, WEIGHTS)
    module = skeleton()
    _fill(module, load_state(weights))
    return module


def _fill(module: torch.nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` in place of ``module``'s meta parameters and buffers; tied parameters (one
    stored tensor under two names) stay one parameter."""
    expected = module_tensors(module)
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise InvalidCheckpoint(f"the copy holds other weights than the model has (missing {missing[:3]}, "
                                f"extra {extra[:3]})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise InvalidCheckpoint(f"{name} is {tuple(tensor.shape)} {tensor.dtype} in the copy, "
                                    f"{tuple(expected[name].shape)} {expected[name].dtype} in the model")
    parameters: Dict[tuple, torch.nn.Parameter] = {}
    for name, meta in module.named_parameters(remove_duplicate=False):
        tensor = tensors[name]
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())
        if key not in parameters:
            parameters[key] = torch.nn.Parameter(tensor, requires_grad=meta.requires_grad)
        _replace(module, name, parameters[key])
    for name, _ in module.named_buffers(remove_duplicate=False):
        _replace(module, name, tensors[name])  # an existing buffer stays one, persistent or not


def _replace(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(path), leaf, tensor)
