"""The first run on a GPU machine, torch only (the GPU machine has no Ray): every GPU check in order,
each in its own process, with a summary and every figure in one JSON file.

1. ``driver``: torch's CUDA build against the loaded driver, and the GPUs torch sees
   (``raytrain_spot.cluster.gpu_setup_check``, what ends every GPU worker's set-up);
2. ``train-step``: the real train step with NCCL, the per-step agreement and the checkpoint
   snapshot's stall (``bench/gpu_check.py``);
3. ``checkpoint``: the checkpoint manager on the device, saving while training continues and
   restoring exactly, single-file and sharded (``bench/gpu_checkpoint.py``);
4. ``survivor-commit``: a survivor's commit of its last completed step while its training stream
   is blocked, as by a collective a powered-off peer never joins (``bench/gpu_survivor_commit.py``);
5. ``hf-256m-fp32``: the Hugging Face step at the 256M preset in fp32 (``bench/gpu_hf_step.py``);
6. ``hf-2.2b-bf16``: the 2.2B preset in bf16 with gradient checkpointing.

    python bench/gpu_first_run.py --out first-run.json          # on the GPU machine
    python bench/gpu_first_run.py --small --out /tmp/first.json # the CPU, tiny sizes (the tests)

With ``--small`` on a machine without CUDA, the driver stage is skipped and the others run on the
CPU at tiny sizes, so the script itself is tested where there is no GPU. Exit status 0 when
every stage that ran passed, 1 otherwise; a stage's failure does not stop the later ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Stage:
    name: str
    command: List[str]
    timeout_s: float


@dataclass
class Outcome:
    name: str
    status: str
    """``ok``, ``failed``, ``timed out`` or ``skipped``."""
    seconds: float
    figures: Optional[dict]
    """The stage's last JSON line, when it printed one."""
    tail: str
    """The last lines of its output, for a failure."""


def stages(small: bool, cuda: bool) -> List[Stage]:
    python = [sys.executable]
    device = ["--device", "cuda" if cuda else "cpu"]
    gpus = str(max(torch.cuda.device_count(), 1)) if cuda else "1"
    if small:
        return [
            Stage("train-step", python + ["bench/gpu_check.py", *device, "--model", "tiny", "--steps", "2",
                                          "--batch", "8", "--micro-batch", "4", "--state-gb", "0.01"], 600),
            Stage("checkpoint", python + ["bench/gpu_checkpoint.py", *device, "--width", "64", "--layers", "2"], 300),
            Stage("survivor-commit", python + ["bench/gpu_survivor_commit.py", *device, "--width", "64", "--layers", "2",
                                               "--blocked-s", "5"], 120),
            Stage("hf-tiny-fp32", python + ["bench/gpu_hf_step.py", *device, "--preset", "tiny-idefics3",
                                            "--dtype", "float32", "--batch", "2", "--micro-batch", "2",
                                            "--steps", "1", "--warmup", "1"], 600),
        ]
    return [
        Stage("driver", python + ["-m", "raytrain_spot.cluster.gpu_setup_check", "--expect-gpus", gpus], 120),
        Stage("train-step", python + ["bench/gpu_check.py", *device], 1200),
        Stage("checkpoint", python + ["bench/gpu_checkpoint.py", *device], 900),
        Stage("survivor-commit", python + ["bench/gpu_survivor_commit.py", *device], 300),
        Stage("hf-256m-fp32", python + ["bench/gpu_hf_step.py", *device, "--preset", "smolvlm-256m",
                                        "--dtype", "float32"], 1800),
        Stage("hf-2.2b-bf16", python + ["bench/gpu_hf_step.py", *device, "--preset", "smolvlm-2.2b",
                                        "--dtype", "bfloat16", "--gradient-checkpointing", "--batch", "4",
                                        "--micro-batch", "2"], 3600),
    ]


def last_json(output: str) -> Optional[dict]:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run(stage: Stage) -> Outcome:
    started = time.perf_counter()
    try:
        result = subprocess.run(stage.command, cwd=ROOT, capture_output=True, text=True, timeout=stage.timeout_s)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (
            expired.stdout or "")
        return Outcome(stage.name, "timed out", round(time.perf_counter() - started, 1), None, output[-2000:])
    output = result.stdout + result.stderr
    return Outcome(stage.name, "ok" if result.returncode == 0 else "failed", round(time.perf_counter() - started, 1),
                   last_json(result.stdout), output[-2000:])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_first_run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (the CPU tests); the driver stage only with CUDA")
    parser.add_argument("--out", default="gpu-first-run.json", help="where every stage's figures go (default %(default)s)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        print("no CUDA device: torch.cuda.is_available() is False. Run python -m raytrain_spot.cluster.gpu_setup_check "
              "--expect-gpus 1 for the reason, or --small to run the stages on the CPU.", file=sys.stderr)
        return 1
    outcomes = []
    if args.small and cuda:
        outcomes.append(run(Stage("driver", [sys.executable, "-m", "raytrain_spot.cluster.gpu_setup_check",
                                             "--expect-gpus", str(torch.cuda.device_count())], 120)))
    elif args.small:
        outcomes.append(Outcome("driver", "skipped", 0.0, None, "no CUDA device"))
    for stage in stages(args.small, cuda):
        outcome = run(stage)
        outcomes.append(outcome)
        print(f"{outcome.name}: {outcome.status} ({outcome.seconds:.0f} s)", flush=True)
        if outcome.status not in ("ok", "skipped"):
            print("    " + "\n    ".join(outcome.tail.strip().splitlines()[-15:]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "cuda": torch.version.cuda,
                   "device": torch.cuda.get_device_name(0) if cuda else "cpu", "small": args.small,
                   "stages": [asdict(o) for o in outcomes]}, f, indent=1)
    failed = [o.name for o in outcomes if o.status not in ("ok", "skipped")]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} stages ok or skipped; figures in {args.out}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
