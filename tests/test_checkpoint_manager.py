"""Async saves across tiers, coalescing, validated restore from the fastest tier, retention, advisor."""

import math
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist

from raytrain_spot.checkpoint.advisor import CheckpointCadence, IntervalAdvisor, daly_interval, job_mtbi_s
from raytrain_spot.checkpoint.format import MANIFEST, STATE_FILE, Manifest, checkpoint_key, listed_steps
from raytrain_spot.checkpoint.head import HeadStore
from raytrain_spot.checkpoint.manager import CheckpointManager, SaveRequest
from raytrain_spot.checkpoint.state import LoopState
from raytrain_spot.checkpoint.tiers import SaveCancelled, StoreTier, Transfer, steps_to_delete
from raytrain_spot.observe.events import EventLog
from raytrain_spot.storage.store import LocalStore
from tests.conftest import Recorder, stored_path

pytestmark = pytest.mark.usefixtures("single_rank_group")


def _model(value=0.0):
    model = torch.nn.Linear(32, 32)
    with torch.no_grad():
        model.weight.fill_(value)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 32)).sum().backward()
    optimizer.step()
    return model, optimizer


def _tiers(tmp_path, keep=3):
    local = StoreTier("local", LocalStore(str(tmp_path / "local")), "r", keep)
    durable = StoreTier("durable", LocalStore(str(tmp_path / "durable")), "r", keep)
    return local, durable


def _manager(tmp_path, local, shared, events=None, **kwargs):
    return CheckpointManager("r", {"run": {"name": "r"}}, local, shared, writes_local=True,
                             events=events or Recorder(), scratch_root=str(tmp_path / "scratch"), **kwargs)


def _corrupt(store, step):
    path = stored_path(store, checkpoint_key("r", step), STATE_FILE)
    with open(path, "r+b") as f:
        f.truncate(64)


def test_save_commits_every_tier_in_the_background_and_stalls_only_for_the_copy(tmp_path):
    local, durable = _tiers(tmp_path)
    events = Recorder()
    manager = _manager(tmp_path, local, [durable], events)
    model, optimizer = _model(1.0)
    saved = model.weight.detach().clone()
    stall = manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(10, 40), 2, "periodic"), writer=True)
    with torch.no_grad():
        model.weight.fill_(99.0)  # training goes on while the write runs: the snapshot must not see this
    manager.wait()
    assert stall < 0.5 and manager.committed_step == 10
    assert listed_steps(local.store, "r") == listed_steps(durable.store, "r") == [10]
    fresh, fresh_optimizer = _model()
    restored = manager.restore({"model": fresh, "optimizer": fresh_optimizer}, rank=0)
    assert torch.equal(fresh.weight, saved)
    assert restored.loop.step == 10 and restored.tier == "local"
    record = next(r for r in events.records if r["ev"] == "checkpoint")
    assert record["tier"] == "durable" and record["stall_s"] == pytest.approx(stall) and record["bytes"] > 0


def test_a_save_asked_for_while_one_runs_is_deferred_not_queued(tmp_path):
    local, _ = _tiers(tmp_path)
    uploads_may_go = threading.Event()

    class HeldStore(LocalStore):
        """Durable storage that holds every upload until the test lets it go: the first save stays in flight."""

        def put_file(self, key, path):
            assert uploads_may_go.wait(30)
            super().put_file(key, path)

    durable = StoreTier("durable", HeldStore(str(tmp_path / "held")), "r", 3)
    manager = _manager(tmp_path, local, [durable])
    parts = dict(zip(("model", "optimizer"), _model()))
    manager.save(parts, SaveRequest(LoopState(1, 1), 1, "periodic"), writer=True)
    assert manager.busy
    requests = [SaveRequest(LoopState(step, step), 1, "periodic") for step in (2, 3, 4)]
    for request in requests:
        assert manager.save(parts, request, writer=True) == 0.0, "a deferred save takes no snapshot"
        assert manager.deferred is request, "the newest request replaces the deferred one"
    uploads_may_go.set()
    manager.wait()
    assert listed_steps(durable.store, "r") == [1], "the deferred requests were not queued behind it"
    assert manager.deferred is requests[-1] and manager.last_save_step == 1


