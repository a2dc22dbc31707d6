"""Checkpoints under adversarial storage, second audit (issue 26): a sharded checkpoint DCP cannot
read, shard paths out of the checkpoint, retention among damaged commits, a re-commit whose check
cannot run. Plain Python against the real tiers, the real DCP code and the GCS emulator; each
scenario ends with the audit ``verify`` runs (tests/conftest.py)."""

import os
import pickle
import tempfile
import threading
import uuid
from dataclasses import replace

import pytest
import torch

from raytrain_spot.checkpoint.format import (MANIFEST, STATE_FILE, Manifest, checkpoint_key, file_entry, read_manifest,
                                             stored_key)
from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest
from raytrain_spot.checkpoint.sharded import METADATA_FILE, parse_metadata
from raytrain_spot.checkpoint.state import LoopState, ModelWeights
from raytrain_spot.checkpoint.tiers import CommitConflict, StoreTier
from raytrain_spot.storage.gcs import GcsStore
from raytrain_spot.storage.store import LocalStore
from tests.servers.fake_gcs import FakeGcsServer
from tests.conftest import Recorder, assert_clean_audit, stored_path

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("single_rank_group")]
RUN = "r"
SHARD = "__0_0.distcp"


def sharded_run(root: str, steps=(10, 20), width: int = 8, run: str = RUN) -> CheckpointManager:
    """A one-rank sharded run that saved ``steps`` to durable storage at ``root``."""
    torch.manual_seed(width)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    manager = CheckpointManager(run, {}, None, [StoreTier("durable", LocalStore(root), run, 5)], writes_local=False,
                                events=Recorder(), scratch_root=f"{root}-scratch", sharded=True)
    for step in steps:
        model(torch.randn(3, 4)).pow(2).mean().backward()
        optimizer.step()
        manager.save({"model": ModelWeights(model), "optimizer": optimizer}, SaveRequest(LoopState(step, step), 1,
                     "periodic"), writer=True, wait=True)
        assert manager.committed_step == step
    return manager


def restored_step(manager: CheckpointManager, width: int = 8):
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))
    restored = manager.restore({"model": ModelWeights(model), "optimizer": torch.optim.AdamW(model.parameters())}, 0)
    return restored and restored.loop.step


def rewrite(store: LocalStore, step: int, name: str, data: bytes) -> None:
    """Replace a file of a committed checkpoint and its manifest entry to match: damage no checksum shows."""
    key = checkpoint_key(RUN, step)
    path = stored_path(store, key, name)
    with open(path, "wb") as f:
        f.write(data)
    manifest = read_manifest(store, key)
    manifest.files[name] = replace(file_entry(path), object=manifest.files[name].object)
    store.put_bytes(f"{key}/{MANIFEST}", manifest.to_json())


def audit(root: str, last_step: int, damaged=()) -> None:
    assert_clean_audit(RUN, f"file://{root}", f"{root}-head", f"{root}-local", last_step,
                       damaged={("durable", step) for step in damaged})


# -- 1: a sharded checkpoint DCP cannot read --------------------------------------------------
def test_a_foreign_but_well_formed_metadata_is_invalid_and_the_restore_takes_the_step_before(tmp_path):
    root = str(tmp_path / "storage")
    manager = sharded_run(root)
    sharded_run(str(tmp_path / "other"), steps=(10,), width=16)  # another model's shards
    other = LocalStore(str(tmp_path / "other"))
    with open(stored_path(other, checkpoint_key(RUN, 10), METADATA_FILE), "rb") as f:
        rewrite(manager.shared[0].store, 20, METADATA_FILE, f.read())
    audit(root, last_step=10, damaged=[20])
    assert restored_step(manager) == 10


def test_a_truncated_shard_with_its_manifest_entry_updated_is_invalid_and_skipped(tmp_path):
    root = str(tmp_path / "storage")
    manager = sharded_run(root)
    store = manager.shared[0].store
    with open(stored_path(store, checkpoint_key(RUN, 20), SHARD), "rb") as f:
        rewrite(store, 20, SHARD, f.read()[:-100])
    audit(root, last_step=10, damaged=[20])
    assert restored_step(manager) == 10


def test_the_restore_tries_the_next_step_whatever_dcp_raises(tmp_path):
    """DCP's CheckpointException is a BaseException: it must not pass the restore's handler. A
    shard whose bytes match the manifest and the metadata but do not parse reaches DCP itself."""
    root = str(tmp_path / "storage")
    manager = sharded_run(root)
    store = manager.shared[0].store
    with open(stored_path(store, checkpoint_key(RUN, 20), SHARD), "rb") as f:
        size = len(f.read())
    rewrite(store, 20, SHARD, b"\0" * size)
    assert restored_step(manager) == 10


