"""What a restart's process pays to build a LoRA model: the frozen base loaded from the model
directory, against the node's copy mapped (``task.model.keep_base_in_node_memory``,
raytrain_spot/loop/frozen_base.py).

One model directory with weights (``--preset``'s configuration, a seeded random init saved with
``save_pretrained``: safetensors, as a downloaded model is), or with ``--no-weights`` the preset's
directory as it is (a config: the base is drawn from the seed at every build). Each measurement is a new Python
process, as each rank of a restarted group is: it imports the stack first (a warm process has),
seeds torch as the loop does, then times ``HuggingFaceVLMTask.build_model()`` with LoRA adapters
(``task.lora.r=--lora-r``). Three builds per repeat, in this order:

* ``load``: ``keep_base_in_node_memory=false``, the model directory every time (the baseline:
  ``from_pretrained``, then ``peft``);
* ``first``: the node's first build with the copy on: the load, then writing the copy (the copy
  removed before it);
* ``mapped``: a later build on the node: the copy verified (size, CRC32C) and mapped into a model
  built on the meta device, then ``peft``.

The model directory is in the page cache for every build (a surviving node read it at its first
start). Prints each build's seconds, the medians, and ``mapped`` against ``load``. CPU only:

    python bench/bench_frozen_base.py                              # smolvlm-256m, float32 (1 GB), ~2 minutes
    python bench/bench_frozen_base.py --preset smolvlm-500m        # 2 GB
    python bench/bench_frozen_base.py --no-weights                 # the seeded init
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import peft, transformers.modeling_utils  # a warm process has its imports
from raytrain_spot.tasks.hf_vlm.task import HfModelConfig, HuggingFaceVLMTask, LoraConfig

task = HuggingFaceVLMTask(model=HfModelConfig(path=sys.argv[2], dtype=sys.argv[3], keep_base_in_node_memory=sys.argv[4] == "1"),
                          lora=LoraConfig(r=int(sys.argv[5])))
task.model_dir()
torch.manual_seed(0)
started = time.perf_counter()
model = task.build_model()
built_s = time.perf_counter() - started
frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
print(json.dumps({"build_s": built_s, "frozen_bytes": frozen}))
"""


def build_once(model_dir: str, dtype: str, keep: bool, lora_r: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, REPO, model_dir, dtype, "1" if keep else "0", str(lora_r)],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_model_dir(preset: str, out: str, weights: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from raytrain_spot.tasks.hf_vlm.presets import write_preset

    write_preset(preset, out)
    if weights:
        torch.manual_seed(0)
        AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smolvlm-256m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-weights", action="store_true",
                        help="the preset's directory as it is: a config, the base drawn from the seed")
    args = parser.parse_args(argv)

    from raytrain_spot.loop.frozen_base import copies_dir

    scratch = tempfile.mkdtemp(prefix="bench-frozen-base-")
    try:
        model_dir = os.path.join(scratch, args.preset)
        write_model_dir(args.preset, model_dir, weights=not args.no_weights)
        copies = copies_dir()
        times = {"load": [], "first": [], "mapped": []}
        frozen_gb = 0.0
        for repeat in range(args.repeats):
            times["load"].append(build_once(model_dir, args.dtype, False, args.lora_r)["build_s"])
            shutil.rmtree(copies, ignore_errors=True)
            times["first"].append(build_once(model_dir, args.dtype, True, args.lora_r)["build_s"])
            mapped = build_once(model_dir, args.dtype, True, args.lora_r)
            times["mapped"].append(mapped["build_s"])
            frozen_gb = mapped["frozen_bytes"] / 1e9
            print(f"repeat {repeat + 1}: " + ", ".join(f"{kind} {seconds[-1]:.2f} s" for kind, seconds in times.items()),
                  flush=True)
        medians = {kind: statistics.median(seconds) for kind, seconds in times.items()}
        print(f"{args.preset} {args.dtype}{' (no weights: seeded init)' if args.no_weights else ''}, "
              f"LoRA r={args.lora_r}, frozen base {frozen_gb:.2f} GB, medians of {args.repeats}:")
        print(f"  from the model directory (load):            {medians['load']:.2f} s")
        print(f"  the node's first build, copy written:       {medians['first']:.2f} s")
        print(f"  from the node's copy (mapped):              {medians['mapped']:.2f} s")
        print(f"load_s={medians['load']:.3f} first_s={medians['first']:.3f} mapped_s={medians['mapped']:.3f} "
              f"speedup={medians['load'] / medians['mapped']:.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(copies_dir(), ignore_errors=True)


if __name__ == "__main__":
    main()
