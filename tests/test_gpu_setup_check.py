"""The GPU set-up check that ends every GPU worker's set-up, and the driver/CUDA table behind it."""

import os
import subprocess
import sys

import pytest

from raytrain_spot.cluster.gpu_setup_check import GpuFacts, problems, read_driver_version
from raytrain_spot.cluster.gpu_stack import (driver_branch_of_image, driver_problem, torch_build_of)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_on_this_cpu_machine_the_check_fails_the_setup_and_says_why():
    result = subprocess.run([sys.executable, "-m", "raytrain_spot.cluster.gpu_setup_check", "--expect-gpus", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "CPU build" in result.stderr and "whl/cu126" in result.stderr
    assert "cannot train on its GPUs" in result.stderr


def facts(torch_cuda="12.6", available=True, count=1, driver="570.133.20"):
    return GpuFacts(torch_version=f"2.13.0+cu{torch_cuda.replace('.', '')}" if torch_cuda else "2.13.0+cpu",
                    torch_cuda=torch_cuda, cuda_available=available, device_count=count, driver_version=driver)


def test_the_chosen_build_on_the_images_driver_passes():
    assert problems(facts(), expect_gpus=1) == []


def test_pypi_default_cuda_13_on_a_570_driver_fails_naming_the_580_requirement():
    [problem] = problems(facts(torch_cuda="13.0", available=False, count=0), expect_gpus=1)
    assert "580 or newer" in problem and "570.133.20" in problem and "whl/cu126" in problem


def test_a_gpu_count_other_than_the_node_types_fails():
    [problem] = problems(facts(count=2), expect_gpus=1)
    assert "sees 2 GPU(s)" in problem and "promises 1" in problem


def test_no_driver_fails():
    found = problems(facts(available=False, count=0, driver=None), expect_gpus=1)
    assert any("no NVIDIA driver" in p for p in found)


def test_driver_version_is_read_from_the_kernel_module_line(tmp_path):
    path = tmp_path / "version"
    path.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.133.20  Fri Mar 14 2025\n"
                    "GCC version:  gcc version 13.3.0\n")
    assert read_driver_version(str(path)) == "570.133.20"
    assert read_driver_version(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("command, cuda", [
    ('pip install -q "torch==2.13.0"', "13.0"),
    ('pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu126', "12.6"),
    ('pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu', None),
    ('pip install "torch==2.13.0+cu130" --extra-index-url https://download.pytorch.org/whl/cu130', "13.0"),
])
def test_torch_builds_are_read_from_the_install_command(command, cuda):
    assert torch_build_of(command).cuda == cuda


def test_driver_table():
    assert driver_branch_of_image("projects/x/global/images/family/ubuntu-accelerator-2404-amd64-with-nvidia-570") == 570
    assert driver_branch_of_image("projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64") is None
    assert driver_problem(570, "13.0") and driver_problem(570, "12.6") is None and driver_problem(580, "13.0") is None
    assert torch_build_of("pip install -q jupyterlab") is None


def test_the_cluster_gpu_report_probes_every_gpu_node_and_fails_on_this_cpu_machine():
    """A Ray node that declares a GPU it does not have: the report's probe runs on it and says why."""
    import ray

    from raytrain_spot.cluster.gpu_report import report

    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False)
    try:
        [node] = report(timeout_s=60)
    finally:
        ray.shutdown()
    assert node.gpus == 1 and node.facts is not None and node.facts.device_count == 0
    assert node.problems and "CPU build" in node.problems[0]
    assert str(node).split(": ")[1] == "FAIL"