def test_a_handoffs_node_copy_is_written_beside_a_periodic_save_in_flight_not_after_it(tmp_path):
    local, _ = _tiers(tmp_path)
    uploads_may_go, held_upload_over = threading.Event(), threading.Event()

    class HeldStore(LocalStore):
        def put_file(self, key, path):
            try:
                assert uploads_may_go.wait(20)
            finally:
                held_upload_over.set()
            super().put_file(key, path)

    durable = StoreTier("durable", HeldStore(str(tmp_path / "held")), "r", 3)
    events = Recorder()
    manager = _manager(tmp_path, local, [durable], events)
    model, optimizer = _model(1.0)
    manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(1, 1), 1, "periodic"), writer=True)
    with torch.no_grad():
        model.weight.fill_(5.0)  # the handoff's step: the state the group ends with
    handoff = SaveRequest(LoopState(2, 2), 1, "jit", reason="preemption", shared=False)
    manager.save({"model": model, "optimizer": optimizer}, handoff, writer=True, wait=True)
    assert not held_upload_over.is_set() and local.steps("r")[:1] == [2], "it did not wait for the held upload"
    assert [(e["step"], e["tier"], e["kind"]) for e in events.records if e["ev"] == "checkpoint"] == [(2, "local", "jit")]
    restored, _ = _model(0.0)
    assert _manager(tmp_path, local, []).restore({"model": restored, "optimizer": optimizer}, 0).loop.step == 2
    assert torch.equal(restored.weight, torch.full((32, 32), 5.0))
    uploads_may_go.set()


@pytest.mark.parametrize("rank, node_copy_written", [(0, False), (1, True)])
def test_a_handoff_writes_no_node_copy_on_a_node_that_leaves_and_every_rank_reports(tmp_path, rank, node_copy_written):
    from raytrain_spot.elastic.policy import WorkerGroupHandoff
    from raytrain_spot.loop.decision import HandOff, HandoffReason
    from raytrain_spot.loop.handoff import hand_off

    local, durable = _tiers(tmp_path)
    manager = _manager(tmp_path, local, [durable])
    model, optimizer = _model(1.0)
    reported = []
    handoff = HandOff(HandoffReason.PREEMPTION, step=4, world_size=2, writer=1, leaving_ranks=(0,))
    with pytest.raises(WorkerGroupHandoff) as raised:
        hand_off(handoff, manager, {"model": model, "optimizer": optimizer}, LoopState(4, 4), rank,
                 ["leaving-node", "staying-node"], Recorder(), reported.append, lambda nodes: None)
    assert reported == [4], "every rank joins the report: it is the barrier before the restart"
    assert raised.value.node_copies == ("staying-node",), "the controller learns where the step lives alone"
    assert (local.steps("r") == [4]) is node_copy_written
    assert durable.steps("r") == [], "a node stays: the next group copies the step on"