# -- 7: DCP shard paths are confined to the manifest's files -----------------------------------
@pytest.mark.parametrize("elsewhere", ["../step_00000010/" + SHARD, "/etc/hostname", MANIFEST, "missing.distcp"])
def test_metadata_naming_a_file_the_manifest_does_not_list_is_refused(tmp_path, elsewhere):
    """Step 20's metadata pointed at step 10's shard would load step 10's tensors as step 20's."""
    root = str(tmp_path / "storage")
    manager = sharded_run(root)
    store = manager.shared[0].store
    key = checkpoint_key(RUN, 20)
    metadata = parse_metadata(open(stored_path(store, key, METADATA_FILE), "rb").read())
    for info in metadata.storage_data.values():
        info.relative_path = elsewhere
    rewrite(store, 20, METADATA_FILE, pickle.dumps(metadata))
    audit(root, last_step=10, damaged=[20])
    assert restored_step(manager) == 10


def test_metadata_reading_past_the_end_of_a_listed_shard_is_refused(tmp_path):
    root = str(tmp_path / "storage")
    manager = sharded_run(root)
    store = manager.shared[0].store
    key = checkpoint_key(RUN, 20)
    metadata = parse_metadata(open(stored_path(store, key, METADATA_FILE), "rb").read())
    next(iter(metadata.storage_data.values())).length += 1 << 30
    rewrite(store, 20, METADATA_FILE, pickle.dumps(metadata))
    audit(root, last_step=10, damaged=[20])
    assert restored_step(manager) == 10


# -- 4 and 6: retention and re-commits judge copies by what the store lists ----------------------
@pytest.fixture(scope="module")
def gcs_server():
    with FakeGcsServer() as running:
        yield running


def gcs_store(server) -> GcsStore:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    return GcsStore(f"gs://{bucket}/root", client=server.client(), emulator_host=server.endpoint,
                    retry_deadline_s=2.0, request_timeout_s=5.0)


def _commit(tier: StoreTier, tmp_path, step: int) -> Manifest:
    path = tmp_path / f"src-{step}-{uuid.uuid4().hex[:6]}" / STATE_FILE
    path.parent.mkdir(parents=True)
    torch.save({"w": torch.full((256,), float(step))}, str(path))
    manifest = Manifest(step=step, samples_seen=step, kind="periodic", world_size=1,
                        files={STATE_FILE: file_entry(str(path))}, config={})
    return tier.commit(checkpoint_key(RUN, step), {STATE_FILE: str(path)}, manifest)


def _flip_a_byte(store, step: int) -> None:
    """The state file of ``step`` with one byte changed: same size, another checksum."""
    key = stored_key(checkpoint_key(RUN, step), STATE_FILE,
                     read_manifest(store, checkpoint_key(RUN, step)).files[STATE_FILE])
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    with tempfile.NamedTemporaryFile() as f:
        f.write(bytes(data))
        f.flush()
        store.put_file(key, f.name)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_retention_counts_only_commits_that_verify_and_keeps_the_last_valid_one(tmp_path, gcs_server, where):
    store = LocalStore(str(tmp_path / "storage")) if where == "local" else gcs_store(gcs_server)
    tier = StoreTier("durable", store, RUN, keep_latest_k=2)
    for step in (10, 20, 30):
        _commit(StoreTier("durable", store, RUN, keep_latest_k=5), tmp_path, step)
    _flip_a_byte(store, 20)
    _flip_a_byte(store, 30)
    tier.apply_retention()
    assert tier.steps(RUN) == [30, 20, 10]  # the damaged ones are newer than the only valid one
    assert tier.committed_and_partial() == ([10], [30, 20])
    _commit(tier, tmp_path, 40)
    assert tier.steps(RUN) == [40, 10]  # the valid ones kept, the damaged older ones gone


def test_retention_counts_a_sharded_commit_whose_metadata_does_not_match_its_shards_as_damaged(tmp_path):
    """Sizes and checksums agree with the manifest (it was updated to match the truncated shard),
    but the restore would refuse the step: so does retention."""
    root = str(tmp_path / "storage")
    manager = sharded_run(root, steps=(10, 20, 30))
    store = manager.shared[0].store
    for step in (20, 30):
        with open(stored_path(store, checkpoint_key(RUN, step), SHARD), "rb") as f:
            rewrite(store, step, SHARD, f.read()[:-100])
    tier = StoreTier("durable", store, RUN, keep_latest_k=2)
    tier.apply_retention()
    assert tier.committed_and_partial() == ([10], [30, 20])
    assert tier.steps(RUN) == [30, 20, 10]


