"""Sharded checkpoints through torch.distributed.checkpoint: two ranks save, one restores."""

import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_spot.checkpoint.format import MANIFEST, STATE_FILE, InvalidCheckpoint, checkpoint_key, read_manifest
from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest
from raytrain_spot.checkpoint.state import LoopState, ModelWeights
from raytrain_spot.checkpoint.sharded import METADATA_FILE, SafeFileSystemReader, load_sharded, owned_keys
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.observe.events import EventLog
from raytrain_spot.storage.store import LocalStore
from tests.conftest import stored_path

BATCHES = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]


@pytest.fixture(scope="module", autouse=True)
def single_rank_group(tmp_path_factory):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model, optimizer, steps):
    for batch in steps:
        optimizer.zero_grad()
        model(batch).pow(2).mean().backward()
        optimizer.step()


def _durable(root):
    return StoreTier("durable", LocalStore(root), "r", 3)


def _save_from_two_ranks(rank, tmp):
    """Both ranks train the same replica; each saves its share of steps 3 and 5. Step 6 fails
    on rank 1 (a file stands where its run's directory should be), so it must never be published."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg2", rank=rank, world_size=2)
    durable = _durable(f"{tmp}/durable")
    manager = CheckpointManager("r", {}, None, [durable], writes_local=False, events=EventLog(),
                                scratch_root=f"{tmp}/scratch-{rank}", sharded=True)
    model, optimizer = _model()
    trained = 0
    for step in (3, 5):
        _train(model, optimizer, BATCHES[trained:step])
        trained = step
        manager.save({"model": ModelWeights(model), "optimizer": optimizer}, SaveRequest(LoopState(step, step * 8), 2, "periodic"), writer=rank == 0,
                     wait=True)
        assert manager.committed_step == step
    if rank == 1:
        manager.shared = [_durable(f"{tmp}/blocked")]
    _train(model, optimizer, BATCHES[5:6])
    manager.save({"model": ModelWeights(model), "optimizer": optimizer}, SaveRequest(LoopState(6, 48), 2, "periodic"), writer=rank == 0, wait=True)
    torch.save({"committed": manager.committed_step, "share_bytes": manager._snapshot.nbytes},
               f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    (tmp / "blocked").mkdir()
    (tmp / "blocked" / "r").write_text("a file where the run's directory should be")
    mp.start_processes(_save_from_two_ranks, args=(str(tmp),), nprocs=2, start_method="spawn")
    return tmp


def test_each_rank_writes_half_the_state_and_a_failed_share_publishes_nothing(two_rank_checkpoints):
    tmp = two_rank_checkpoints
    durable = _durable(f"{tmp}/durable")
    assert durable.steps("r")[:2] == [6, 5]  # step 6's data arrived from rank 0 only: no manifest
    assert not durable.store.exists(f"{checkpoint_key('r', 6)}/{MANIFEST}")
    manifest = read_manifest(durable.store, checkpoint_key("r", 5))
    assert manifest.sharded and sorted(manifest.files) == sorted(
        ["__0_0.distcp", "__1_0.distcp", METADATA_FILE, STATE_FILE])
    ranks = [torch.load(f"{tmp}/rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["committed"] for r in ranks] == [5, 5], "both ranks must know step 6 was not committed"
    model, optimizer = _model()
    _train(model, optimizer, BATCHES[:1])
    full = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(),
                                                      *[v for s in optimizer.state.values() for v in s.values()]])
    shares = [r["share_bytes"] for r in ranks]
    assert sum(shares) == full and max(shares) <= 0.6 * full, f"shares {shares} of {full} bytes"


def test_restores_on_one_rank_and_trains_on_exactly_like_the_uninterrupted_run(two_rank_checkpoints, tmp_path):
    manager = CheckpointManager("r", {}, None, [_durable(f"{two_rank_checkpoints}/durable")], writes_local=False,
                                events=EventLog(), scratch_root=str(tmp_path))
    model, optimizer = _model()
    restored = manager.restore({"model": ModelWeights(model), "optimizer": optimizer}, rank=0)
    assert restored.loop.step == 5 and restored.loop.samples_seen == 40 and restored.tier == "durable"

    reference, reference_optimizer = _model()
    _train(reference, reference_optimizer, BATCHES[:5])
    for ours, theirs in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(ours, theirs)
    _train(model, optimizer, BATCHES[5:8])
    _train(reference, reference_optimizer, BATCHES[5:8])
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs), "optimizer state (moments, step counts) must round-trip exactly"


def test_a_corrupt_share_is_skipped_for_the_previous_checkpoint(two_rank_checkpoints, tmp_path, caplog):
    durable = _durable(str(tmp_path / "durable"))
    for step in (3, 5):
        key = checkpoint_key("r", step)
        source = LocalStore(f"{two_rank_checkpoints}/durable")
        for name in os.listdir(source.local_path(key)):
            durable.store.put_file(f"{key}/{name}", os.path.join(source.local_path(key), name))
    with open(stored_path(durable.store, checkpoint_key("r", 5), "__1_0.distcp"), "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    manager = CheckpointManager("r", {}, None, [durable], writes_local=False, events=EventLog(),
                                scratch_root=str(tmp_path / "scratch"))
    model, optimizer = _model()
    restored = manager.restore({"model": ModelWeights(model), "optimizer": optimizer}, rank=0)
    assert restored.loop.step == 3
    assert "step_00000005" in caplog.text and "__1_0.distcp" in caplog.text and "corrupt" in caplog.text


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_metadata_that_would_run_code_is_refused(two_rank_checkpoints, tmp_path):
    source = LocalStore(f"{two_rank_checkpoints}/durable")
    paths = {}
    for name in read_manifest(source, checkpoint_key("r", 5)).files:
        paths[name] = str(tmp_path / name)
        with open(stored_path(source, checkpoint_key("r", 5), name), "rb") as f, open(paths[name], "wb") as out:
            out.write(f.read())
    marker = tmp_path / "pwned"
    with open(paths[METADATA_FILE], "wb") as f:
        pickle.dump(_Exploit(str(marker)), f)
    with pytest.raises(pickle.UnpicklingError, match="os"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    with pytest.raises(InvalidCheckpoint, match="not allowed"):
        load_sharded(paths, read_manifest(LocalStore(f"{two_rank_checkpoints}/durable"), checkpoint_key("r", 5)).files)
    assert not marker.exists()


def test_a_dotted_name_through_an_allowed_module_is_refused(tmp_path):
    """The exploit: STACK_GLOBAL of DCP's metadata module with the name ``os.system`` (protocol 4
    resolves dotted names, and that module imports os)."""
    import torch.distributed.checkpoint.metadata as dcp_metadata

    assert dcp_metadata.os is os, "the exploit needs the module to import os"
    marker = tmp_path / "pwned"

    def unicode(text: str) -> bytes:
        data = text.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data

    exploit = (pickle.PROTO + b"\x04" + unicode("torch.distributed.checkpoint.metadata") + unicode("os.system")
               + pickle.STACK_GLOBAL + unicode(f"touch {marker}") + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
    (tmp_path / METADATA_FILE).write_bytes(exploit)
    with pytest.raises(pickle.UnpicklingError, match="os.system is not allowed"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert not marker.exists()


def test_shares_cover_every_tensor_once_balanced_by_bytes():
    sizes = {f"t{i}": size for i, size in enumerate([4096, 4096, 1024, 1024, 256, 64, 64, 8])}
    for world_size in (1, 2, 3, 5):
        shares = [owned_keys(sizes, rank, world_size) for rank in range(world_size)]
        assert sorted(k for share in shares for k in share) == sorted(sizes)
        loads = [sum(sizes[k] for k in share) for share in shares]
        assert max(loads) - min(loads) <= max(sizes.values())


def test_export_reads_a_sharded_checkpoint(two_rank_checkpoints, tmp_path):
    from raytrain_spot.export import MODEL_FILE, export_model
    from raytrain_spot.checkpoint.format import fetch_verified, load_state

    checkpoint = LocalStore(f"{two_rank_checkpoints}/durable").local_path(checkpoint_key("r", 5))
    export_model(checkpoint, str(tmp_path / "export"), "bf16")
    manifest, paths = fetch_verified(LocalStore(str(tmp_path)), "export", str(tmp_path))
    exported = load_state(paths[MODEL_FILE])
    reference, optimizer = _model()
    _train(reference, optimizer, BATCHES[:5])
    assert not manifest.sharded and set(exported) == set(reference.state_dict())
    for name, weight in reference.state_dict().items():
        assert exported[name].dtype == torch.bfloat16
        torch.testing.assert_close(exported[name].float(), weight, rtol=1e-2, atol=1e-2)