def test_the_controllers_copy_on_commits_a_node_copy_verified_without_torch_and_never_a_damaged_one(tmp_path):
    from raytrain_spot.checkpoint.copy_on import node_tiers
    from raytrain_spot.config.schema import config_from_dict

    config = {"run": {"name": "r"}, "checkpoint": {"local_dir": str(tmp_path / "node-local")}}
    storage_uri = f"file://{tmp_path / 'storage'}"
    local, shared = node_tiers(config_from_dict(config), storage_uri, None, None, "node-a")
    model, optimizer = _model(3.0)
    for step in (5, 6):
        handoff = SaveRequest(LoopState(step, step), 2, "jit", reason="regrow", shared=False)
        _manager(tmp_path, local, shared).save({"model": model, "optimizer": optimizer}, handoff, writer=True,
                                               wait=True)
    _corrupt(local.store, 6)
    probe = (f"import json, sys; from raytrain_spot.checkpoint.copy_on import commit_node_copy; "
             f"print(json.dumps([commit_node_copy({config!r}, {storage_uri!r}, None, None, None, 'node-a', step) "
             f"for step in (6, 5)]), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "InvalidCheckpoint" in result.stderr, "a damaged copy fails the copy-on"
    probe = probe.replace("(6, 5)", "(5,)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["[true]", "False"], "copied on, in a process without the training stack"
    assert shared[0].steps("r") == [5]
    (tmp_path / "fetched").mkdir()
    manifest, _ = shared[0].fetch(checkpoint_key("r", 5), str(tmp_path / "fetched"))
    assert (manifest.kind, manifest.reason, manifest.world_size) == ("jit", "regrow", 2)


@pytest.mark.parametrize("copied_by_controller", [False, True])
def test_a_step_restored_from_node_copies_alone_is_copied_on_unless_the_controller_copies_it(tmp_path,
                                                                                             copied_by_controller):
    local, durable = _tiers(tmp_path)
    model, optimizer = _model(2.0)
    handoff = SaveRequest(LoopState(8, 8), 1, "jit", reason="regrow", shared=False)
    _manager(tmp_path, local, [durable]).save({"model": model, "optimizer": optimizer}, handoff, writer=True, wait=True)
    restarted = _manager(tmp_path, local, [durable])
    restored = restarted.restore({"model": model, "optimizer": optimizer}, 0,
                                 copied_by_controller=8 if copied_by_controller else None)
    restarted.wait()
    assert restored.loop.step == 8 and restored.tier == "local"
    assert durable.steps("r") == ([] if copied_by_controller else [8]), \
        "the controller's upload and the group's would spoil each other on the head"


def test_a_cancelled_save_stops_while_it_is_written_and_leaves_nothing(tmp_path):
    # A handoff's node copies are written beside the save they cancel: that one must not go on
    # taking the node's cores and disk for seconds (nor retry in memory, as for a full disk).
    local, durable = _tiers(tmp_path)
    manager = _manager(tmp_path, local, [durable])
    transfer = Transfer()
    transfer.cancelled.set()
    with pytest.raises(SaveCancelled):
        manager._serialize({"weights": torch.zeros(1 << 20)}, 7, transfer)
    assert os.listdir(tmp_path / "scratch") == [] and not any("step_00000007" in name for name in os.listdir("/dev/shm"))


def test_restore_prefers_the_fastest_valid_tier_and_skips_damaged_copies(tmp_path, caplog):
    local, durable = _tiers(tmp_path)
    manager = _manager(tmp_path, local, [durable])
    saved = {}
    for step, value in ((10, 1.0), (20, 2.0)):
        model, optimizer = _model(value)
        saved[step] = model.weight.detach().clone()
        manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(step, step), 1, "periodic"), writer=True, wait=True)

    _corrupt(local.store, 20)
    fresh, fresh_optimizer = _model()
    restored = manager.restore({"model": fresh, "optimizer": fresh_optimizer}, rank=0)
    assert (restored.loop.step, restored.tier) == (20, "durable")
    assert "step_00000020 on the local tier" in caplog.text

    _corrupt(durable.store, 20)
    restored = manager.restore({"model": fresh, "optimizer": fresh_optimizer}, rank=0)
    assert (restored.loop.step, restored.tier) == (10, "local")
    assert torch.equal(fresh.weight, saved[10])


def test_manifest_less_and_empty_tiers_mean_a_fresh_start(tmp_path):
    local, durable = _tiers(tmp_path)
    manager = _manager(tmp_path, local, [durable])
    model, optimizer = _model()
    manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(5, 5), 1, "periodic"), writer=True, wait=True)
    for tier in (local, durable):
        os.unlink(os.path.join(tier.store.local_path(checkpoint_key("r", 5)), MANIFEST))
    model, optimizer = _model()
    assert manager.restore({"model": model, "optimizer": optimizer}, rank=0) is None


