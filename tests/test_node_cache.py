"""Node-local copies of gs:// directories, against a real fake-gcs-server on loopback."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
import uuid

import pytest
from google.cloud import storage

from raytrain_spot.config.errors import ConfigError
from raytrain_spot.storage.gcs import GcsStore, ObjectInfo
from raytrain_spot.observe import progress
from raytrain_spot.storage import node_cache
from raytrain_spot.storage.node_cache import MANIFEST, CopyFailed, local_copy, verify_file
from tests.servers.fake_gcs import FakeGcsServer

KIB = 1 << 10
TREE = {"config.json": b'{"model_type": "tiny"}', "model.safetensors": os.urandom(300 * KIB),
        "tokenizer/vocab.json": b'{"a": 0}', "tokenizer/deeper/merges.bin": bytes(range(256)) * 8}


@pytest.fixture(scope="module")
def server():
    with FakeGcsServer() as running:
        yield running


@pytest.fixture
def bucket(server, monkeypatch) -> storage.Bucket:
    """A fresh bucket, with the environment pointing the storage layer (and child processes) at the emulator."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.endpoint)
    return server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def downloads(monkeypatch) -> list:
    """Object names the client downloads in this process: a spy on the client, not on the code under test."""
    seen: list = []
    original = storage.Blob.download_to_filename

    def counting(blob, *args, **kwargs):
        seen.append(blob.name)
        return original(blob, *args, **kwargs)

    monkeypatch.setattr(storage.Blob, "download_to_filename", counting)
    return seen


def upload(bucket: storage.Bucket, prefix: str, tree: dict) -> str:
    for name, data in tree.items():
        bucket.blob(f"{prefix}/{name}").upload_from_string(data)
    return f"gs://{bucket.name}/{prefix}"


def read_tree(root: str) -> dict:
    found = {}
    for directory, _, files in os.walk(root):
        for file in files:
            path = os.path.join(directory, file)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def test_a_tree_is_fetched_once_then_reused(bucket, downloads, tmp_path):
    uri = upload(bucket, "models/tiny", TREE)
    bucket.blob("models/tiny/tokenizer/").upload_from_string(b"")  # the console's "folder" placeholder

    copy = local_copy(uri, str(tmp_path / "cache"), setting="task.model.path")
    assert copy.startswith(str(tmp_path / "cache" / "gs" / bucket.name / "models" / "tiny") + os.sep)
    assert read_tree(copy) == {**TREE, MANIFEST: open(os.path.join(copy, MANIFEST), "rb").read()}
    manifest = json.load(open(os.path.join(copy, MANIFEST)))
    assert manifest["uri"] == uri and [o["key"] for o in manifest["objects"]] == sorted(TREE)
    assert all(o["crc32c"] and o["generation"] for o in manifest["objects"])
    assert sorted(downloads) == sorted(f"models/tiny/{name}" for name in TREE)
    inodes = {name: os.stat(os.path.join(copy, name)).st_ino for name in TREE}

    downloads.clear()
    assert local_copy(uri + "/", str(tmp_path / "cache")) == copy
    assert downloads == [], "a published copy is reused, not fetched again"
    assert {name: os.stat(os.path.join(copy, name)).st_ino for name in TREE} == inodes
    assert sorted(os.listdir(os.path.dirname(copy))) == [".lock", os.path.basename(copy)], "no staging left"


def test_a_changed_object_gets_a_fresh_copy_and_the_old_one_is_left_alone(bucket, downloads, tmp_path):
    uri = upload(bucket, "data", {"a.parquet": b"first", "b.parquet": b"same"})
    first = local_copy(uri, str(tmp_path))
    bucket.blob("data/a.parquet").upload_from_string(b"second")
    downloads.clear()

    second = local_copy(uri, str(tmp_path))
    assert second != first and os.path.dirname(second) == os.path.dirname(first)
    assert open(os.path.join(second, "a.parquet"), "rb").read() == b"second"
    assert open(os.path.join(first, "a.parquet"), "rb").read() == b"first", "a copy in use is never rewritten"
    assert sorted(downloads) == ["data/a.parquet", "data/b.parquet"]


