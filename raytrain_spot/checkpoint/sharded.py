"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP).

With ``checkpoint.sharded=true`` every rank saves a share of the state instead of one rank
saving all of it. DDP replicas are identical, so the shares are a partition of the tensors,
balanced by bytes and computed by every rank alike without communication. Each rank then
copies only its share into host memory (the stall, and the host memory a save needs, are
about 1/world_size of a full snapshot) and writes it in the background as part of one DCP
checkpoint: ``__<rank>_0.distcp`` files plus DCP's ``.metadata``. Everything that is not a
tensor (optimizer hyperparameters, the loop state) goes into ``state.pt`` with the state's
structure, written by rank 0.

The tensors are keyed by fully qualified names (``get_state_dict``), so a checkpoint saved
by any number of ranks loads on any other number: loading reads DCP's metadata, allocates
every tensor it lists and fills them from whichever files hold them.

DCP stores its metadata with ``pickle``; it is read here with an unpickler that accepts only
DCP's own metadata types, so loading never unpickles arbitrary objects from a bucket. The
metadata must then describe exactly the shard files the manifest lists (``check_metadata``):
every byte range a bare file name of the manifest, inside that file, the ranges of each file
tiling it whole, every tensor chunk stored. So a foreign ``.metadata`` or a truncated shard is
refused before DCP reads a byte, and no name in it reaches outside the checkpoint's directory.
Tensors are read by DCP with ``torch.load(weights_only=True)`` and ``state.pt`` with
``load_state``.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from typing import Any, Dict, List, Mapping, Set, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from raytrain_spot.checkpoint.format import STATE_FILE, FileEntry, InvalidCheckpoint, load_state
from raytrain_spot.checkpoint.state import LOOP_STATE, LoopState, Stateful, load_training_state, training_state

METADATA_FILE = ".metadata"  # DCP's name for it
DCP_PARTS = ("model", "optimizer")
"""Parts saved through DCP's FQN-keyed state dicts; every other part as its own state dict."""
_SEPARATOR = "/"


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """Leaves of a nest of dicts, lists and tuples, keyed by their path."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    flat: Dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}{_SEPARATOR}{key}" if prefix else str(key)))
    return flat


def skeleton(tree: Any) -> Any:
    """The nest with every tensor replaced by None: what ``state.pt`` keeps of the state."""
    if isinstance(tree, torch.Tensor):
        return None
    if isinstance(tree, dict):
        return {key: skeleton(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(skeleton(value) for value in tree)
    return tree


def rebuild(tree: Any, tensors: Dict[str, torch.Tensor], prefix: str = "") -> Any:
    """The inverse of ``skeleton``: put each tensor back at its path."""
    if prefix in tensors:
        return tensors[prefix]
    if isinstance(tree, dict):
        return {key: rebuild(value, tensors, _join(prefix, key)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(rebuild(value, tensors, _join(prefix, i)) for i, value in enumerate(tree))
    return tree


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}{_SEPARATOR}{key}" if prefix else str(key)


def owned_keys(sizes: Dict[str, int], rank: int, world_size: int) -> Set[str]:
    """This rank's share: largest tensors first, each to the rank holding the fewest bytes so far."""
    loads = [0] * world_size
    owned: Set[str] = set()
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        owner = loads.index(min(loads))
        loads[owner] += sizes[key]
        if owner == rank:
            owned.add(key)
    return owned


def sharded_state(parts: Mapping[str, Stateful], loop: LoopState) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(every tensor keyed by path, the rest of the state): model and optimizer keyed by FQN, so a
    share loads into a model wrapped differently; the task's extra parts by their state dicts."""
    weights = parts["model"]
    model_state, optimizer_state = get_state_dict(weights.module, parts["optimizer"])
    tree = {**training_state({n: p for n, p in parts.items() if n not in DCP_PARTS}, loop),
            "model": weights.saved(model_state), "optimizer": optimizer_state}
    loop_state = tree.pop(LOOP_STATE)
    tensors = {key: value for key, value in flatten(tree).items() if isinstance(value, torch.Tensor)}
    return tensors, {"structure": skeleton(tree), LOOP_STATE: loop_state}


def tensor_bytes(tensors: Dict[str, torch.Tensor]) -> Dict[str, int]:
    return {key: t.numel() * t.element_size() for key, t in tensors.items()}


def write_shard(owned: Dict[str, torch.Tensor], directory: str, group) -> List[str]:
    """Collective over ``group``: write this rank's share into ``directory``; return the files written.

    Rank 0 (DCP's coordinator) also writes ``.metadata``, which covers every rank's share.
    """
    dcp.save(owned, storage_writer=dcp.FileSystemWriter(directory), process_group=group)
    return sorted(os.listdir(directory))


