"""A model named by its Hugging Face hub id: resolved through huggingface_hub's own client and cache
(HF_HOME, HF_HUB_OFFLINE honoured), pinned to the commit the driver resolved for every worker.
Offline, against a cache prefilled in the hub's layout by huggingface_hub's own functions."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from tests.conftest import run_main  # noqa: E402

REPO_ID = "tiny-org/tiny-llava-hub"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = r"""
import json, sys
import torch
from raytrain_spot.config.errors import ConfigError
from raytrain_spot.tasks.hf_vlm.data import ImageTextDataConfig
from raytrain_spot.tasks.hf_vlm.task import HfModelConfig, HuggingFaceVLMTask
from raytrain_spot.loop.task import build_task, with_resolved_settings

repo, cache = sys.argv[1:3]
settings = {"_target_": "raytrain_spot.tasks.hf_vlm.task.HuggingFaceVLMTask", "model": {"path": repo},
            "data": {"cache_dir": cache, "num_samples": 16}}
driver = build_task(settings)
described = driver.prepare(0)
handed = with_resolved_settings({"task": settings}, driver)["task"]  # what the workers are handed
worker = build_task(handed)
model = worker.build_model()
out = {"described": described, "driver_dir": driver.model_dir(), "worker_dir": worker.model_dir(),
       "revision": handed["model"]["revision"],
       "weights": {k: v.sum().item() for k, v in model.state_dict().items()}}
for name, model_cfg in (("missing", HfModelConfig(path="tiny-org/never-fetched")),
                        ("other_revision", HfModelConfig(path=repo, revision="v2"))):
    try:
        HuggingFaceVLMTask(model=model_cfg).model_dir()
    except ConfigError as error:
        out[name] = str(error)
print(json.dumps(out))
"""


def prefill_hf_cache(hub_cache: str, repo_id: str, commit: str, model_dir: str) -> None:
    """``model_dir``'s files as the hub client caches a download of ``repo_id`` at ``commit`` on main:
    content-addressed blobs, the snapshot's links to them, and the ref."""
    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision,
        _create_symlink,
        repo_folder_name,
    )

    storage = os.path.join(hub_cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    os.makedirs(os.path.join(storage, "blobs"))
    os.makedirs(os.path.join(storage, "snapshots", commit))
    for name in os.listdir(model_dir):
        with open(os.path.join(model_dir, name), "rb") as f:
            data = f.read()
        blob = os.path.join(storage, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        _create_symlink(blob, os.path.join(storage, "snapshots", commit, name), new_blob=True)
    _cache_commit_hash_for_specific_revision(storage, "main", commit)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """An HF_HOME whose hub cache holds a weighted tiny LLaVA as REPO_ID at COMMIT."""
    from tests.test_hf_vlm import weighted_model_dir

    home = tmp_path_factory.mktemp("hf-home")
    source = weighted_model_dir(tmp_path_factory.mktemp("source") / "model")
    prefill_hf_cache(str(home / "hub"), REPO_ID, COMMIT, source)
    return str(home), source


def offline_env(home: str) -> dict:
    return {"HF_HOME": home, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_a_hub_id_resolves_offline_from_the_cache_and_every_worker_loads_the_drivers_commit(tmp_path, hf_home):
    from transformers import AutoModelForImageTextToText

    home, source = hf_home
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    result = subprocess.run([sys.executable, "-c", RESOLVE, REPO_ID, str(tmp_path / "data")], capture_output=True,
                            text=True, timeout=300, env={**env, **offline_env(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    snapshot = os.path.join(home, "hub", "models--tiny-org--tiny-llava-hub", "snapshots", COMMIT)
    assert out["driver_dir"] == out["worker_dir"] == snapshot, "the hub client's own cache, HF_HOME honoured"
    assert out["revision"] == COMMIT, "the workers are handed the commit the driver resolved, not 'main'"
    saved = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True).state_dict()
    assert out["weights"] == pytest.approx({k: v.sum().item() for k, v in saved.items()}), "the cached weights"
    assert out["missing"].startswith("task.model.path: tiny-org/never-fetched is not in the Hugging Face cache "
                                     f"{home}/hub and HF_HUB_OFFLINE is set. Fix:")
    assert "task.model.path: tiny-org/tiny-llava-hub@v2 is not in the Hugging Face cache" in out["other_revision"]


def test_a_hub_id_on_the_command_line_that_cannot_be_fetched_stops_before_ray(tmp_path, hf_home):
    home, _ = hf_home
    result = run_main("+experiment=hf_vlm", "task.model.path=tiny-org/never-fetched",
                      f"task.data.cache_dir={tmp_path}/data", cwd=str(tmp_path), env=offline_env(home), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "task.model.path: tiny-org/never-fetched is not in the Hugging Face cache" in result.stderr
    assert "Fix:" in result.stderr and "checkpoints in" not in result.stdout


def test_a_local_directory_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    from raytrain_spot.tasks.hf_vlm.hub import is_hub_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("HuggingFaceTB/SmolVLM-256M-Instruct")
    (tmp_path / "models" / "vlm").mkdir(parents=True)
    assert not is_hub_id("models/vlm"), "a relative path that exists is a directory"
    assert not any(is_hub_id(p) for p in ("/models/vlm", "./vlm", "~/vlm", "gs://b/vlm", "a/b/c", "vlm"))
