"""``python -m raytrain_spot.checkpoint.verify``: every checkpoint of a run on every tier, and an exit status to trust."""

import json
import os
import subprocess
import sys

import torch

from raytrain_spot.checkpoint.format import MANIFEST, STATE_FILE, Manifest, checkpoint_key, write_state
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.config.schema import CheckpointingConfig
from raytrain_spot.storage.store import LocalStore
from raytrain_spot.checkpoint.verify import INVALID, PARTIAL, VALID, audit
from tests.conftest import stored_path

RUN = "audited"


def _commit(store, tmp_path, step):
    path = tmp_path / f"state-{step}.pt"
    entry = write_state({"w": torch.ones(8) * step}, str(path))
    manifest = Manifest(step=step, samples_seen=step, kind="periodic", world_size=2, files={STATE_FILE: entry},
                        config={})
    StoreTier("t", store, RUN, keep_latest_k=10).commit(checkpoint_key(RUN, step), {STATE_FILE: str(path)}, manifest)
    return store.local_path(checkpoint_key(RUN, step))


def _layout(tmp_path):
    storage = f"file://{tmp_path / 'storage'}"
    head_dir, local_dir = str(tmp_path / "head"), str(tmp_path / "local")
    durable = LocalStore(str(tmp_path / "storage"))
    head = LocalStore(CheckpointingConfig(head_dir=head_dir).head_root(storage))
    node = LocalStore(CheckpointingConfig(local_dir=local_dir).local_root(storage, "ab" * 28))
    _commit(durable, tmp_path, 10)
    truncated = _commit(head, tmp_path, 20)
    with open(stored_path(head, checkpoint_key(RUN, 20), STATE_FILE), "r+b") as f:
        f.truncate(10)
    traversal = _commit(node, tmp_path, 30)
    manifest = json.loads(open(os.path.join(traversal, MANIFEST)).read())
    manifest["files"] = {"../../state.pt": manifest["files"][STATE_FILE]}
    del manifest["checksum"]  # a manifest written without one, so the name itself is what is refused
    open(os.path.join(traversal, MANIFEST), "w").write(json.dumps(manifest))
    os.makedirs(durable.local_path(checkpoint_key(RUN, 40)))  # an upload that never committed
    return storage, head_dir, local_dir


def test_every_tier_is_audited_and_each_bad_copy_says_why(tmp_path):
    storage, head_dir, local_dir = _layout(tmp_path)
    findings = {(f.tier, f.step): f for f in audit(RUN, storage, head_dir, local_dir)}
    assert findings[("durable", 10)].status == VALID and findings[("durable", 40)].status == PARTIAL
    assert findings[("head", 20)].status == INVALID and "truncated" in findings[("head", 20)].detail
    assert findings[("local:abababab", 30)].status == INVALID and "../../state.pt" in findings[("local:abababab", 30)].detail


def test_the_command_exits_non_zero_on_a_committed_but_invalid_checkpoint(tmp_path):
    storage, head_dir, local_dir = _layout(tmp_path)
    command = [sys.executable, "-m", "raytrain_spot.checkpoint.verify", RUN, "--storage", storage, "--head-dir", head_dir,
               "--local-dir", local_dir]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "1 valid, 1 partial, 2 invalid; a resume starts from step 10" in result.stdout

    for step in (20, 30):  # remove the bad copies: only valid and partial remain
        for root in (head_dir, local_dir):
            subprocess.run(["find", root, "-name", f"step_{step:08d}", "-exec", "rm", "-rf", "{}", "+"], check=True)
    assert subprocess.run(command, capture_output=True, text=True, timeout=120).returncode == 0
    missing = subprocess.run([sys.executable, "-m", "raytrain_spot.checkpoint.verify", f"{storage}/other"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no checkpoint of run 'other'" in missing.stderr