class _MetadataUnpickler(pickle.Unpickler):
    """Exactly the classes DCP's metadata pickles (as traced from ``dcp.save``), nothing else.

    Names are matched whole: pickle protocol 4 resolves a dotted name attribute by attribute,
    so allowing "anything under a module" would let ``<module>.os.system`` through.
    """

    _DCP_METADATA = "torch.distributed.checkpoint.metadata"
    _ALLOWED = {
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            if (module, name) in self._ALLOWED:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def parse_metadata(data: bytes) -> Metadata:
    """DCP's metadata from the bytes of ``.metadata``, by ``_MetadataUnpickler``."""
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{METADATA_FILE} holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read by ``_MetadataUnpickler``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(os.path.join(self.path, METADATA_FILE), "rb") as f:
            metadata = parse_metadata(f.read())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_metadata(metadata: Metadata, files: Mapping[str, FileEntry]) -> None:
    """Raise InvalidCheckpoint unless ``metadata`` describes exactly the shard files in ``files``
    (the manifest's): each stored range in a listed shard file (a bare name), the ranges of every
    shard file tiling it from its first byte to its last, and every chunk of every tensor stored."""
    try:
        _check_metadata(metadata, files)
    except (AttributeError, TypeError, ValueError) as error:  # fields of other types than DCP writes
        raise InvalidCheckpoint(f"malformed {METADATA_FILE}: {type(error).__name__}: {error}") from None


def _check_metadata(metadata: Metadata, files: Mapping[str, FileEntry]) -> None:
    shards = {name for name in files if name not in (METADATA_FILE, STATE_FILE)}
    ranges: Dict[str, List[Tuple[int, int]]] = {name: [] for name in shards}
    for index, info in (metadata.storage_data or {}).items():
        name = str(getattr(info, "relative_path", ""))
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if name not in shards:
            raise InvalidCheckpoint(f"{METADATA_FILE} stores {index.fqn!r} in {name!r}, "
                                    "not a shard file of the manifest")
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise InvalidCheckpoint(f"{METADATA_FILE} gives {index.fqn!r} the byte range {offset!r}+{length!r}")
        ranges[name].append((offset, length))
    for name, stored in ranges.items():
        end = 0
        for offset, length in sorted(stored):
            if offset != end:
                break
            end += length
        if end != files[name].size or not stored:
            raise InvalidCheckpoint(f"{METADATA_FILE} does not describe {name} ({files[name].size} bytes) byte for "
                                    "byte: a foreign metadata or a truncated shard")
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            for chunk in item.chunks:
                if MetadataIndex(fqn, chunk.offsets) not in metadata.storage_data:
                    raise InvalidCheckpoint(f"{METADATA_FILE} lists a chunk of {fqn!r} that no shard stores")


def read_checked_metadata(directory: str, files: Mapping[str, FileEntry]) -> Metadata:
    """DCP's metadata in ``directory``, read safely and checked against the manifest's ``files``."""
    if METADATA_FILE not in files or STATE_FILE not in files:
        raise InvalidCheckpoint(f"a sharded checkpoint needs {METADATA_FILE} and {STATE_FILE}")
    try:
        metadata = SafeFileSystemReader(directory).read_metadata()
    except Exception as error:  # a verified file that still fails to parse is as bad as a corrupt one
        raise InvalidCheckpoint(f"cannot read {METADATA_FILE}: {type(error).__name__}: {error}") from None
    check_metadata(metadata, files)
    return metadata


def load_sharded(paths: Dict[str, str], files: Mapping[str, FileEntry]) -> Dict[str, Any]:
    """The state of a verified sharded checkpoint (``files``: its manifest's): ``model``,
    ``optimizer`` (FQN-keyed), the other parts and the loop state."""
    directories = {os.path.dirname(path) for path in paths.values()}
    if len(directories) != 1:
        raise InvalidCheckpoint("a sharded checkpoint's files must be in one directory")
    directory = directories.pop()
    metadata = read_checked_metadata(directory, files)
    tensors = {key: torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in metadata.state_dict_metadata.items()
               if isinstance(item, TensorStorageMetadata)}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=SafeFileSystemReader(directory), no_dist=True)
    # DCP reports every failure inside a load (I/O, memory, a shard it cannot parse) as a
    # CheckpointException, a BaseException: verified bytes DCP cannot read are a damaged checkpoint.
    except (Exception, CheckpointException) as error:
        raise InvalidCheckpoint(f"cannot read the sharded state: {type(error).__name__}: {error}") from None
    rest = load_state(paths[STATE_FILE])
    state = rebuild(rest["structure"], tensors)
    return {**state, LOOP_STATE: rest[LOOP_STATE]}


def apply_sharded(parts: Mapping[str, Stateful], state: Dict[str, Any]) -> LoopState:
    """Load a sharded checkpoint's state into ``parts``; return its loop state."""
    weights = parts["model"]
    set_state_dict(weights.module, parts["optimizer"], model_state_dict=weights.completed(state["model"]),
                   optim_state_dict=state["optimizer"])
    others = {name: part for name, part in parts.items() if name not in DCP_PARTS}
    return load_training_state(others, {name: state[name] for name in state if name not in DCP_PARTS})
