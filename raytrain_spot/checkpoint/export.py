"""Model-only export of a checkpoint, in bf16 or fp16: half the bytes, no optimizer state.

    python -m raytrain_spot.checkpoint.export CHECKPOINT OUT [--dtype bf16|fp16|fp32]

CHECKPOINT is a checkpoint directory (``.../checkpoints/step_00000120``, local or ``gs://``),
single-file or sharded. It is verified against its manifest before anything is read. OUT
becomes a directory with ``model.pt`` and a ``manifest.json`` (kind ``export``), loadable
with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import torch

from raytrain_spot.checkpoint.format import InvalidCheckpoint, commit, fetch_verified, write_state
from raytrain_spot.checkpoint.manager import load_checkpoint_state
from raytrain_spot.storage.store import LocalStore, open_store

MODEL_FILE = "model.pt"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_model(checkpoint: str, out_dir: str, dtype: str) -> int:
    """Write the model weights of ``checkpoint`` to ``out_dir`` in ``dtype``; return the bytes written."""
    parent, name = checkpoint.rstrip("/").rsplit("/", 1)
    store = open_store(parent if "://" in parent else "file://" + os.path.abspath(parent))
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        manifest, paths = fetch_verified(store, name, scratch)
        state = load_checkpoint_state(manifest, paths)
        weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state["model"].items()}
        path = os.path.join(scratch, MODEL_FILE)
        entry = write_state(weights, path)
        exported = dataclasses.replace(manifest, kind="export", files={MODEL_FILE: entry}, compression="none",
                                       sharded=False)
        commit(LocalStore(os.path.dirname(os.path.abspath(out_dir))), os.path.basename(os.path.abspath(out_dir)),
               {MODEL_FILE: path}, exported)
    return entry.size


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.checkpoint.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory: path or gs:// URI")
    parser.add_argument("out", help="directory to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"{args.out} exists; choose a new directory")
    try:
        size = export_model(args.checkpoint, args.out, args.dtype)
    except InvalidCheckpoint as why:
        parser.exit(1, f"{args.checkpoint} is not a valid checkpoint: {why}\n")
    print(f"wrote {size / 1e6:.1f} MB of {args.dtype} weights to {args.out}/{MODEL_FILE}")


if __name__ == "__main__":
    main()
