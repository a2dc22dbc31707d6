"""Model-only export of a checkpoint: no optimizer state, in bf16, fp16 or fp32.

    python -m raytrain_spot.export CHECKPOINT OUT [--dtype bf16|fp16|fp32] [--config RUN_CONFIG]
    python -m raytrain_spot.export CHECKPOINT OUT --format pretrained [--adapter-only] --config RUN_CONFIG

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
the pretrained format needs the model itself: both rebuild the model, then load the checkpoint's
weights into it. The task that rebuilds it comes from the user, never from storage: RUN_CONFIG
is the run's own settings as the main command saved them (``outputs/<run.name>/.hydra/config.yaml``).
The checkpoint's stored settings (task and ``run.seed``) are only compared with them, and a
difference is refused: no module a manifest names is ever imported, so whoever can write the
bucket cannot choose code or settings (paths, cache directories) for this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from typing import Any, Dict, Optional

import torch

from raytrain_spot.checkpoint.format import InvalidCheckpoint, Manifest, commit, fetch_verified, file_entry, write_state
from raytrain_spot.checkpoint.manager import load_checkpoint_state
from raytrain_spot.checkpoint.state import FROZEN_FINGERPRINT, ModelWeights
from raytrain_spot.config.errors import ConfigError
from raytrain_spot.storage import open_store
from raytrain_spot.storage.store import LocalStore

MODEL_FILE = "model.pt"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = ("torch", "pretrained")


def export_model(checkpoint: str, out_dir: str, dtype: str, form: str = "torch", adapter_only: bool = False,
                 config: Optional[Dict[str, Any]] = None) -> int:
    """Write the model of ``checkpoint`` to ``out_dir`` in ``dtype`` and ``form``; return the bytes
    written. ``config``: the user's settings (``task``, ``run.seed``; see ``run_config``), needed
    where the model must be rebuilt."""
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
            task, model = rebuilt_model(manifest, saved_model, config)
            task.save_pretrained(model.to(DTYPES[dtype]), written, adapter_only)
        else:
            weights = (rebuilt_model(manifest, saved_model, config)[1].state_dict() if FROZEN_FINGERPRINT in saved_model
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


def rebuilt_model(manifest: Manifest, saved_model: Dict[str, Any], config: Optional[Dict[str, Any]]):
    """(task, model): the model built by the user's task (``config``: its ``task`` and ``run.seed``),
    the checkpoint's weights loaded. The checkpoint's own settings must equal the user's, but for
    the task's ``resumable_settings``; nothing they name is imported."""
    from raytrain_spot.checkpoint.resume import differences
    from raytrain_spot.loop.task import build_task

    if not config or not config.get("task"):
        raise ConfigError("the model must be rebuilt (the checkpoint leaves out frozen parameters, or the "
                          "pretrained format was asked for), and only the run's own settings rebuild it. Fix: "
                          "add --config outputs/<run.name>/.hydra/config.yaml (the run's settings)")
    task = build_task(config["task"])
    if manifest.config and (changed := differences(manifest.config, config, task.resumable_settings)):
        raise ConfigError(f"the checkpoint (step {manifest.step}) was saved with other settings than the ones given: "
                          f"{'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}. Fix: give the settings "
                          "of the run that saved it (--config outputs/<run.name>/.hydra/config.yaml)")
    torch.manual_seed(config["run"]["seed"])  # the seeded init of what the checkpoint leaves out
    model = task.build_model()
    ModelWeights(model).load_state_dict(saved_model)
    return task, model


def run_config(path: str) -> Dict[str, Any]:
    """The task and ``run.seed`` of a run's settings file (``outputs/<run.name>/.hydra/config.yaml``)."""
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.load(path)
        return {"task": OmegaConf.to_container(saved.task, resolve=True), "run": {"seed": saved.run.seed}}
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same bad input
        raise ConfigError(f"--config {path}: not a run's settings ({type(error).__name__}: {error}). Fix: give "
                          "outputs/<run.name>/.hydra/config.yaml of the run that saved the checkpoint") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory: path or gs:// URI")
    parser.add_argument("out", help="directory to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--format", choices=FORMATS, default="torch", dest="form")
    parser.add_argument("--adapter-only", action="store_true", help="LoRA: the adapters alone, not merged weights")
    parser.add_argument("--config", help="the run's settings (outputs/<run.name>/.hydra/config.yaml): the task "
                        "that rebuilds the model, compared with the checkpoint's settings")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"{args.out} exists; choose a new directory")
    try:
        config = run_config(args.config) if args.config else None
        size = export_model(args.checkpoint, args.out, args.dtype, args.form, args.adapter_only, config)
    except InvalidCheckpoint as why:
        parser.exit(1, f"{args.checkpoint} is not a valid checkpoint: {why}\n")
    except ConfigError as error:
        parser.exit(2, f"Cannot export {args.checkpoint}: {error}\n")
    print(f"wrote {size / 1e6:.1f} MB of {args.dtype} weights ({args.form} format) to {args.out}")


if __name__ == "__main__":
    main()
