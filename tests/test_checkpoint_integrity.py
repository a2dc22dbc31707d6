"""A committed checkpoint is never lost and a damaged one never loaded, under adversarial storage states.

Each scenario reproduces one way it failed before, against the real tiers on local disk laid
out where ``verify`` finds them, and ends with the audit (tests/conftest.py). The sharded
metadata exploit is in test_sharded_checkpoint.py.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from raytrain_spot.checkpoint.format import MANIFEST, STATE_FILE, Manifest, checkpoint_key, file_entry, write_state
from raytrain_spot.checkpoint.head import HeadStore, UploadQueue
from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest, content_digest
from raytrain_spot.checkpoint.state import LoopState
from raytrain_spot.checkpoint.tiers import CommitConflict, StoreTier
from raytrain_spot.config.schema import CheckpointingConfig
from raytrain_spot.storage.store import LocalStore
from tests.conftest import Recorder, assert_clean_audit, stored_path

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("single_rank_group")]
RUN = "r"
NODE = "ab" * 28  # a Ray node id


class Layout:
    """One run's tiers where a real run (and ``verify``) keeps them: storage.uri, the head's
    directory and one node's directory."""

    def __init__(self, tmp_path, local_dir=None, head_dir=None):
        self.storage = f"file://{tmp_path}/storage"
        self.head_dir, self.local_dir = str(head_dir or tmp_path / "head"), str(local_dir or tmp_path / "local")
        paths = CheckpointingConfig(head_dir=self.head_dir, local_dir=self.local_dir)
        self.roots = {"durable": f"{tmp_path}/storage", "head": paths.head_root(self.storage),
                      "local": paths.local_root(self.storage, NODE)}

    def tier(self, name: str, keep: int = 3, milestone_every: int = 0) -> StoreTier:
        return StoreTier(name, LocalStore(self.roots[name]), RUN, keep, milestone_every)

    def head_store(self, keep: int = 3, milestone_every: int = 0, durable_uri=None, events=None) -> HeadStore:
        return HeadStore(self.roots["head"], RUN, durable_uri or self.storage, keep_latest_k=keep,
                         milestone_every=milestone_every, durable_interval_s=0.0, events=events or Recorder())

    def audit(self, last_step: int, damaged=()) -> None:
        assert_clean_audit(RUN, self.storage, self.head_dir, self.local_dir, last_step, damaged=damaged)




def _state(value: float):
    return {"model": {"w": torch.full((64,), value)}, "progress": {"step": int(value)}}


def _files(tmp_path, step: int, value: float = None):
    path = tmp_path / f"src-{step}-{value}" / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = write_state(_state(step if value is None else value), str(path))
    manifest = Manifest(step=step, samples_seen=step, kind="periodic", world_size=1, files={STATE_FILE: entry},
                        config={})
    return {STATE_FILE: str(path)}, manifest


def _commit(tier, tmp_path, step, value=None):
    files, manifest = _files(tmp_path, step, value)
    return tier.commit(checkpoint_key(RUN, step), files, manifest)


