"""Fail a GPU node's set-up when torch cannot use its GPUs: the last of ``worker_setup_commands``.

    python -m raytrain_spot.cluster.gpu_setup_check --expect-gpus 1

Exit status 0 when torch sees exactly the expected GPUs; 1 otherwise, with what is wrong and the
fix on stderr. ``ray up`` (and the autoscaler, for every replacement) stops a node's set-up at
the first command that fails, so a node whose torch cannot run on its driver never joins the
cluster as a GPU worker that trains on nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import List, Optional

from raytrain_spot.cluster.gpu_stack import CHOSEN_BUILD, driver_problem

DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"


@dataclass(frozen=True)
class GpuFacts:
    """What a node's torch and driver report."""

    torch_version: str
    torch_cuda: Optional[str]
    """``torch.version.cuda``: None for a CPU build."""
    cuda_available: bool
    device_count: int
    driver_version: Optional[str]
    """The loaded NVIDIA kernel module's version (``570.133.20``), None where no driver is loaded."""


def read_driver_version(path: str = DRIVER_VERSION_FILE) -> Optional[str]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


def gather() -> GpuFacts:
    import torch

    available = torch.cuda.is_available()
    return GpuFacts(torch_version=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=available,
                    device_count=torch.cuda.device_count() if available else 0,
                    driver_version=read_driver_version())


def problems(facts: GpuFacts, expect_gpus: int) -> List[str]:
    """Everything that keeps torch from using ``expect_gpus`` GPUs, each with its fix; empty when fine."""
    fix_build = (f'pip install "torch=={facts.torch_version.split("+")[0]}" --index-url '
                 f"https://download.pytorch.org/whl/{CHOSEN_BUILD}")
    found = []
    if facts.torch_cuda is None:
        found.append(f"torch {facts.torch_version} is a CPU build (torch.version.cuda is None). Fix: {fix_build}")
    if facts.driver_version is None:
        found.append(f"no NVIDIA driver is loaded ({DRIVER_VERSION_FILE} is missing). Fix: boot the node from an "
                     "image with the driver (sourceImage ...ubuntu-accelerator-2404-amd64-with-nvidia-570)")
    elif facts.torch_cuda is not None:
        mismatch = driver_problem(int(facts.driver_version.split(".")[0]), facts.torch_cuda)
        if mismatch:
            found.append(f"torch {facts.torch_version}: {mismatch} ({facts.driver_version}). Fix: {fix_build}, "
                         "or an image with a newer driver")
    if not facts.cuda_available and not found:
        found.append(f"torch.cuda.is_available() is False (torch {facts.torch_version}, CUDA {facts.torch_cuda}, "
                     f"driver {facts.driver_version}). Fix: run nvidia-smi on the node to see why the driver "
                     "refuses the GPU")
    if facts.cuda_available and facts.device_count != expect_gpus:
        found.append(f"torch sees {facts.device_count} GPU(s), the node type promises {expect_gpus} "
                     "(resources.GPU). Fix: make the node type's resources.GPU and --expect-gpus match its "
                     "machine type")
    return found


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.cluster.gpu_setup_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--expect-gpus", type=int, required=True,
                        help="GPUs the node type declares (its resources.GPU)")
    args = parser.parse_args(argv)
    if args.expect_gpus < 1:
        parser.error("--expect-gpus must be 1 or more: run this check on GPU node types only")
    facts = gather()
    found = problems(facts, args.expect_gpus)
    for problem in found:
        print(f"gpu_setup_check: {problem}", file=sys.stderr)
    if found:
        print("gpu_setup_check: this node cannot train on its GPUs; its set-up fails here.", file=sys.stderr)
        return 1
    print(f"gpu_setup_check: ok: torch {facts.torch_version} (CUDA {facts.torch_cuda}) on driver "
          f"{facts.driver_version} sees {facts.device_count} GPU(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
