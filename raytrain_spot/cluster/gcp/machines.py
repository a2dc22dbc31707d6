"""What GCE accepts about GPUs on machine types, as far as a cluster YAML needs to know.

- Accelerator-optimized series (A2, A3, A4, G2, G4) come with their GPUs: the machine type
  implies model and count, and ``guestAccelerators`` must not be given.
- N1 is the series that takes attached GPUs (``guestAccelerators``): T4, V100, P100, P4.
- a3-highgpu-1g/-2g/-4g exist only as Spot (or flex-start) VMs, not on demand.
- A VM with GPUs cannot live-migrate: ``onHostMaintenance`` must be ``TERMINATE``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

ACCELERATOR_OPTIMIZED_PREFIXES = ("a2-", "a3-", "a4-", "g2-", "g4-")
ATTACHABLE_GPUS = {
    "nvidia-tesla-t4": "T4",
    "nvidia-tesla-v100": "V100",
    "nvidia-tesla-p100": "P100",
    "nvidia-tesla-p4": "P4",
}
SPOT_ONLY_MACHINES = frozenset({"a3-highgpu-1g", "a3-highgpu-2g", "a3-highgpu-4g"})

# machine-type pattern -> (accelerator type, GPU name); the count comes from the name or the table.
_BUILT_IN = [
    (re.compile(r"a2-highgpu-(\d+)g"), "nvidia-tesla-a100", "A100 40GB"),
    (re.compile(r"a2-megagpu-(\d+)g"), "nvidia-tesla-a100", "A100 40GB"),
    (re.compile(r"a2-ultragpu-(\d+)g"), "nvidia-a100-80gb", "A100 80GB"),
    (re.compile(r"a3-highgpu-(\d+)g"), "nvidia-h100-80gb", "H100 80GB"),
    (re.compile(r"a3-megagpu-(\d+)g"), "nvidia-h100-mega-80gb", "H100 80GB Mega"),
    (re.compile(r"a3-ultragpu-(\d+)g"), "nvidia-h200-141gb", "H200 141GB"),
]
_G2_L4_COUNT = {"g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-12": 1, "g2-standard-16": 1,
                "g2-standard-24": 2, "g2-standard-32": 1, "g2-standard-48": 4, "g2-standard-96": 8}


@dataclass(frozen=True)
class Gpus:
    """GPUs of a VM: built into its machine type, or attached."""

    accelerator_type: str
    """GCE accelerator type name, e.g. nvidia-tesla-a100."""
    name: str
    """Readable GPU name, e.g. A100 40GB."""
    count: int
    built_in: bool
    """True when the machine type implies them (no guestAccelerators)."""

    def __str__(self) -> str:
        return f"{self.count}x {self.name}"


def short_name(url_or_name: str) -> str:
    """``zones/z/machineTypes/a2-highgpu-1g`` -> ``a2-highgpu-1g``."""
    return url_or_name.rstrip("/").rsplit("/", 1)[-1]


def is_accelerator_optimized(machine_type: str) -> bool:
    return short_name(machine_type).startswith(ACCELERATOR_OPTIMIZED_PREFIXES)


def built_in_gpus(machine_type: str) -> Optional[Gpus]:
    """The GPUs a machine type comes with, or None (none, or a series this table lacks)."""
    name = short_name(machine_type)
    for pattern, accelerator, readable in _BUILT_IN:
        match = pattern.fullmatch(name)
        if match:
            return Gpus(accelerator, readable, int(match.group(1)), built_in=True)
    if name in _G2_L4_COUNT:
        return Gpus("nvidia-l4", "L4", _G2_L4_COUNT[name], built_in=True)
    return None


def attached_gpus(node_config: dict) -> Optional[Gpus]:
    """GPUs from ``guestAccelerators`` (first entry; GCE allows one GPU model per VM)."""
    accelerators = node_config.get("guestAccelerators") or []
    if not accelerators:
        return None
    accelerator = short_name(str(accelerators[0].get("acceleratorType", "")))
    count = sum(int(a.get("acceleratorCount", 1)) for a in accelerators)
    return Gpus(accelerator, ATTACHABLE_GPUS.get(accelerator, accelerator), count, built_in=False)


def gpus_of(node_config: dict) -> Optional[Gpus]:
    """The GPUs a node config gets, built in or attached."""
    return built_in_gpus(str(node_config.get("machineType", ""))) or attached_gpus(node_config)