def test_failed_write_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path):
    local, durable = _tiers(tmp_path)
    events = Recorder()
    manager = _manager(tmp_path, local, [durable], events)
    model, optimizer = _model(1.0)
    manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(1, 1), 1, "periodic"), writer=True, wait=True)

    def broken(*args, **kwargs):
        raise OSError("bucket unreachable")

    durable.store.put_file = broken
    manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(2, 2), 1, "periodic"), writer=True, wait=True)
    assert manager.committed_step == 1
    assert listed_steps(durable.store, "r") == [1]
    assert any(r["ev"] == "checkpoint_failed" and r["step"] == 2 for r in events.records)


def test_retention_keeps_the_newest_k_commits_and_milestones_and_drops_stale_partials():
    assert steps_to_delete([90, 80, 70, 60, 50, 40], [], keep_latest_k=2, milestone_every=0) == [70, 60, 50, 40]
    assert steps_to_delete([90, 80, 70, 60, 50, 40], [], keep_latest_k=2, milestone_every=30) == [70, 50, 40]
    # partials: older than the newest commit are stale; newer ones may be in flight
    assert steps_to_delete([90, 80, 70], [95, 85, 60], keep_latest_k=2, milestone_every=0) == [85, 70, 60]
    assert steps_to_delete([], [40, 30], keep_latest_k=2, milestone_every=0) == [], "no commit yet: nothing is stale"


def test_tier_retention_applies_on_commit(tmp_path):
    local, durable = _tiers(tmp_path, keep=2)
    manager = _manager(tmp_path, local, [durable])
    model, optimizer = _model()
    for step in range(1, 6):
        manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(step, step), 1, "periodic"), writer=True, wait=True)
    assert listed_steps(durable.store, "r") == [5, 4]
    assert listed_steps(local.store, "r") == [5, 4]


