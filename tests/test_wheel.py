"""The package as a user installs it: the wheel, outside the source tree, run from another directory.

The cluster YAMLs install exactly this wheel on every node, so whatever the main command, the
Python API or a CLI subcommand reads (the Hydra configs, the price catalog) must be inside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from raytrain_spot.cli import COMMANDS
from tests.conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "raytrain_spot", "conf")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """The wheel ``pip wheel`` builds from (a copy of) the source tree, as a user or CI would."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:  # a copy: an in-tree build would leave build/ in the shared checkout
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, source / name)
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [name] = os.listdir(out)
    return str(out / name)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """The environment of a process that imports the package from the installed wheel only."""
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {**os.environ, "PYTHONPATH": str(target), "TARGET": str(target)}


def _run(installed: dict, cwd, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=str(cwd), env=installed, capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for root, _, files in os.walk(os.path.join(REPO, "raytrain_spot")):
        for file in files:
            if file.endswith((".py", ".json")):
                assert os.path.relpath(os.path.join(root, file), REPO) in names
    for root, _, files in os.walk(os.path.join(REPO, "conf")):
        for file in files:
            if file.endswith(".yaml"):
                relative = os.path.relpath(os.path.join(root, file), os.path.join(REPO, "conf"))
                assert f"raytrain_spot/conf/{relative}" in names


def test_the_main_command_composes_from_the_installed_configs_in_any_directory(installed, tmp_path):
    imported = _run(installed, tmp_path, sys.executable, "-c",
                    "import raytrain_spot, raytrain_spot.conf; print(raytrain_spot.__file__); "
                    "print(raytrain_spot.conf.__file__)")
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert all(line.startswith(installed["TARGET"]) for line in imported.stdout.split()), imported.stdout

    default = _run(installed, tmp_path, sys.executable, "-m", "raytrain_spot.run", "--cfg", "job")
    assert default.returncode == 0, default.stderr[-3000:]
    assert "max_steps: 300" in default.stdout
    lora = _run(installed, tmp_path, sys.executable, "-m", "raytrain_spot.run", "+experiment=hf_vlm",
                "task.lora.r=4", "--cfg", "job")
    assert lora.returncode == 0, lora.stderr[-3000:]
    assert "    r: 4" in lora.stdout and "_target_: raytrain_spot.tasks.hf_vlm.task.HuggingFaceVLMTask" in lora.stdout


def test_a_users_config_dir_composes_on_top_of_the_installed_configs(installed, tmp_path):
    experiment = tmp_path / "my_conf" / "experiment"
    experiment.mkdir(parents=True)
    (experiment / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /task: hf_vlm\n"
                                          "trainer:\n  max_steps: 7\n")
    mine = _run(installed, tmp_path, sys.executable, "-m", "raytrain_spot.run", "--config-dir", "my_conf",
                "+experiment=mine", "task.lora.r=4", "--cfg", "job")
    assert mine.returncode == 0, mine.stderr[-3000:]
    assert "max_steps: 7" in mine.stdout and "    r: 4" in mine.stdout


def test_the_python_api_checks_overrides_from_the_installed_configs(installed, tmp_path):
    checked = _run(installed, tmp_path, sys.executable, "-c",
                   "from raytrain_spot.api import checked_run; "
                   "print(*checked_run(['+experiment=hf_vlm', 'task.lora.r=4', 'run.name=w'], '/tmp'))")
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert checked.stdout.split() == ["w", "/tmp/outputs/w", "300"]


def test_every_cli_subcommand_runs_from_the_wheel(installed, tmp_path):
    script = os.path.join(installed["TARGET"], "bin", "raytrain-spot")
    for name in COMMANDS:
        helped = _run(installed, tmp_path, script, name, "--help")
        assert helped.returncode == 0, f"{name}: {helped.stderr[-3000:]}"
    job = _run(installed, tmp_path, script, "run", "+experiment=vlm", "--cfg", "job")
    assert job.returncode == 0 and "name: vlm-" in job.stdout, job.stderr[-3000:]
    plan = _run(installed, tmp_path, script, "plan", "--steps", "1000", "--step-time-s", "3.6", "--deadline-h", "10")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert not os.path.exists(tmp_path / "outputs"), "--cfg job and --help write no run directory"
