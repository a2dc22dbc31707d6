"""The Python API refuses bad settings in the caller, before any process or cluster starts."""

import os

import pytest

import raytrain_spot
from raytrain_spot.config.errors import ConfigError


@pytest.mark.parametrize("override, named", [
    ("trainer.max_step=10", "trainer.max_step"),
    ("trainer.max_steps=-1", "trainer.max_steps"),
    ("task.model.preset=huge", "task.model.preset"),
])
def test_a_bad_setting_raises_in_the_caller_naming_it(tmp_path, override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.") + ".*Fix"):
        raytrain_spot.start(["+experiment=hf_vlm" if "task.model" in override else "+experiment=vlm", override],
                            workdir=str(tmp_path))
    assert not os.path.exists(tmp_path / "outputs"), "nothing started"


def test_the_run_name_is_resolved_once_for_caller_and_run(tmp_path):
    from raytrain_spot.api import checked_run_name

    name = checked_run_name(["+experiment=vlm"], str(tmp_path))
    assert name.startswith("vlm-") and "${" not in name
    assert checked_run_name(["+experiment=vlm", "run.name=mine"], str(tmp_path)) == "mine"