def test_head_store_verifies_what_arrives_and_forwards_to_durable_storage(tmp_path):
    head = HeadStore(str(tmp_path / "head"), "r", "file://" + str(tmp_path / "durable"), keep_latest_k=2,
                     milestone_every=0, durable_interval_s=0.0, events=Recorder())
    local, _ = _tiers(tmp_path)
    manager = _manager(tmp_path, local, [])
    model, optimizer = _model(3.0)
    manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(7, 7), 1, "final"), writer=False, wait=True)
    key = checkpoint_key("r", 7)
    data = open(stored_path(local.store, key, STATE_FILE), "rb").read()
    manifest = open(os.path.join(local.store.local_path(key), MANIFEST), "rb").read()
    head.write_chunk(key, STATE_FILE, 0, data[: len(data) // 2])
    with pytest.raises(Exception, match="truncated"):
        head.commit(key, manifest)  # half the bytes arrived: refused
    assert head.steps() == []
    assert not os.path.exists(tmp_path / "head" / ".incoming" / key), "a refused commit frees what arrived"
    head.write_chunk(checkpoint_key("r", 6), STATE_FILE, 0, b"a writer that died mid-transfer")
    head.write_chunk(key, STATE_FILE, 0, data[: len(data) // 2])
    head.write_chunk(key, STATE_FILE, len(data) // 2, data[len(data) // 2:])
    head.commit(key, manifest)
    assert head.steps() == [7]
    assert os.listdir(tmp_path / "head" / ".incoming" / "r" / "checkpoints") == [], "stale partial files are swept"
    assert head.wait_for_uploads(timeout_s=30) == 7
    assert listed_steps(LocalStore(str(tmp_path / "durable")), "r") == [7]
    held = Manifest.from_json(head.read_manifest(key)).files[STATE_FILE]
    assert held.object != STATE_FILE and head.read_chunk(key, held.object, 0, 100) == data[:100]


def test_young_daly_matches_a_numerical_optimum():
    cost, mtbi = 30.0, 3600.0

    def expected_waste(interval):  # first-order waste per unit time: checkpoint cost + lost work
        return cost / interval + (interval + cost) / (2 * mtbi)

    numeric = min((expected_waste(t), t) for t in [x * 0.5 for x in range(20, 4000)])[1]
    assert daly_interval(cost, mtbi) == pytest.approx(numeric, rel=0.05)
    assert daly_interval(cost, mtbi) == pytest.approx(math.sqrt(2 * cost * mtbi), rel=0.1)
    assert daly_interval(5000.0, 1000.0) == 1000.0  # C >= 2M: checkpoint once per MTBI


def test_advisor_uses_observed_interruptions_and_the_commit_floor():
    advisor = IntervalAdvisor(node_mtbi_prior_s=4 * 3600, min_interval_s=1, max_interval_s=3600)
    prior_only = advisor.decide(stall_s=0.01, commit_s=0.2, interruptions=0, observed_s=0, world_size=4,
                                step_time_s=0.1)
    assert prior_only.mtbi_s == pytest.approx(3600)
    assert prior_only.interval_s == pytest.approx(daly_interval(0.01, 3600))
    flaky = advisor.decide(stall_s=0.01, commit_s=0.2, interruptions=9, observed_s=1400, world_size=4,
                           step_time_s=0.1)
    assert flaky.mtbi_s == pytest.approx(job_mtbi_s(4 * 3600, 4, 9, 1400)) and flaky.mtbi_s == pytest.approx(500)
    assert flaky.interval_s < prior_only.interval_s
    slow_commit = advisor.decide(stall_s=0.01, commit_s=60.0, interruptions=0, observed_s=0, world_size=4,
                                 step_time_s=0.1)
    assert slow_commit.interval_s == 60.0 and slow_commit.interval_steps == 600
    assert "Young/Daly" in slow_commit.explain()


def test_cadence_adopts_only_material_changes_and_keeps_a_configured_interval():
    advisor = IntervalAdvisor(node_mtbi_prior_s=4 * 3600, min_interval_s=1, max_interval_s=3600)
    cadence = CheckpointCadence(None, advisor)
    assert cadence.interval_steps is None and cadence.update([], [], 0, 10.0, 2, 100) is None
    first = cadence.update([0.01], [0.5], interruptions=0, observed_s=10.0, world_size=2, steps=100)
    assert first is not None and cadence.interval_steps == first.interval_steps
    # A slightly different stall moves the advice by well under 20%: not adopted.
    assert cadence.update([0.01, 0.0105], [0.5], 0, 20.0, 2, 200) is None
    assert cadence.interval_steps == first.interval_steps
    # Interruptions shrink the job's MTBI, and so the interval, by far more: adopted.
    flaky = cadence.update([0.01], [0.5], interruptions=5, observed_s=60.0, world_size=2, steps=600)
    assert flaky is not None and cadence.interval_steps == flaky.interval_steps < 0.8 * first.interval_steps

    fixed = CheckpointCadence(50, advisor)
    assert fixed.update([0.01], [0.5], 5, 60.0, 2, 600) is None and fixed.interval_steps == 50


def _two_rank_restore(rank, tmp, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg2", rank=rank, world_size=2)
    local = StoreTier("local", LocalStore(f"{tmp}/local-{rank}"), "r", 3)
    durable = StoreTier("durable", LocalStore(f"{tmp}/durable"), "r", 3)
    manager = CheckpointManager("r", {}, local, [durable], writes_local=True, events=EventLog(),
                                scratch_root=f"{tmp}/scratch-{rank}")
    model, optimizer = _model()
    restored = manager.restore({"model": model, "optimizer": optimizer}, rank=rank)
    torch.save({"step": restored.loop.step, "tier": restored.tier, "weight": model.weight.detach()},
               f"{result_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_a_newer_checkpoint_on_another_ranks_disk_wins_and_is_shipped(tmp_path):
    """Rank 1's node kept step 20 on its local disk; rank 0 (say, a new node) sees only step 10."""
    import torch.multiprocessing as mp

    durable = StoreTier("durable", LocalStore(f"{tmp_path}/durable"), "r", 3)
    only_rank1 = StoreTier("local", LocalStore(f"{tmp_path}/local-1"), "r", 3)
    saved = {}
    for step, shared in ((10, [durable]), (20, [])):
        model, optimizer = _model(float(step))
        saved[step] = model.weight.detach().clone()
        manager = CheckpointManager("r", {}, only_rank1, shared, writes_local=step == 20, events=EventLog(),
                                    scratch_root=f"{tmp_path}/scratch")
        manager.save({"model": model, "optimizer": optimizer}, SaveRequest(LoopState(step, step), 2, "periodic"), writer=bool(shared),
                     wait=True)
    mp.start_processes(_two_rank_restore, args=(str(tmp_path), str(tmp_path)), nprocs=2, start_method="spawn")
    rank0, rank1 = (torch.load(f"{tmp_path}/rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (rank0["step"], rank0["tier"]) == (20, "peer")
    assert (rank1["step"], rank1["tier"]) == (20, "local")
    assert torch.equal(rank0["weight"], saved[20]) and torch.equal(rank1["weight"], saved[20])


LATE_S = 1.5


def _restore_with_rank_one_late(rank, tmp, result_dir):
    import time

    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg-late", rank=rank, world_size=2)
    durable = StoreTier("durable", LocalStore(f"{tmp}/durable"), "r", 3)
    manager = CheckpointManager("r", {}, None, [durable], writes_local=False, events=EventLog(),
                                scratch_root=f"{tmp}/scratch-{rank}")
    if rank == 1:
        time.sleep(LATE_S)  # a rank whose startup was slower
    model, optimizer = _model()
    restored = manager.restore({"model": model, "optimizer": optimizer}, rank=rank)
    torch.save({"duration_s": restored.duration_s, "read_s": restored.read_s}, f"{result_dir}/late{rank}.pt")
    dist.destroy_process_group()


def test_a_restore_tells_its_own_reading_from_waiting_for_a_late_rank(tmp_path):
    import torch.multiprocessing as mp

    durable = StoreTier("durable", LocalStore(f"{tmp_path}/durable"), "r", 3)
    model, optimizer = _model(3.0)
    CheckpointManager("r", {}, None, [durable], writes_local=False, events=EventLog(),
                      scratch_root=f"{tmp_path}/scratch").save({"model": model, "optimizer": optimizer},
                                                               SaveRequest(LoopState(10, 10), 2, "periodic"),
                                                               writer=True, wait=True)
    mp.start_processes(_restore_with_rank_one_late, args=(str(tmp_path), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    rank0 = torch.load(f"{tmp_path}/late0.pt", weights_only=True)
    assert rank0["duration_s"] >= LATE_S - 0.2, "rank 0 waited for rank 1 inside its restore"
    assert 0 < rank0["read_s"] < rank0["duration_s"] - LATE_S / 2, rank0


def test_ranks_that_loaded_different_copies_of_a_step_all_take_rank_zeros(tmp_path):
    """Both copies of step 30 verify against their own manifests, yet differ (a tier that kept a
    copy from another run of the same name): the ranks notice and agree on rank 0's."""
    import torch.multiprocessing as mp

    durable = StoreTier("durable", LocalStore(f"{tmp_path}/durable"), "r", 3)
    rank1_disk = StoreTier("local", LocalStore(f"{tmp_path}/local-1"), "r", 3)
    for value, local, shared in ((30.0, None, [durable]), (31.0, rank1_disk, [])):
        model, optimizer = _model(value)
        CheckpointManager("r", {}, local, shared, writes_local=local is not None, events=EventLog(),
                          scratch_root=f"{tmp_path}/scratch").save(
            {"model": model, "optimizer": optimizer}, SaveRequest(LoopState(30, 30), 2, "periodic"), writer=bool(shared),
            wait=True)
    mp.start_processes(_two_rank_restore, args=(str(tmp_path), str(tmp_path)), nprocs=2, start_method="spawn")
    rank0, rank1 = (torch.load(f"{tmp_path}/rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (rank0["tier"], rank1["tier"]) == ("durable", "peer")
    assert torch.equal(rank0["weight"], rank1["weight"]) and round(float(rank0["weight"][0, 0])) == 30, "rank 0's copy"