def test_a_damaged_copy_is_fetched_again(bucket, tmp_path):
    uri = upload(bucket, "m", TREE)
    copy = local_copy(uri, str(tmp_path))
    os.truncate(os.path.join(copy, "model.safetensors"), 10)
    os.makedirs(os.path.join(os.path.dirname(copy), ".fetching-crashed"))  # a fetcher killed mid-copy

    assert local_copy(uri, str(tmp_path)) == copy
    assert read_tree(copy)["model.safetensors"] == TREE["model.safetensors"]
    assert ".fetching-crashed" not in os.listdir(os.path.dirname(copy))


def test_bytes_that_differ_from_the_listing_are_rejected(bucket, tmp_path):
    upload(bucket, "m", {"w.bin": b"x" * 1000})
    store = GcsStore.from_uri(f"gs://{bucket.name}/m")
    [listed] = store.list_objects()
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(b"x" * 1000)
    bad.write_bytes(b"x" * 999 + b"y")  # same size: only the hash tells

    verify_file(str(good), listed, "gs://b/m/w.bin")
    with pytest.raises(CopyFailed, match=r"gs://b/m/w.bin: the downloaded copy .*bad has CRC32C .* the bucket lists "
                                         r".*Fix: run again"):
        verify_file(str(bad), listed, "gs://b/m/w.bin")
    with pytest.raises(CopyFailed, match="has MD5"):  # a composed object lists no MD5, others may lack a CRC32C
        verify_file(str(bad), ObjectInfo(listed.key, listed.size, listed.generation, None, listed.md5), "w.bin")
    with pytest.raises(CopyFailed, match="has size 4, the bucket lists 1000"):
        bad.write_bytes(b"xxxx")
        verify_file(str(bad), listed, "w.bin")


def test_a_generation_replaced_mid_copy_is_not_downloaded(bucket, tmp_path):
    upload(bucket, "m", {"w.bin": b"old"})
    store = GcsStore.from_uri(f"gs://{bucket.name}/m")
    [listed] = store.list_objects()
    bucket.blob("m/w.bin").upload_from_string(b"new")
    with pytest.raises(FileNotFoundError, match=f"gs://{bucket.name}/m/w.bin at generation {listed.generation}"):
        store.get_generation("w.bin", listed.generation, str(tmp_path / "w.bin"))
    assert not (tmp_path / "w.bin").exists()


def test_user_mistakes_name_the_setting_the_uri_and_the_fix(bucket, tmp_path):
    bucket.blob("elsewhere/x").upload_from_string(b"x")
    with pytest.raises(ConfigError, match=rf"task.model.path: gs://{bucket.name}/nothing holds no objects\. Fix: "):
        local_copy(f"gs://{bucket.name}/nothing", str(tmp_path), setting="task.model.path")
    with pytest.raises(ConfigError, match=r"task.data.path: bucket 'no-such-bucket-x' .* does not exist\. Fix:"):
        local_copy("gs://no-such-bucket-x/d", str(tmp_path), setting="task.data.path")
    with pytest.raises(ConfigError, match=r"task.data.path='gs://Bad!/d'.*not a valid bucket name"):
        local_copy("gs://Bad!/d", str(tmp_path), setting="task.data.path")
    with pytest.raises(ConfigError, match=r"task.data.path: s3://b/d has a scheme .* Fix:"):
        local_copy("s3://b/d", str(tmp_path), setting="task.data.path")
    assert os.listdir(tmp_path) == [], "nothing is cached for a mistake"


def test_local_paths_pass_through():
    assert local_copy("~/models/x", "/unused") == os.path.expanduser("~/models/x")
    assert local_copy("file:///data/shards", "/unused") == "/data/shards"


