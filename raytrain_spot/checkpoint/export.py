"""Model-only export of a checkpoint: no optimizer state, in bf16, fp16 or fp32.

    python -m raytrain_spot.checkpoint.export CHECKPOINT OUT [--dtype bf16|fp16|fp32]
    python -m raytrain_spot.checkpoint.export CHECKPOINT OUT --format pretrained [--adapter-only]

CHECKPOINT is a checkpoint directory (``.../checkpoints/step_00000120``, local or ``gs://``),
single-file or sharded. It is verified against its manifest before anything is read. OUT
becomes a directory with a ``manifest.json`` (kind ``export``) listing its files, and

* ``--format torch`` (the default): ``model.pt``, the state dict, loadable with ``weights_only=True``;
* ``--format pretrained``: the model in its library's own layout, written by the task's
  ``save_pretrained`` (a Hugging Face model: ``config.json``, ``model.safetensors`` and the
  processor, loadable by ``from_pretrained`` without this package). With LoRA, the adapters
  are merged into the weights, or with ``--adapter-only`` written alone (``adapter_config.json``,
  ``adapter_model.safetensors``: ``PeftModel.from_pretrained(base, OUT)``).

A checkpoint leaves out the parameters the run froze (checkpoint/state.py's ModelWeights), and
the pretrained format needs the model itself: both rebuild the model from the checkpoint's own
settings (its task, ``run.seed``), then load the checkpoint's weights into it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from typing import Any, Dict

import torch

from raytrain_spot.checkpoint.format import InvalidCheckpoint, Manifest, commit, fetch_verified, file_entry, write_state
from raytrain_spot.checkpoint.manager import load_checkpoint_state
from raytrain_spot.checkpoint.state import FROZEN_FINGERPRINT, ModelWeights
from raytrain_spot.config.errors import ConfigError
from raytrain_spot.storage.store import LocalStore, open_store

MODEL_FILE = "model.pt"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = ("torch", "pretrained")


def export_model(checkpoint: str, out_dir: str, dtype: str, form: str = "torch", adapter_only: bool = False) -> int:
    """Write the model of ``checkpoint`` to ``out_dir`` in ``dtype`` and ``form``; return the bytes written."""
    if adapter_only and form != "pretrained":
        raise ConfigError("--adapter-only: adapters are exported in the pretrained format. "
                          "Fix: add --format pretrained")
    parent, name = checkpoint.rstrip("/").rsplit("/", 1)
    store = open_store(parent if "://" in parent else "file://" + os.path.abspath(parent))
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        manifest, paths = fetch_verified(store, name, scratch)
        saved_model = load_checkpoint_state(manifest, paths)["model"]
        written = os.path.join(scratch, "out")
        os.makedirs(written)
        if form == "pretrained":
            task, model = rebuilt_model(manifest, saved_model)
            task.save_pretrained(model.to(DTYPES[dtype]), written, adapter_only)
        else:
            weights = (rebuilt_model(manifest, saved_model)[1].state_dict() if FROZEN_FINGERPRINT in saved_model
                       else saved_model)
            write_state({k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()},
                        os.path.join(written, MODEL_FILE))
        files = {os.path.relpath(os.path.join(root, f), written): os.path.join(root, f)
                 for root, _, names in os.walk(written) for f in names}
        entries = {name: file_entry(path) for name, path in files.items()}
        exported = dataclasses.replace(manifest, kind="export", files=entries, compression="none", sharded=False)
        commit(LocalStore(os.path.dirname(os.path.abspath(out_dir))), os.path.basename(os.path.abspath(out_dir)),
               files, exported)
    return sum(entry.size for entry in entries.values())


def rebuilt_model(manifest: Manifest, saved_model: Dict[str, Any]):
    """(task, model): the model as the run built it (its task and seed), the checkpoint's weights loaded."""
    from raytrain_spot.train.task import build_task

    if not manifest.config.get("task"):
        raise InvalidCheckpoint("its manifest holds no task settings, and the model must be rebuilt to export it "
                                "(it leaves out frozen parameters, or the pretrained format was asked for)")
    task = build_task(manifest.config["task"])
    torch.manual_seed(manifest.config["run"]["seed"])  # the seeded init of what the checkpoint leaves out
    model = task.build_model()
    ModelWeights(model).load_state_dict(saved_model)
    return task, model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.checkpoint.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory: path or gs:// URI")
    parser.add_argument("out", help="directory to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--format", choices=FORMATS, default="torch", dest="form")
    parser.add_argument("--adapter-only", action="store_true", help="LoRA: the adapters alone, not merged weights")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"{args.out} exists; choose a new directory")
    try:
        size = export_model(args.checkpoint, args.out, args.dtype, args.form, args.adapter_only)
    except InvalidCheckpoint as why:
        parser.exit(1, f"{args.checkpoint} is not a valid checkpoint: {why}\n")
    except ConfigError as error:
        parser.exit(2, f"Cannot export {args.checkpoint}: {error}\n")
    print(f"wrote {size / 1e6:.1f} MB of {args.dtype} weights ({args.form} format) to {args.out}")


if __name__ == "__main__":
    main()
