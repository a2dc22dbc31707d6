"""Which torch build a GPU node's NVIDIA driver can run: the table, and how to read a YAML for it.

A CUDA build of torch carries its own CUDA runtime (the ``nvidia-*`` wheels); what the node must
provide is a driver new enough for that runtime's major version. The image family names the
driver branch (``...-with-nvidia-570``), the torch install command names the build (an index URL
``download.pytorch.org/whl/cu126``, or PyPI's default build when there is none).

Sources of the tables below:

- ``MIN_DRIVER_BRANCH``: NVIDIA, "CUDA Compatibility", Minor Version Compatibility, Table 1
  (https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html):
  CUDA 13.x needs driver >= 580, CUDA 12.x >= 525, CUDA 11.x >= 450.
- ``TORCH_CUDA_BUILDS``: pytorch/pytorch RELEASE.md, Release Compatibility Matrix, row 2.13
  (added in pytorch/pytorch#187075): stable CUDA 12.6 and 13.0, experimental 13.2; the build on
  PyPI is CUDA 13.0 since 2.11 (pytorch/pytorch#177975, "Move cuda stable 12.8->13.0").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional

MIN_DRIVER_BRANCH: Dict[int, int] = {11: 450, 12: 525, 13: 580}
"""CUDA major version -> the oldest driver branch that runs any runtime of that major version."""

TORCH_CUDA_BUILDS: Dict[str, Dict[str, str]] = {
    "2.13.0": {"cu126": "12.6", "cu130": "13.0", "cu132": "13.2"},
}
"""torch version -> its CUDA builds on download.pytorch.org (index suffix -> CUDA version)."""

PYPI_DEFAULT_CUDA: Dict[str, str] = {"2.13.0": "13.0"}
"""torch version -> the CUDA version of the Linux x86_64 build ``pip install torch`` takes from PyPI."""

CHOSEN_BUILD = "cu126"
"""The build the GCP YAMLs install on GPU workers: CUDA 12.6 runs on the images' 570 driver
branch, and covers every GPU the YAMLs use (T4 sm_75 to H100 sm_90)."""

_DRIVER_IN_IMAGE = re.compile(r"with-nvidia-(\d+)")
_TORCH_PIN = re.compile(r"""["']?torch==([0-9][0-9a-z.]*)(?:\+(\w+))?["']?""")
_INDEX_URL = re.compile(r"--(?:extra-)?index-url[= ]\S*/whl/(cpu|cu\d+)\b")


@dataclass(frozen=True)
class TorchBuild:
    """The torch a setup command installs."""

    version: str
    cuda: Optional[str]
    """CUDA version of the build ("12.6"), None for the CPU build."""
    where: str
    """How the command picks it, for messages: ``PyPI's default build`` or the index."""


def driver_branch_of_image(source_image: str) -> Optional[int]:
    """The NVIDIA driver branch an image family ships (``...-with-nvidia-570`` -> 570); None if it names none."""
    match = _DRIVER_IN_IMAGE.search(source_image or "")
    return int(match.group(1)) if match else None


def torch_build_of(command: str) -> Optional[TorchBuild]:
    """The torch build a ``pip install "torch==X" [--index-url .../whl/cuNNN]`` command installs; None if it installs no torch."""
    pin = _TORCH_PIN.search(command)
    if pin is None or "pip install" not in command:
        return None
    version, local = pin.group(1), pin.group(2)
    index = _INDEX_URL.search(command)
    suffix = local or (index.group(1) if index else None)
    if suffix == "cpu":
        return TorchBuild(version, None, f"the CPU build ({index.group(0) if index else '+cpu'})")
    if suffix is not None:
        cuda = TORCH_CUDA_BUILDS.get(version, {}).get(suffix)
        if cuda is None:
            cuda = f"{suffix[2:-1]}.{suffix[-1]}"  # cu126 -> 12.6, for versions the table lacks
        return TorchBuild(version, cuda, f"the {suffix} build from download.pytorch.org")
    return TorchBuild(version, PYPI_DEFAULT_CUDA.get(version), "PyPI's default build")


def cuda_major(cuda: str) -> int:
    return int(cuda.split(".", 1)[0])


def driver_problem(driver_branch: int, cuda: str) -> Optional[str]:
    """Why a driver branch cannot run a CUDA runtime, or None when it can."""
    major = cuda_major(cuda)
    needed = MIN_DRIVER_BRANCH.get(major)
    if needed is None:
        return f"CUDA {cuda} is not in the table of driver requirements (raytrain_spot/cluster/gpu_stack.py)"
    if driver_branch < needed:
        return (f"a CUDA {cuda} runtime needs NVIDIA driver {needed} or newer (NVIDIA's CUDA minor version "
                f"compatibility table), but the driver is branch {driver_branch}")
    return None