def test_a_recommit_whose_check_cannot_run_keeps_the_valid_durable_copy(tmp_path, gcs_server, monkeypatch):
    """The check of the copy already there downloads nothing: with no usable temporary directory
    (a full /tmp) it still finds the copy valid, and a re-upload that would fail never starts."""
    store = gcs_store(gcs_server)
    tier = StoreTier("durable", store, RUN, keep_latest_k=2)
    committed = _commit(tier, tmp_path, 10)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-directory"))
    again = tier.commit(checkpoint_key(RUN, 10), {STATE_FILE: str(tmp_path / "gone" / STATE_FILE)}, committed)
    assert again.to_json() == committed.to_json()
    assert tier.verified(checkpoint_key(RUN, 10)).to_json() == committed.to_json()


def test_a_recommit_replaces_a_copy_the_server_checksum_shows_damaged(tmp_path, gcs_server):
    store = gcs_store(gcs_server)
    tier = StoreTier("durable", store, RUN, keep_latest_k=2)
    _commit(tier, tmp_path, 10)
    _flip_a_byte(store, 10)
    replaced = _commit(tier, tmp_path, 10)
    assert tier.verified(checkpoint_key(RUN, 10)).to_json() == replaced.to_json()


# -- 3: two writers of one step ----------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_two_writers_racing_for_a_step_leave_the_winners_commit_whole(tmp_path, gcs_server, where):
    """Two drivers commit the same steps at the same moment, each with other bytes: every step
    ends up one writer's whole commit (it verifies and holds that writer's bytes), and nothing of
    the loser's is left in the directory."""
    if where == "local":
        stores = [LocalStore(str(tmp_path / "storage")) for _ in range(2)]
    else:
        first = gcs_store(gcs_server)
        stores = [first, GcsStore(first.uri, client=gcs_server.client(), emulator_host=gcs_server.endpoint,
                                  retry_deadline_s=2.0, request_timeout_s=5.0)]
    tiers = [StoreTier("durable", store, RUN, keep_latest_k=50) for store in stores]
    steps = range(1, 11)
    start = threading.Barrier(2)
    results = [{}, {}]

    def write(writer: int) -> None:
        for step in steps:
            path = tmp_path / f"writer{writer}-{step}" / STATE_FILE
            path.parent.mkdir(parents=True)
            torch.save({"writer": writer, "w": torch.full((64 << 10,), float(writer))}, str(path))
            manifest = Manifest(step=step, samples_seen=step, kind="periodic", world_size=1,
                                files={STATE_FILE: file_entry(str(path))}, config={"writer": writer})
            start.wait()
            results[writer][step] = tiers[writer].commit(checkpoint_key(RUN, step), {STATE_FILE: str(path)}, manifest)

    threads = [threading.Thread(target=write, args=(writer,)) for writer in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for step in steps:
        key = checkpoint_key(RUN, step)
        held = tiers[0].verified(key)
        winner = held.config["writer"]
        assert results[0][step].to_json() == results[1][step].to_json() == held.to_json(), \
            "both writers are told the commit the tier holds"
        with tempfile.TemporaryDirectory() as scratch:
            _, paths = tiers[1].fetch(key, scratch)
            assert torch.load(paths[STATE_FILE], weights_only=True)["writer"] == winner
        assert sorted(stores[0].list_files(key)) == sorted([MANIFEST, held.files[STATE_FILE].object])


def test_the_loser_of_a_sharded_publish_deletes_only_its_own_shares(tmp_path):
    """Writers that put their files first and publish after (the sharded path): the one whose
    manifest lands second gets CommitConflict and its files go; the winner's commit verifies."""
    store = LocalStore(str(tmp_path / "storage"))
    tiers = [StoreTier("durable", store, RUN, keep_latest_k=5) for _ in range(2)]
    key = checkpoint_key(RUN, 10)
    manifests = []
    for writer, tier in enumerate(tiers):
        path = tmp_path / f"writer{writer}" / STATE_FILE
        path.parent.mkdir()
        torch.save({"writer": writer}, str(path))
        objects = tier.put(key, {STATE_FILE: str(path)})
        manifests.append(Manifest(step=10, samples_seen=10, kind="periodic", world_size=1, config={},
                                  files={STATE_FILE: file_entry(str(path))}).stored_as(objects))
    tiers[1].publish(key, manifests[1])
    with pytest.raises(CommitConflict):
        tiers[0].publish(key, manifests[0])
    assert tiers[0].verified(key).to_json() == manifests[1].to_json()
    assert sorted(store.list_files(key)) == sorted([MANIFEST, manifests[1].files[STATE_FILE].object])
    audit(str(tmp_path / "storage"), last_step=10)
