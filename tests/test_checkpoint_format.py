"""A checkpoint exists only with a manifest whose files match; anything else is skipped, never loaded."""

import os

import pytest
import torch

from raytrain_spot.checkpoint.format import (
    MANIFEST,
    STATE_FILE,
    InvalidCheckpoint,
    Manifest,
    checkpoint_key,
    commit,
    fetch_verified,
    load_state,
    write_state,
)
from raytrain_spot.storage.store import LocalStore


def _commit(store, tmp_path, step, value=1.0):
    state = {"weights": torch.full((64, 64), value), "progress": {"step": step, "samples_seen": 10 * step}}
    path = tmp_path / f"state-{step}.pt"
    entry = write_state(state, str(path))
    manifest = Manifest(step=step, samples_seen=10 * step, kind="periodic", world_size=2,
                        files={STATE_FILE: entry}, config={"run": {"name": "r"}})
    commit(store, checkpoint_key("r", step), {STATE_FILE: str(path)}, manifest)


@pytest.fixture
def store(tmp_path):
    return LocalStore(str(tmp_path / "store"))


def test_round_trip_verifies_and_loads_tensors(store, tmp_path):
    _commit(store, tmp_path, 5, value=3.0)
    manifest, paths = fetch_verified(store, checkpoint_key("r", 5), str(tmp_path))
    assert manifest.step == 5 and manifest.config_hash and manifest.framework_version
    state = load_state(paths[STATE_FILE])
    assert torch.equal(state["weights"], torch.full((64, 64), 3.0))


def mapped_files() -> str:
    with open("/proc/self/maps") as maps:
        return maps.read()


def test_a_verified_copy_is_mapped_not_read_and_outlives_its_file(store, tmp_path):
    # A restore copies the state once, from the page cache the verification filled (format.load_state).
    _commit(store, tmp_path, 5, value=3.0)
    _, paths = fetch_verified(store, checkpoint_key("r", 5), str(tmp_path))
    state = load_state(paths[STATE_FILE])
    assert os.path.realpath(paths[STATE_FILE]) in mapped_files()
    # Stores replace by rename and delete by unlinking: the mapped tensors keep the verified bytes.
    _commit(store, tmp_path, 6, value=4.0)
    os.replace(store._path(f"{checkpoint_key('r', 6)}/{STATE_FILE}"), paths[STATE_FILE])
    assert torch.equal(state["weights"], torch.full((64, 64), 3.0))
    os.unlink(paths[STATE_FILE])
    assert torch.equal(state["weights"], torch.full((64, 64), 3.0))
    state["weights"].add_(1.0)  # a private mapping: training may update the loaded tensors in place
    assert torch.equal(state["weights"], torch.full((64, 64), 4.0))


@pytest.mark.parametrize("sync", [True, False])
def test_only_a_store_that_must_outlive_a_power_loss_syncs_what_it_publishes(tmp_path, monkeypatch, sync):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda descriptor: synced.append(descriptor) or real_fsync(descriptor))
    store = LocalStore(str(tmp_path / "store"), sync=sync)
    _commit(store, tmp_path, 5)
    scratch = tmp_path / "scratch.pt"
    scratch.write_bytes(b"x" * 1000)
    store.adopt("moved/state.pt", str(scratch))
    assert bool(synced) == sync, "a node-local copy outlives its process through the page cache alone"
    assert fetch_verified(store, checkpoint_key("r", 5), str(tmp_path))[0].step == 5
    assert store.get_bytes("moved/state.pt") == b"x" * 1000


@pytest.mark.parametrize("damage, reason", [
    ("delete_manifest", "no manifest"),
    ("truncate", "truncated"),
    ("flip_byte", "corrupt"),
    ("delete_data", "missing"),
    ("garble_manifest", "unreadable manifest"),
])
def test_damaged_checkpoints_are_detected(store, tmp_path, damage, reason):
    _commit(store, tmp_path, 7)
    directory = store.local_path(checkpoint_key("r", 7))
    data = os.path.join(directory, STATE_FILE)
    if damage == "delete_manifest":
        os.unlink(os.path.join(directory, MANIFEST))
    elif damage == "truncate":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif damage == "flip_byte":
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "delete_data":
        os.unlink(data)
    elif damage == "garble_manifest":
        with open(os.path.join(directory, MANIFEST), "w") as f:
            f.write('{"step": 7')
    with pytest.raises(InvalidCheckpoint, match=reason):
        fetch_verified(store, checkpoint_key("r", 7), str(tmp_path))


