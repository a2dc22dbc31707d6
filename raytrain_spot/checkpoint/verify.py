"""Check every checkpoint of a run on every tier before trusting it: ``python -m raytrain_spot.checkpoint.verify RUN``.

    python -m raytrain_spot.checkpoint.verify vlm-exp1                          # outputs/storage, the head and node-local dirs
    python -m raytrain_spot.checkpoint.verify gs://my-bucket/raytrain-spot/vlm-exp1
    python -m raytrain_spot.checkpoint.verify vlm-exp1 --storage gs://my-bucket/raytrain-spot

For each step directory on each tier: the manifest (its step that of its directory), every
file's size and CRC32C, and for a sharded checkpoint DCP's metadata, read with the same safe
unpickler and checked as a restore does: it must describe exactly the shard files the manifest
lists, byte for byte (nothing is loaded into a model, no code from the checkpoint runs). A directory without a manifest is
a save that never committed (``partial``): it is not an error, a restore never considers it.
Exit status: 0 every committed checkpoint is valid, 1 some committed checkpoint is invalid
(a restore skips it), 2 no checkpoint of the run was found.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from raytrain_spot.checkpoint.format import checkpoint_key, fetch_verified, listed_steps
from raytrain_spot.config.schema import CheckpointingConfig, StorageConfig
from raytrain_spot.storage import open_store
from raytrain_spot.storage.store import LocalStore, Store

VALID, PARTIAL, INVALID = "valid", "partial", "INVALID"


@dataclass(frozen=True)
class Finding:
    tier: str
    step: int
    status: str
    """valid, partial (no manifest: never committed) or INVALID (committed, but must not be loaded)."""
    kind: str = ""
    detail: str = ""


def check_checkpoint(store: Store, run_name: str, step: int) -> Tuple[str, str, str]:
    """(status, kind, detail) of one step directory."""
    from raytrain_spot.checkpoint.sharded import METADATA_FILE, read_checked_metadata

    key = checkpoint_key(run_name, step)
    if not store.exists(f"{key}/manifest.json"):
        return PARTIAL, "", "no manifest: a save that never committed"
    with tempfile.TemporaryDirectory(prefix="verify-") as scratch:
        try:
            manifest, paths = fetch_verified(store, key, scratch)
            if manifest.sharded:
                read_checked_metadata(os.path.dirname(paths.get(METADATA_FILE, "")), manifest.files)
        except Exception as why:  # noqa: BLE001 - whatever it is, this copy must not be loaded
            return INVALID, "", f"{type(why).__name__}: {why}"
    size = sum(entry.size for entry in manifest.files.values())
    return VALID, manifest.kind, f"{len(manifest.files)} files, {size / 1e6:.1f} MB, world size {manifest.world_size}"


def check_tier(tier: str, store: Store, run_name: str) -> List[Finding]:
    try:
        steps = listed_steps(store, run_name)
    except Exception as why:  # noqa: BLE001 - an unreachable tier is a finding, not a crash
        return [Finding(tier, -1, INVALID, detail=f"cannot list: {type(why).__name__}: {why}")]
    return [Finding(tier, step, *check_checkpoint(store, run_name, step)) for step in steps]


def run_tiers(run_name: str, storage_uri: str, head_dir: str, local_dir: str) -> List[Tuple[str, Store]]:
    """Every tier that may hold the run's checkpoints: durable storage, the head's dir, each node's dir."""
    checkpoint = CheckpointingConfig(head_dir=head_dir, local_dir=local_dir)
    tiers: List[Tuple[str, Store]] = [("durable", open_store(storage_uri))]
    head_root = checkpoint.head_root(storage_uri)
    if os.path.isdir(head_root):
        tiers.append(("head", LocalStore(head_root)))
    for node_root in sorted(glob.glob(checkpoint.local_root(storage_uri, "*"))):
        node_id = os.path.relpath(node_root, os.path.expanduser(local_dir)).split(os.sep)[0]
        tiers.append((f"local:{node_id[:8]}", LocalStore(node_root)))
    return tiers


def audit(run_name: str, storage_uri: str, head_dir: str = CheckpointingConfig.head_dir,
          local_dir: str = CheckpointingConfig.local_dir) -> List[Finding]:
    """Every checkpoint of ``run_name`` on every tier, newest first per tier."""
    return [finding for tier, store in run_tiers(run_name, storage_uri, head_dir, local_dir)
            for finding in check_tier(tier, store, run_name)]


def format_findings(findings: Sequence[Finding]) -> str:
    rows = [("step", "kind", "tier", "status", "detail")]
    rows += [(str(f.step) if f.step >= 0 else "-", f.kind or "-", f.tier, f.status, f.detail) for f in findings]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
                     for row in rows)


def split_target(target: str, storage: Optional[str]) -> Tuple[str, str]:
    """(run name, storage URI) from ``RUN`` or ``URI/RUN``."""
    if "://" in target:
        storage_uri, _, run_name = target.rstrip("/").rpartition("/")
        return run_name, storage_uri
    if storage is None:
        storage = StorageConfig().resolved_uri(os.getcwd())
    elif "://" not in storage:
        storage = "file://" + os.path.abspath(storage)
    return target, storage


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.checkpoint.verify", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 all valid, 1 an invalid committed checkpoint, "
                                            "2 no checkpoint found.")
    parser.add_argument("target", help="a run name (with --storage), or STORAGE_URI/RUN_NAME")
    parser.add_argument("--storage", help="storage.uri of the run (default: the local default, outputs/storage)")
    parser.add_argument("--head-dir", default=CheckpointingConfig.head_dir,
                        help="checkpoint.head_dir (default %(default)s)")
    parser.add_argument("--local-dir", default=CheckpointingConfig.local_dir,
                        help="checkpoint.local_dir (default %(default)s)")
    args = parser.parse_args(argv)
    run_name, storage_uri = split_target(args.target, args.storage)
    findings = audit(run_name, storage_uri, args.head_dir, args.local_dir)
    if not findings:
        print(f"no checkpoint of run {run_name!r} in {storage_uri}, {args.head_dir} or {args.local_dir}",
              file=sys.stderr)
        return 2
    print(format_findings(findings))
    invalid = [f for f in findings if f.status == INVALID]
    valid = [f for f in findings if f.status == VALID]
    newest = max((f.step for f in valid), default=None)
    print(f"{len(valid)} valid, {sum(f.status == PARTIAL for f in findings)} partial, {len(invalid)} invalid; "
          f"a resume starts from step {newest}" if newest is not None else "no valid checkpoint: a resume starts over")
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