def _half_written(store: LocalStore, step: int) -> None:
    """An upload that died before its manifest: data, no manifest."""
    path = store.local_path(f"{checkpoint_key(RUN, step)}/{STATE_FILE}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"half of a state file")


def _valid_steps(tier: StoreTier):
    return tier.committed_and_partial()[0]


# -- retention counts commits only ------------------------------------------------------------
def test_retention_keeps_the_newest_commits_whatever_half_written_directories_are_newer(tmp_path):
    layout = Layout(tmp_path)
    tier = layout.tier("durable", keep=2)
    _commit(tier, tmp_path, 600)
    _half_written(tier.store, 620)
    _half_written(tier.store, 640)
    _commit(tier, tmp_path, 610)
    assert _valid_steps(tier) == [610, 600], "the only valid checkpoints must survive retention"
    _half_written(tier.store, 605)
    _commit(tier, tmp_path, 615)
    committed, partial = tier.committed_and_partial()
    assert committed == [615, 610] and partial == [640, 620], "a stale partial (605) goes; newer ones may be in flight"
    layout.audit(last_step=615)


# -- a step committed again -----------------------------------------------------------------
def test_committing_a_step_again_keeps_a_valid_copy_and_replaces_a_damaged_one(tmp_path):
    layout = Layout(tmp_path)
    tier = layout.tier("head")
    first = _commit(tier, tmp_path, 10, value=1.0)
    again = _commit(tier, tmp_path, 10, value=2.0)
    assert again.to_json() == first.to_json(), "a valid checkpoint is never rewritten"

    state = stored_path(tier.store, checkpoint_key(RUN, 10), STATE_FILE)
    with open(state, "r+b") as f:
        f.truncate(100)  # damaged on disk
    replaced = _commit(tier, tmp_path, 10, value=3.0)
    assert replaced.created_at != first.created_at
    manifest, paths = tier.fetch(checkpoint_key(RUN, 10), str(tmp_path))
    assert torch.load(paths[STATE_FILE], weights_only=True)["model"]["w"][0] == 3.0
    layout.audit(last_step=10)


def test_the_head_forwards_the_copy_it_holds_not_the_new_manifest(tmp_path):
    layout = Layout(tmp_path)
    head = layout.head_store()
    for value in (1.0, 2.0):  # the same step sent twice, with other bytes the second time
        files, manifest = _files(tmp_path, 10, value)
        key = checkpoint_key(RUN, 10)
        head.write_chunk(key, STATE_FILE, 0, open(files[STATE_FILE], "rb").read())
        held = Manifest.from_json(head.commit(key, manifest.to_json()))
        if value == 1.0:
            first = held
    assert held.to_json() == first.to_json()
    assert head.wait_for_uploads(timeout_s=30) == 10
    manifest, paths = layout.tier("durable").fetch(checkpoint_key(RUN, 10), str(tmp_path))  # verifies the bytes
    assert manifest.created_at == first.created_at and content_digest(manifest) == content_digest(first)
    layout.audit(last_step=10)


def test_a_lost_race_for_the_manifest_is_a_conflict_and_touches_nothing(tmp_path):
    layout = Layout(tmp_path)
    tier = layout.tier("durable")
    winner = _commit(tier, tmp_path, 20, value=1.0)
    files, loser = _files(tmp_path, 20, value=2.0)
    with pytest.raises(CommitConflict, match="another writer"):
        tier.publish(checkpoint_key(RUN, 20), loser)
    assert tier.verified(checkpoint_key(RUN, 20)).to_json() == winner.to_json()
    layout.audit(last_step=20)


# -- milestones and failed uploads reach durable storage --------------------------------------
def _manifest(step, kind="periodic"):
    return Manifest(step=step, samples_seen=step, kind=kind, world_size=1, files={}, config={})


def test_the_upload_queue_coalesces_ordinary_checkpoints_but_never_a_milestone_or_the_final_one():
    queue = UploadQueue(milestone_every=100)
    for step in (100, 101, 102):
        queue.offer(_manifest(step))
    queue.offer(_manifest(150, "final"))
    queue.offer(_manifest(151))
    assert [queue.take().step for _ in range(3)] == [100, 150, 151] and not queue
    queue.offer(_manifest(160))
    queue.retry(_manifest(155))  # a failed upload older than one waiting: pointless
    queue.retry(_manifest(100))  # a failed milestone: always again, and it pushes nothing newer out
    assert [queue.take().step for _ in range(2)] == [100, 160] and not queue


def test_a_milestone_followed_at_once_by_newer_checkpoints_still_reaches_durable_storage(tmp_path):
    layout = Layout(tmp_path)
    head = layout.head_store(keep=2, milestone_every=50)
    for step in (49, 50, 51, 52):
        files, manifest = _files(tmp_path, step)
        key = checkpoint_key(RUN, step)
        head.write_chunk(key, STATE_FILE, 0, open(files[STATE_FILE], "rb").read())
        head.commit(key, manifest.to_json())
    assert head.wait_for_uploads(timeout_s=30) == 52
    assert 50 in _valid_steps(layout.tier("durable", keep=2, milestone_every=50))
    layout.audit(last_step=52)


def test_a_failed_durable_upload_is_retried_and_reported(tmp_path):
    layout = Layout(tmp_path)
    blocked = tmp_path / "storage" / RUN
    blocked.parent.mkdir()
    blocked.write_text("a file where the run's directory should be: every upload fails")
    events = Recorder()
    head = layout.head_store(events=events)
    files, manifest = _files(tmp_path, 7)
    key = checkpoint_key(RUN, 7)
    head.write_chunk(key, STATE_FILE, 0, open(files[STATE_FILE], "rb").read())
    head.commit(key, manifest.to_json())
    assert head.wait_for_uploads(timeout_s=2) is None, "the upload cannot succeed while storage is broken"
    failures = [r for r in events.records if r["ev"] == "checkpoint_failed"]
    assert failures and failures[0]["tier"] == "durable" and failures[0]["step"] == 7
    blocked.unlink()  # storage comes back
    assert head.wait_for_uploads(timeout_s=30) == 7, "the failed upload is tried again"
    assert head.stats()["failed_uploads"] >= 1
    layout.audit(last_step=7)


# -- restore falls back on anything ----------------------------------------------------------
def test_restore_takes_the_next_tier_whatever_fails_on_one(tmp_path):
    layout = Layout(tmp_path)
    local, head, durable = layout.tier("local"), layout.tier("head"), layout.tier("durable")
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(RUN, {}, local, [head, durable], writes_local=True, events=Recorder(),
                                scratch_root=str(tmp_path / "scratch"))
    manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(5, 5), 1, "periodic"), writer=True,
                 wait=True)
    key = checkpoint_key(RUN, 5)
    held, paths = head.fetch(key, str(tmp_path))
    durable.commit(key, paths, held)  # what the head forwards in production
    # local: a manifest that names a path outside its directory
    manifest_path = local.store.local_path(f"{key}/{MANIFEST}")
    raw = json.loads(open(manifest_path).read())
    raw["files"] = {"a/../b": raw["files"][STATE_FILE]}
    del raw["checksum"]  # a manifest written without one, so the name itself is what is refused
    open(manifest_path, "w").write(json.dumps(raw))
    # head: the state file replaced by a directory (an OSError, not a checksum mismatch)
    state = stored_path(head.store, key, STATE_FILE)
    os.unlink(state)
    os.makedirs(state)
    fresh = torch.nn.Linear(4, 4)
    restored = manager.restore({"model": fresh, "optimizer": torch.optim.AdamW(fresh.parameters())}, rank=0)
    assert restored is not None and restored.tier == "durable" and restored.loop.step == 5
    layout.audit(last_step=5, damaged={("local:abababab", 5), ("head", 5)})