def test_arbitrary_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(InvalidCheckpoint, match="cannot deserialize"):
        load_state(str(path))


def test_manifest_is_never_overwritten(store, tmp_path):
    _commit(store, tmp_path, 3)
    assert store.put_bytes(f"{checkpoint_key('r', 3)}/{MANIFEST}", b"{}", if_absent=True) is False
    fetch_verified(store, checkpoint_key("r", 3), str(tmp_path))


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_compressed_state_round_trips(tmp_path, compression):
    state = {"w": torch.zeros(256, 256), "progress": {"step": 1}}
    plain = write_state(state, str(tmp_path / "plain.pt"))
    packed = write_state(state, str(tmp_path / "packed.pt"), compression)
    assert packed.size < plain.size / 10
    assert torch.equal(load_state(str(tmp_path / "packed.pt"), compression)["w"], state["w"])


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_export_writes_half_precision_model_weights_only(store, tmp_path, dtype, torch_dtype):
    from raytrain_spot.export import MODEL_FILE, export_model

    weights = {"w": torch.randn(128, 128), "steps": torch.tensor(3)}
    path = tmp_path / "state.pt"
    entry = write_state({"model": weights, "optimizer": {"state": {0: {"exp_avg": torch.ones(128, 128)}}}}, str(path))
    manifest = Manifest(step=9, samples_seen=90, kind="final", world_size=2, files={STATE_FILE: entry}, config={})
    commit(store, checkpoint_key("r", 9), {STATE_FILE: str(path)}, manifest)

    out = tmp_path / "export"
    size = export_model(store.local_path(checkpoint_key("r", 9)), str(out), dtype)
    exported_manifest, paths = fetch_verified(LocalStore(str(tmp_path)), "export", str(tmp_path))
    exported = load_state(paths[MODEL_FILE])
    assert exported_manifest.kind == "export" and exported_manifest.step == 9
    assert set(exported) == {"w", "steps"}, "model weights only: no optimizer state"
    assert exported["w"].dtype == torch_dtype and exported["steps"].dtype == torch.int64
    torch.testing.assert_close(exported["w"].float(), weights["w"], rtol=1e-2, atol=1e-2)
    assert size < entry.size / 3


def test_export_refuses_a_damaged_checkpoint(store, tmp_path):
    from raytrain_spot.export import export_model

    _commit(store, tmp_path, 4)
    os.unlink(os.path.join(store.local_path(checkpoint_key("r", 4)), MANIFEST))
    with pytest.raises(InvalidCheckpoint, match="no manifest"):
        export_model(store.local_path(checkpoint_key("r", 4)), str(tmp_path / "out"), "bf16")


@pytest.mark.parametrize("field, damaged", [('"samples_seen": 20', '"samples_seen": 21'), ('"step": 2,', '"step": 3,'),
                                            ('"name": "r"', '"name": "s"')])
def test_a_changed_byte_in_a_manifest_field_no_file_check_covers_is_refused(store, tmp_path, field, damaged):
    """Step 3's directory holding a step-3 manifest with another field changed would load: the
    manifest's own CRC32C (and its directory's step) catch it."""
    _commit(store, tmp_path, 2)
    path = store.local_path(f"{checkpoint_key('r', 2)}/{MANIFEST}")
    text = open(path).read()
    assert field in text
    open(path, "w").write(text.replace(field, damaged))
    with pytest.raises(InvalidCheckpoint, match="CRC32C|step 3's"):
        fetch_verified(store, checkpoint_key("r", 2), str(tmp_path))