def _fetch_after(barrier, results, uri: str, root: str) -> None:
    """In a child process: wait for the other one, then fetch; report the copy and how many objects it downloaded."""
    seen: list = []
    original = storage.Blob.download_to_filename

    def counting(blob, *args, **kwargs):
        seen.append(blob.name)
        return original(blob, *args, **kwargs)

    storage.Blob.download_to_filename = counting
    barrier.wait()
    results.put((local_copy(uri, root), len(seen)))


def test_concurrent_processes_get_one_complete_identical_copy(bucket, tmp_path):
    tree = {**TREE, "big.bin": os.urandom(4 << 20)}
    uri = upload(bucket, "shared", tree)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_fetch_after, args=(barrier, results, uri, str(tmp_path))) for _ in range(2)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=10)
        assert child.exitcode == 0

    (copy, _), (other, _) = outcomes
    assert copy == other
    assert sorted(count for _, count in outcomes) == [0, len(tree)], "one fetches, the other waits and reuses it"
    assert {k: v for k, v in read_tree(copy).items() if k != MANIFEST} == tree
    assert sorted(os.listdir(os.path.dirname(copy))) == [".lock", os.path.basename(copy)]


def test_a_hugging_face_model_and_shards_in_gcs_work_as_task_paths(bucket, tmp_path):
    pytest.importorskip("transformers")
    from raytrain_spot.tasks.hf_vlm.data import ImageTextDataConfig, generated_data_dir
    from raytrain_spot.tasks.hf_vlm.presets import write_preset
    from raytrain_spot.tasks.hf_vlm.task import HfModelConfig, HuggingFaceVLMTask

    write_preset("tiny-llava", str(tmp_path / "tiny"))
    model_uri = upload(bucket, "models/tiny", read_tree(str(tmp_path / "tiny")))
    shards = generated_data_dir(ImageTextDataConfig(num_samples=8, cache_dir=str(tmp_path / "gen")), seed=1)
    data_uri = upload(bucket, "data", read_tree(shards))
    task = HuggingFaceVLMTask(model=HfModelConfig(path=model_uri, cache_dir=str(tmp_path / "models")),
                              data=ImageTextDataConfig(path=data_uri, cache_dir=str(tmp_path / "data")))

    model_dir = task.model_dir()
    assert model_dir.startswith(str(tmp_path / "models" / "gs" / bucket.name / "models" / "tiny"))
    assert os.path.isfile(os.path.join(model_dir, "config.json"))
    assert task.processor().tokenizer.get_vocab()
    data_dir = task.data_dir(seed=1)
    assert data_dir.startswith(str(tmp_path / "data" / "gs" / bucket.name / "data"))
    assert len(task.build_dataset(seed=1)) == 8

    assert task.model_dir() == model_dir, "listed once per task: every use reads the same copy"
    bucket.blob("models/tiny/config.json").delete()
    fresh = HuggingFaceVLMTask(model=HfModelConfig(path=model_uri, cache_dir=str(tmp_path / "models")))
    with pytest.raises(ConfigError, match=rf"task.model.path: {model_uri} \(its copy .*\) has no config.json"):
        fresh.model_dir()


def test_a_long_fetch_prints_how_far_it_is_and_the_time_left(bucket, tmp_path, monkeypatch, caplog):
    """A model directory takes minutes to come from gs:// on a fresh node: the driver says so before Ray starts."""
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(node_cache, "PROGRESS_POLL_S", 0.05)
    original = storage.Blob.download_to_filename

    def slow_network(blob, *args, **kwargs):  # the transfer takes a while, as a large file's would
        time.sleep(0.4)
        return original(blob, *args, **kwargs)

    monkeypatch.setattr(storage.Blob, "download_to_filename", slow_network)
    uri = upload(bucket, "model", {f"part-{i}.bin": os.urandom(256 << 10) for i in range(4)})
    with caplog.at_level(logging.INFO, logger=node_cache.__name__):
        local_copy(uri, str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"fetching {uri}:")]
    assert len(lines) >= 2 and "/1.0 MiB (" in lines[0] and "| elapsed 0:00:0" in lines[0] and "| eta " in lines[0]
    assert lines[-1].startswith(f"fetching {uri}: done, 1.0 MiB in ")