# -- a full node-local disk costs only the local copy ------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    mountpoint = tmp_path / "full"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_node_local_disk_still_commits_the_shared_copies(tmp_path, full_disk):
    layout = Layout(tmp_path, local_dir=full_disk)
    local, durable = layout.tier("local"), layout.tier("durable")
    events = Recorder()
    manager = CheckpointManager(RUN, {}, local, [durable], writes_local=True, events=events,
                                scratch_root=layout.roots["local"])
    model = torch.nn.Linear(256, 256)  # 257 KB of weights: more than the 64 KB disk holds
    manager.save({"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)},
                 SaveRequest(LoopState(3, 3), 1, "periodic"), writer=True, wait=True)
    assert manager.committed_step == 3 and _valid_steps(durable) == [3]
    failures = [r for r in events.records if r["ev"] == "checkpoint_failed"]
    assert [f.get("tier") for f in failures] == ["local"], failures
    layout.audit(last_step=3)


def test_a_full_head_disk_frees_what_a_transfer_had_written(tmp_path, full_disk):
    layout = Layout(tmp_path, head_dir=full_disk)
    head = layout.head_store()
    key = checkpoint_key(RUN, 9)
    head.write_chunk(key, STATE_FILE, 0, b"x" * 32_000)
    with pytest.raises(OSError):
        head.write_chunk(key, STATE_FILE, 32_000, b"x" * 64_000)
    assert not os.path.exists(os.path.join(layout.roots["head"], ".incoming", key))
    files, manifest = _files(tmp_path, 9)  # the next transfer has the room again, and commits
    head.write_chunk(key, STATE_FILE, 0, open(files[STATE_FILE], "rb").read())
    head.commit(key, manifest.to_json())
    assert head.wait_for_uploads(timeout_s=30) == 9
    layout.audit(last_step=9)


# -- data reaches the disk before the manifest names it ----------------------------------------
def test_data_and_its_directory_are_synced_before_the_manifest_exists(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    layout = Layout(tmp_path)
    tier = layout.tier("head")
    files, manifest = _files(tmp_path, 4)
    synced.clear()
    tier.commit(checkpoint_key(RUN, 4), files, manifest, move=True)
    directory = tier.store.local_path(checkpoint_key(RUN, 4))
    data_synced = synced.index(files[STATE_FILE])  # the scratch file, before the rename
    directory_synced = synced.index(directory)
    manifest_synced = next(i for i, p in enumerate(synced) if "partial" in os.path.basename(p) or p.endswith(MANIFEST))
    assert data_synced < directory_synced < manifest_synced
    assert synced[-1] == directory, "the manifest's own entry is synced last"
    assert file_entry(stored_path(tier.store, checkpoint_key(RUN, 4), STATE_FILE)) == manifest.files[STATE_FILE]
    monkeypatch.undo()
    layout.audit(last_step=4)


# -- no simulator process outlives its driver --------------------------------------------------
DRIVER = """
import subprocess, sys, time
from raytrain_spot.simulator.chaos import spawn_tied
child = spawn_tied(["sleep", "300"], env={}, log=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(300)
"""


def test_a_sigkilled_driver_takes_its_simulator_processes_with_it():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    child = int(driver.stdout.readline())
    os.kill(child, 0)  # alive
    driver.kill()
    driver.wait()
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{child}") and "Z" not in open(f"/proc/{child}/stat").read().split()[2]:
        assert time.time() < deadline, "the watcher outlived the SIGKILLed driver"
        time.sleep(0.1)
