"""The ``raytrain-spot`` console script: every tool behind one entry point, each as its ``python -m`` form."""

import os
import subprocess
import sys

import pytest

from raytrain_spot.cli import COMMANDS

SCRIPT = os.path.join(os.path.dirname(sys.executable), "raytrain-spot")


def _run(*command):
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_console_script_lists_every_command():
    listed = _run(SCRIPT, "--help")
    assert listed.returncode == 0, listed.stderr
    for name, (module, _) in COMMANDS.items():
        assert f"  {name} " in listed.stdout and module in listed.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help_and_it_is_the_python_m_forms(name):
    via_script = _run(SCRIPT, name, "--help")
    via_module = _run(sys.executable, "-m", COMMANDS[name][0], "--help")
    assert via_script.returncode == 0 == via_module.returncode, via_script.stderr + via_module.stderr
    assert via_script.stdout == via_module.stdout
    assert "usage" in via_script.stdout.lower() or "== Configuration groups ==" in via_script.stdout


def test_an_unknown_command_fails_and_lists_the_commands():
    wrong = _run(SCRIPT, "trian")
    assert wrong.returncode == 2 and "unknown command 'trian'" in wrong.stderr and "cluster-check" in wrong.stderr


def test_the_exit_status_is_the_commands():
    bad = _run(SCRIPT, "run", "+experiment=vlm", "trainer.max_stepz=3")
    assert bad.returncode == 2 and "trainer.max_steps" in bad.stderr
