"""The GPU checks of a cluster YAML: every GPU worker type's image has an NVIDIA driver, the torch build
its set-up installs runs on that driver, and the set-up ends with the GPU check for its GPU count."""

from __future__ import annotations

import re
from typing import List

from raytrain_spot.cluster.cluster_yaml import Problem, boot_image, setup_commands_of
from raytrain_spot.cluster.gcp.machines import gpus_of, short_name
from raytrain_spot.cluster.gpu_stack import CHOSEN_BUILD, driver_branch_of_image, driver_problem, torch_build_of

GPU_SETUP_CHECK = "raytrain_spot.cluster.gpu_setup_check"


def check_gpu_stack(config: dict) -> List[Problem]:
    """Every GPU worker type: the image has a driver, the torch build runs on it, and the set-up ends
    with the GPU check for the type's GPU count."""
    problems = []
    for name, node_type in config["available_node_types"].items():
        node_config = node_type.get("node_config", {})
        gpus = gpus_of(node_config)
        if name == config["head_node_type"] or gpus is None:
            continue
        image = boot_image(node_config)
        branch = driver_branch_of_image(image)
        commands = setup_commands_of(config, node_type, is_head=False)
        builds = [build for build in map(torch_build_of, commands) if build is not None]
        key = "worker_setup_commands"
        fix_torch = (f'install torch before the package with pip install "torch==VERSION" --index-url '
                     f"https://download.pytorch.org/whl/{CHOSEN_BUILD}")
        if branch is None:
            problems.append(Problem(name, "node_config.disks[0].initializeParams.sourceImage",
                                    f"{image!r} names no NVIDIA driver branch, so {gpus} may have no driver",
                                    "use projects/ubuntu-os-accelerator-images/global/images/family/"
                                    "ubuntu-accelerator-2404-amd64-with-nvidia-570"))
        if not builds:
            problems.append(Problem(name, key, "install no torch before the package, so pip takes PyPI's default "
                                    "build, whatever CUDA it was built for", fix_torch))
        for build in builds:
            if build.cuda is None:
                problems.append(Problem(name, key, f"install torch {build.version} as {build.where} on a node with "
                                        f"{gpus}: it cannot use them", fix_torch))
            elif branch is not None:
                mismatch = driver_problem(branch, build.cuda)
                if mismatch:
                    problems.append(Problem(name, key, f"install torch {build.version} as {build.where} (CUDA "
                                            f"{build.cuda}); {mismatch} ({short_name(image)}), so "
                                            "torch.cuda.is_available() is False on every worker", fix_torch))
        checks = [c for c in commands if GPU_SETUP_CHECK in c]
        expected = re.search(r"--expect-gpus(?:=|\s+)(\d+)", checks[-1]) if checks else None
        if not checks or commands[-1] is not checks[-1]:
            problems.append(Problem(name, key, "do not end with the GPU check, so a node whose torch cannot use its "
                                    "GPUs joins the cluster and trains on nothing",
                                    f"append: python -m {GPU_SETUP_CHECK} --expect-gpus {gpus.count}"))
        elif expected is None or int(expected.group(1)) != gpus.count:
            problems.append(Problem(name, key, f"run the GPU check with --expect-gpus "
                                    f"{expected.group(1) if expected else '(none)'}, but {gpus} come "
                                    "with the machine type, so the check fails every node of this type",
                                    f"pass --expect-gpus {gpus.count} (a type with another count needs its own "
                                    "worker_setup_commands)"))
    return problems


def gpu_stack_of(config: dict, node_type: dict) -> str:
    """The driver a GPU type's image ships and the torch its set-up installs, as the summary shows them."""
    branch = driver_branch_of_image(boot_image(node_type.get("node_config", {})))
    builds = [b for b in map(torch_build_of, setup_commands_of(config, node_type, is_head=False)) if b is not None]
    torch_text = ", ".join(f"torch {b.version} as {b.where} (CUDA {b.cuda or 'none'})" for b in builds) or "no torch"
    driver_text = f"NVIDIA driver {branch}" if branch is not None else "no NVIDIA driver in the image"
    verdict = "" if branch is None or not builds or any(b.cuda is None for b in builds) else (
        "; runs" if not any(driver_problem(branch, b.cuda) for b in builds) else "; does NOT run")
    return f"{driver_text}, {torch_text}{verdict} (raytrain_spot/cluster/gpu_stack.py)"
