"""Spot preemptions end to end: the main command on the embedded cluster under the Spot simulator.

Every run is compared with an uninterrupted run of the same seed and global batch: the same
samples at every step (whatever the world size), and a final loss within tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Set

import pytest

import yaml

from raytrain_spot.observe.events import read_events
from tests.conftest import REPO, assert_clean_audit, processes_of, ray_internal_lines, run_main

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

STEPS = 150
GLOBAL_BATCH = 24
LOSS_TOLERANCE = 0.05  # relative, on the mean loss of the last 10 steps


@dataclass
class Run:
    events: List[Dict]
    stdout: str
    ledger: Dict
    samples_by_step: Dict[int, Set[int]] = field(default_factory=dict)

    def of(self, kind: str) -> List[Dict]:
        return [e for e in self.events if e["ev"] == kind]

    @property
    def steps_redone(self) -> int:
        steps = [e["step"] for e in self.of("step")]
        return len(steps) - len(set(steps))

    @property
    def world_sizes(self) -> List[int]:
        return [g["world_size"] for g in self.of("group")]

    @property
    def final_loss(self) -> float:
        last = {e["step"]: e["loss"] for e in self.of("step")}  # a redone step's final value counts
        return sum(last[s] for s in range(STEPS - 9, STEPS + 1)) / 10


def main_overrides(tmp_path, name: str) -> List[str]:
    return ["+experiment=vlm", f"run.name={name}", f"trainer.max_steps={STEPS}",
            f"trainer.global_batch_size={GLOBAL_BATCH}", "trainer.micro_batch_size=8", "run.log_sample_ids=true",
            "trainer.log_every_steps=30", f"checkpoint.local_dir={tmp_path}/node-local",
            f"checkpoint.head_dir={tmp_path}/head"]


def train(tmp_path, name: str, *overrides: str, env: Optional[Dict[str, str]] = None) -> Run:
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")  # Ray's socket paths must stay short
    result = run_main(*main_overrides(tmp_path, name), *overrides,
                      cwd=str(tmp_path), env={"RAY_TMPDIR": ray_tmp, **(env or {})}, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert ray_internal_lines(result.stdout + result.stderr) == [], "Ray's own log lines reached the console"
    assert_clean_audit(name, f"file://{tmp_path}/outputs/storage", f"{tmp_path}/head", f"{tmp_path}/node-local",
                       STEPS, ray_tmp)
    run_dir = tmp_path / "outputs" / name
    run = Run(read_events(str(run_dir / "events.jsonl")), result.stdout, json.loads((run_dir / "ledger.json").read_text()))
    assert run.of("restore_mismatch") == [], "every tier's copy of a step must hold the same state"
    final: Dict[int, Dict[int, List[int]]] = defaultdict(dict)
    for record in run.of("samples"):  # a later record of the same step and rank replaces a redone one
        final[record["step"]][record["rank"]] = record["ids"]
    run.samples_by_step = {step: {i for ids in ranks.values() for i in ids} for step, ranks in final.items()}
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Run:
    return train(tmp_path_factory.mktemp("reference"), "reference", "checkpoint.interval_steps=30")


def assert_same_training_as(run: Run, reference: Run) -> None:
    assert sorted(run.samples_by_step) == list(range(1, STEPS + 1))
    consumed = [i for step in range(1, STEPS + 1) for i in run.samples_by_step[step]]
    assert len(consumed) == len(set(consumed)) == STEPS * GLOBAL_BATCH, "a sample was skipped or repeated"
    for step in range(1, STEPS + 1):
        assert run.samples_by_step[step] == reference.samples_by_step[step], f"step {step} trained on other samples"
    assert run.final_loss == pytest.approx(reference.final_loss, rel=LOSS_TOLERANCE)


def handoff_copies(run: Run) -> List[Dict]:
    """The just-in-time checkpoints a handoff waited for: the copies on the nodes that stay."""
    return [c for c in run.of("checkpoint") if c["kind"] == "jit" and c["tier"] == "local"]


def test_reference_run_is_sane(reference):
    assert reference.world_sizes == [3] and reference.steps_redone == 0
    assert [g["warm_standby"] for g in reference.of("group")] == [False], \
        "CPU training on nodes that share this machine's cores: no standbys unless asked for"
    losses = [e["loss"] for e in reference.of("step")]
    assert losses[-1] < 0.6 * losses[0]


# A regrow scenario's shrunk group alone can finish the short run before the replacement nodes have
# started on a loaded machine (CI saw it: the notice hold takes half the run, a node's start seconds).
STILL_TRAINING_WHEN_THE_NODES_ARE_BACK = ("task._target_=tests.short_handed.ShortHandedVLMTask",)


def test_notice_shrinks_then_regrows_with_no_step_redone(tmp_path, reference):
    # The regrow mechanism, whatever it buys: on 2 shared cores 3 workers are no faster than 2, so
    # the default rule (elastic.regrow=when_it_pays, tests/test_regrow.py) would rightly hold.
    run = train(tmp_path, "notice", "+chaos=events", "chaos.notice_s=4", "chaos.margin_s=1",
                "chaos.events=[{action:preempt,node:1,at_step:20},{action:restore,after_s:1}]",
                # The regrow mechanism, not its wait for a warm node (tests/test_elastic.py): on 2 shared
                # cores a joined node's idle-priority imports outlast this short run.
                "elastic.regrow=after_settle", "elastic.warm_wait_limit_s=0",
                # Standbys, off by default here (CPU training on nodes that share the machine's cores).
                "elastic.warm_standby=true", "elastic.standby_delay_s=0",  # the notice comes 2 s in
                *STILL_TRAINING_WHEN_THE_NODES_ARE_BACK, env={"PYTHONPATH": REPO})
    assert run.world_sizes == [3, 2, 3]
    assert [h["reason"] for h in run.of("handoff")] == ["preemption", "regrow"]
    assert run.steps_redone == 0
    assert [c["step"] for c in handoff_copies(run)] == [h["step"] for h in run.of("handoff")]
    # The next group copies each handoff's step on to the head (checkpoint/manager.py, replicate).
    assert {c["step"] for c in run.of("checkpoint") if c["kind"] == "jit" and c["tier"] == "head"} == \
        {h["step"] for h in run.of("handoff")}
    assert len(run.of("kill")) == 1 and run.of("kill")[0]["with_notice"] is True
    assert run.ledger["disruptions"]["preemptions"] == 1, "the ledger counts what the simulator did"
    assert all(g["warm_standby"] for g in run.of("group"))
    handoff, shrunk = run.of("handoff")[0], run.of("group")[1]
    assert min(shrunk["process_age_s"]) > shrunk["t"] - handoff["t"], "survivors restart in warm standbys"
    waits = [g["capacity_wait_s"] for g in run.of("group")]
    assert waits[0] is not None and waits[1:] == [0.0, 0.0], "the scaling policy tells each group how it started"
    assert_same_training_as(run, reference)


def test_two_nodes_preempted_at_once(tmp_path, reference):
    run = train(tmp_path, "two-at-once", "+chaos=events", "chaos.notice_s=4", "chaos.margin_s=1",
                "chaos.events=[{action:preempt,node:0,at_step:20},{action:preempt,node:1,at_step:20},"
                "{action:restore,after_s:1},{action:restore,after_s:1}]",
                "elastic.regrow=after_settle", "elastic.warm_wait_limit_s=0",  # the regrow back is the scenario
                *STILL_TRAINING_WHEN_THE_NODES_ARE_BACK, env={"PYTHONPATH": REPO})
    assert run.world_sizes[:2] == [3, 1], "both noticed nodes must leave in one restart"
    assert run.world_sizes[-1] == 3
    assert run.steps_redone == 0
    # Each handoff left one node holding its step: the controller copied it on to the head, and the next
    # group left that to it (elastic/stranded.py): one upload each, never two racing.
    assert sorted(c["step"] for c in run.of("checkpoint") if c["kind"] == "jit" and c["tier"] == "head") == \
        sorted(h["step"] for h in run.of("handoff"))
    assert run.ledger["disruptions"]["preemptions"] == len(run.of("kill")) == 2
    assert_same_training_as(run, reference)


def survivor_commits(run: Run) -> List[Dict]:
    return [c for c in run.of("checkpoint") if c["kind"] == "survivor"]


def test_a_loss_without_notice_redoes_no_step(tmp_path, reference):
    # The VM powers off: its peers hang in their collective until Ray declares its node dead; then they
    # commit the last step they completed, and the next group resumes there (loop/survivor_commit.py).
    # Checkpoints far apart: the simulator sees steps as the event log receives them, which a checkpoint
    # flushes, so with close ones the loss would land just after one, leaving the survivors nothing to add.
    run = train(tmp_path, "no-notice", "checkpoint.interval_steps=100", "+chaos=events",
                "chaos.events=[{action:preempt,node:1,at_step:25,no_notice:true},{action:restore,after_s:60}]")
    assert run.world_sizes == [3, 2]
    kill = run.of("kill")[0]
    assert kill["with_notice"] is False
    restart = run.of("group")[1]
    last_trained = max(e["step"] for e in run.of("step") if e["t"] < restart["t"])
    assert restart["restored_step"] == last_trained, "the survivors' commit of the last step"
    assert [c["step"] for c in survivor_commits(run)][:1] == [last_trained]
    assert run.steps_redone == 0
    assert_same_training_as(run, reference)


def test_two_nodes_lost_at_once_without_notice_redo_no_step(tmp_path, reference):
    run = train(tmp_path, "two-without-notice", "checkpoint.interval_steps=100", "+chaos=events",
                "chaos.events=[{action:preempt,node:0,at_step:25,no_notice:true},"
                "{action:preempt,node:1,at_step:25,no_notice:true},{action:restore,after_s:60},"
                "{action:restore,after_s:60}]")
    assert run.world_sizes == [3, 1], "both losses in one restart"
    assert survivor_commits(run) and run.steps_redone == 0, "the one survivor commits"
    assert_same_training_as(run, reference)


def test_preemption_during_a_checkpoint_never_trusts_the_half_written_one(tmp_path, reference):
    # At 1 MB/s a 2.8 MB checkpoint takes ~3 s to reach the head: rank 0, the writer, dies
    # without notice while one is in flight. The head never commits the dead writer's copy; the
    # survivors commit the last step they completed, and no step is redone.
    run = train(tmp_path, "during-checkpoint", "checkpoint.interval_steps=30", "checkpoint.max_transfer_mbps=1",
                "+chaos=events",
                "chaos.events=[{action:preempt,rank:0,at_step:62,no_notice:true},{action:restore,after_s:1}]")
    kill = run.of("kill")[0]
    restart = run.of("group")[1]
    head_commits_before = [c["step"] for c in run.of("checkpoint") if c["tier"] == "head" and c["t"] < kill["t"]]
    head_commits_in_restart = [(c["step"], c["kind"]) for c in run.of("checkpoint")
                               if c["tier"] == "head" and kill["t"] < c["t"] < restart["t"]]
    # The lost rank 0's last step records come later: the survivors write them again (it took them along).
    last_trained = max(e["step"] for e in run.of("step") if e["t"] < restart["t"])
    assert head_commits_in_restart == [(last_trained, "survivor")], \
        "the dead writer's checkpoint never lands; the survivors' does"
    assert max(head_commits_before, default=0) <= restart["restored_step"] == last_trained
    assert run.steps_redone == 0
    assert_same_training_as(run, reference)


DEATH_AFTER_A_NOTICE = ("chaos.events=[{action:preempt,node:2,at_step:20},{action:preempt,node:0,at_s:6,no_notice:true},"
                        "{action:restore,after_s:1},{action:restore,after_s:1}]")


def test_preemption_during_a_restart(tmp_path, reference):
    # The second node dies without notice while the group is restarting after the first notice (at
    # once: no warm-up hold, which would still be training when it dies; the next test).
    run = train(tmp_path, "during-restart", "+chaos=events", "chaos.notice_s=20", "elastic.notice_standby_wait_s=0",
                DEATH_AFTER_A_NOTICE)
    handoff = run.of("handoff")[0]
    hard_kill = next(k for k in run.of("kill") if not k["with_notice"])
    restarted = next(g for g in run.of("group") if g["t"] > handoff["t"])
    assert handoff["t"] < hard_kill["t"] < restarted["t"], "the second loss must land while the group restarts"
    assert restarted["world_size"] == 1 and restarted["restored_step"] == handoff["step"]
    assert run.steps_redone == 0, "the restart had not trained anything yet: nothing to redo"
    assert_same_training_as(run, reference)


def test_a_node_lost_during_a_notice_warmup_redoes_no_step(tmp_path, reference):
    # The same losses with the warm-up on (the default): the group trains on after the notice while
    # the survivors' standbys import, so the second node dies in the hold, not in a restart. The
    # survivors commit the last step the hold completed.
    run = train(tmp_path, "during-warmup", "+chaos=events", "chaos.notice_s=20", DEATH_AFTER_A_NOTICE)
    hold = run.of("notice_hold")[0]
    hard_kill = next(k for k in run.of("kill") if not k["with_notice"])
    assert hold["hold"] and "standbys there import" in hold["reason"] and hold["t"] < hard_kill["t"]
    assert run.of("handoff") == [] or run.of("handoff")[0]["t"] > hard_kill["t"], "the loss must land in the hold"
    assert hold["step"] in [c["step"] for c in run.of("checkpoint") if c["t"] < hard_kill["t"]], \
        "a hold begins with a checkpoint"
    restart = next(g for g in run.of("group") if g["t"] > hard_kill["t"])
    last_trained = max(e["step"] for e in run.of("step") if e["t"] < restart["t"])
    assert last_trained > hold["step"], "the hold trained before the loss"
    assert restart["restored_step"] == last_trained
    assert [c["step"] for c in survivor_commits(run)][:1] == [last_trained]
    assert run.steps_redone == 0
    assert_same_training_as(run, reference)


def test_a_notice_during_a_slow_periodic_save_cancels_it_and_the_jit_lands_in_the_notice(tmp_path, reference):
    # At 1 MB/s the periodic save of step 30 takes ~3 s to reach the head; the notice at step 31
    # leaves 3 s before the drain deadline. The JIT save must not queue behind the periodic one.
    run = train(tmp_path, "jit-over-periodic", "checkpoint.interval_steps=30", "checkpoint.max_transfer_mbps=1",
                "+chaos=events", "chaos.notice_s=4", "chaos.margin_s=1",
                "chaos.events=[{action:preempt,node:1,at_step:31},{action:restore,after_s:1}]")
    assert run.steps_redone == 0
    assert [c["step"] for c in run.of("checkpoint_cancelled")][:1] == [30], "the periodic save gives way"
    notice = run.of("notice")[0]
    jit = handoff_copies(run)[0]
    assert jit["t"] - notice["t"] < 3.0, "the JIT checkpoint must commit inside the notice"
    assert run.of("jit_late") == []
    assert_same_training_as(run, reference)


def test_all_spot_capacity_gone_for_a_while_the_run_waits_then_resumes(tmp_path, reference):
    run = train(tmp_path, "capacity-gone", "+chaos=events", "chaos.notice_s=4", "chaos.margin_s=1",
                "alerts.rules=[{type:no_capacity,threshold:10,action:notify}]",
                "chaos.events=[{action:preempt,node:0,at_step:20},{action:preempt,node:1,at_step:20},"
                "{action:preempt,node:2,at_step:20},{action:restore,after_s:20},{action:restore,after_s:20},"
                "{action:restore,after_s:20}]")
    assert len(run.of("kill")) == 3 and run.steps_redone == 0
    gone = max(k["t"] for k in run.of("kill"))
    back = next(g for g in run.of("group") if g["t"] > gone)
    assert back["restored_step"] == run.of("handoff")[0]["step"]
    assert run.ledger["time_s"]["waiting_for_capacity"] > 10, "the wait is counted as waiting for capacity"
    alert = next(a for a in run.of("alert") if a["alert"] == "no_capacity")
    assert gone < alert["t"] < back["t"], "the wait is told while it lasts"
    assert_same_training_as(run, reference)


def test_a_handoffs_step_on_the_nodes_that_stay_survives_them_while_the_next_group_waits_for_capacity(
        tmp_path, reference):
    # The group needs all three nodes; a notice takes one. The handoff leaves its step on the two that stay
    # (their node copies alone, for the next group to copy on), and the next group waits for a third node.
    # Both die without notice in that wait: the controller had one of them copy the step on to the head.
    run = train(tmp_path, "stranded", "trainer.min_workers=3", "+chaos=events", "chaos.notice_s=4",
                "chaos.margin_s=1", "elastic.notice_standby_wait_s=0",
                "chaos.events=[{action:preempt,node:1,at_step:20},{action:preempt,node:0,at_s:30,no_notice:true},"
                "{action:preempt,node:1,at_s:30,no_notice:true},{action:restore,after_s:10},"
                "{action:restore,after_s:10},{action:restore,after_s:10}]")
    handoff = run.of("handoff")[0]
    kills = sorted(k["t"] for k in run.of("kill"))
    assert len(kills) == 3 and run.world_sizes == [3, 3]
    copied = [c for c in run.of("checkpoint") if c["step"] == handoff["step"] and c["tier"] == "head"]
    assert len(copied) == 1 and copied[0]["t"] < kills[1], "copied on once, before the nodes that held it died"
    assert run.of("group")[1]["restored_step"] == handoff["step"] and run.steps_redone == 0
    assert_same_training_as(run, reference)


def test_a_sigkilled_driver_leaves_no_process_and_its_run_resumes_by_name(tmp_path, reference):
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")
    command = [sys.executable, "-m", "raytrain_spot.run", *main_overrides(tmp_path, "killed"),
               "+chaos=events", "chaos.events=[]"]
    driver = subprocess.Popen(command, cwd=str(tmp_path), env={**os.environ, "RAY_TMPDIR": ray_tmp},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events_path = tmp_path / "outputs" / "killed" / "events.jsonl"
    deadline = time.time() + 300
    while not (events_path.exists() and any(e["ev"] == "step" and e["step"] >= 40 for e in read_events(str(events_path)))):
        assert time.time() < deadline and driver.poll() is None, "the first driver never reached step 40"
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 30
    while (left := processes_of(ray_tmp)) and time.time() < deadline:
        time.sleep(0.5)
    assert left == [], f"a SIGKILLed driver left processes behind: {left}"

    run = train(tmp_path, "killed")  # the same name: the lease of the dead driver is free at once
    first_group = next(g for g in run.of("group") if g["t"] > max(e["t"] for e in run.of("start")))
    assert first_group["restored_step"] is not None and first_group["restored_step"] >= 5
    assert_same_training_as(run, reference)


def test_a_metadata_server_slow_at_the_notice_still_leaves_time_for_the_jit(tmp_path, reference):
    # The node's metadata server answers nothing for 3 s from the notice on, so the watcher hears it
    # 3 s late. With GCE's default notice the soft-off comes with it, and Ray's node, a service of the
    # shipped start commands, drains itself on the soft-off's SIGTERM at once: the JIT checkpoint lands
    # long before the kill 8 s after the notice. The handoff comes at once (no warm-up hold, which here
    # could train on to the run's last step).
    run = train(tmp_path, "slow-metadata", "+chaos=events", "chaos.notice_s=8", "chaos.margin_s=1",
                "elastic.notice_standby_wait_s=0",
                "chaos.events=[{action:preempt,node:1,at_step:20,metadata_delay_s:3},{action:restore,after_s:1}]")
    notice, drain, kill = run.of("notice")[0], run.of("drain")[0], run.of("kill")[0]
    assert run.of("soft_off")[0]["sigterm"] == "ray start --block"
    assert drain["t"] - notice["t"] < 2.5, "Ray's own drain at the soft-off, not the late watcher, started the handoff"
    jit = handoff_copies(run)[0]
    assert jit["t"] < kill["t"] and run.steps_redone == 0
    assert_same_training_as(run, reference)


# The worker start commands every GCP YAML had before its nodes ran as services: `ray up` runs them
# over SSH, so Ray's node and the watcher live in the login's session scope.
SSH_STARTED_NODE = [
    "ray stop",
    "ulimit -n 65536; RAY_AUTH_MODE=token RAY_preload_python_modules=raytrain_spot.elastic.preload "
    "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
    "(test -f ~/.raytrain-spot/watcher.pid && kill -INT \"$(cat ~/.raytrain-spot/watcher.pid)\" 2>/dev/null; true); "
    "RAY_ADDRESS=$RAY_HEAD_IP:6379 RAY_AUTH_MODE=token nohup python -m raytrain_spot.preemption.watcher "
    "--margin-s 5 --notice-s 30 >> ~/.raytrain-spot/watcher.log 2>&1 < /dev/null & echo $! > ~/.raytrain-spot/watcher.pid",
]
# GCE's default notice: `preempted` turns TRUE at the soft-off, the power-off comes 30 s later (6 s here,
# the units' timeouts compressed with it). The handoff comes at once: no warm-up hold.
SOFT_OFF = ("+chaos=events", "chaos.notice_s=6", "chaos.margin_s=1", "elastic.notice_standby_wait_s=0",
            "chaos.events=[{action:preempt,node:1,at_step:20},{action:restore,after_s:1}]")


def test_at_gces_soft_off_nodes_started_as_services_hand_off_with_no_step_redone(tmp_path, reference):
    run = train(tmp_path, "soft-off-services", *SOFT_OFF)  # the shipped GCP YAMLs' start commands
    notice, soft_off = run.of("notice")[0], run.of("soft_off")[0]
    assert soft_off["t"] - notice["t"] < 1.0 and soft_off["sigterm"] == "ray start --block"
    assert run.steps_redone == 0
    jit = [c["step"] for c in run.of("checkpoint") if c["kind"] == "jit"]
    assert jit and jit[0] == run.of("handoff")[0]["step"]
    assert_same_training_as(run, reference)


def test_at_gces_soft_off_nodes_started_over_ssh_lose_the_handoff(tmp_path, reference):
    cluster_yaml = tmp_path / "ssh-started.yaml"
    cluster_yaml.write_text(yaml.safe_dump({"worker_start_ray_commands": SSH_STARTED_NODE}))
    run = train(tmp_path, "soft-off-ssh", *SOFT_OFF, f"chaos.node_start={cluster_yaml}")
    assert run.of("soft_off")[0]["sigterm"] == "every process of Ray's node"
    jit = [c["step"] for c in run.of("checkpoint") if c["kind"] == "jit"]
    assert run.steps_redone > 0 or not jit, "the noticed rank died at the soft-off: no handoff can be clean"
    assert_same_training_as(run, reference)


@pytest.mark.slow  # two runs of the main command (6.7 min on 2 busy cores); the mechanism's tests run by default
def test_a_sharded_resume_from_the_bucket_alone_skips_a_step_whose_shard_was_truncated_to_match(tmp_path):
    """Issue 26, item 1, through the main command: the newest durable step has a shard truncated
    and its manifest entry updated to match (size and CRC32C agree). The audit calls it invalid,
    and a resume from the bucket alone (the head's and the nodes' stores lost) takes the newest
    durable step before it, where it used to fail on every rank with DCP's error."""
    from raytrain_spot.checkpoint.format import MANIFEST, Manifest, checkpoint_key, file_entry, stored_key
    from raytrain_spot.checkpoint.verify import INVALID, VALID, audit
    from raytrain_spot.storage.store import LocalStore

    name, ray_tmp = "sharded", tempfile.mkdtemp(prefix="rts-", dir="/tmp")
    common = ["+experiment=vlm", f"run.name={name}", "cluster.num_worker_nodes=2", "trainer.max_workers=2",
              "trainer.global_batch_size=24", "checkpoint.interval_steps=10", "checkpoint.sharded=true"]
    tiers = [f"checkpoint.local_dir={tmp_path}/node-local", f"checkpoint.head_dir={tmp_path}/head"]
    first = run_main(*common, *tiers, "trainer.max_steps=30", cwd=str(tmp_path), env={"RAY_TMPDIR": ray_tmp})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    storage = LocalStore(str(tmp_path / "outputs" / "storage"))
    key = checkpoint_key(name, 30)
    manifest = Manifest.from_json(storage.get_bytes(f"{key}/{MANIFEST}"))
    shard = storage.local_path(stored_key(key, "__1_0.distcp", manifest.files["__1_0.distcp"]))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    manifest.files["__1_0.distcp"] = replace(file_entry(shard), object=manifest.files["__1_0.distcp"].object)
    storage.put_bytes(f"{key}/{MANIFEST}", manifest.to_json())
    for lost in ("head", "node-local"):
        subprocess.run(["rm", "-rf", str(tmp_path / lost)], check=True)
    findings = audit(name, f"file://{storage.root}", f"{tmp_path}/head", f"{tmp_path}/node-local")
    assert {(f.tier, f.step) for f in findings if f.status == INVALID} == {("durable", 30)}
    before = max(f.step for f in findings if f.status == VALID)  # the head uploads at its own interval

    second = run_main(*common, *tiers, "trainer.max_steps=40", cwd=str(tmp_path), env={"RAY_TMPDIR": ray_tmp})
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    events = read_events(str(tmp_path / "outputs" / name / "events.jsonl"))
    second_start = [i for i, e in enumerate(events) if e["ev"] == "start"][1]
    restore = next(e for e in events[second_start:] if e["ev"] == "restore")
    assert (restore["step"], restore["tier"]) == (before, "durable")
    # Retention counts only commits that verify: the damaged step, older than a valid one, is gone.
    assert_clean_audit(name, f"file://{storage.root}", f"{tmp_path}/head", f"{tmp_path}/node-local", 40, ray_tmp)
