"""The training loop's handoff and save decisions, on a plain gloo group with no Ray cluster.

The cluster's signals come from a fault injector keyed on the step (``notice_at(step, rank)``,
``capacity_at(step, workers)``); the loop, the agreement, the checkpoint manager and a durable
tier on local disk are the real ones. A preempted run resumed at another world size must
continue the uninterrupted run's loss curve.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Set

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_spot.checkpoint.format import MANIFEST, STATE_FILE, checkpoint_key, load_state, read_manifest
from raytrain_spot.checkpoint.manager import CheckpointManager
from raytrain_spot.checkpoint.state import LoopState, StateMismatch, load_training_state, training_state
from raytrain_spot.checkpoint.tiers import StoreTier
from raytrain_spot.config.schema import CheckpointingConfig, Config, ElasticConfig, OptimConfig, TrainerConfig
from raytrain_spot.storage.store import LocalStore
from raytrain_spot.distributed.collectives import RankGroup
from raytrain_spot.elastic.policy import WorkerGroupHandoff
from bench.baselines import BASELINES
from raytrain_spot.loop.strategy import SPOT, Strategy
from raytrain_spot.loop.worker import MeasuredRestart, Phases, restart_since_handoff, run_group
from raytrain_spot.elastic.signals import ExtraCapacity, GroupStart
from raytrain_spot.loop.runtime import WorkerRuntime
from raytrain_spot import TaskContractError, TrainingTask
from tests.conftest import Recorder, stored_path

RUN = "loop"


class FaultInjector:
    """What the cluster says after each step, scripted: ``FaultInjector(nodes).notice_at(step=5, rank=1)``."""

    def __init__(self, node_ids: List[str]):
        self.node_ids = node_ids
        self.notices: Dict[int, int] = {}  # rank -> first step after which its node has a notice
        self.capacity: Optional[tuple] = None  # (step, workers)
        self.room: List[tuple] = []  # (from step, workers that fit without the noticed nodes)
        self.deadline_after_notice_s: Optional[float] = None
        self._noticed_at: Optional[float] = None  # this process's clock at the first notice it heard
        self.warmup: Optional[ScriptedWarmup] = None
        self.group_start = GroupStart()

    def notice_at(self, step: int, rank: int) -> "FaultInjector":
        self.notices[rank] = step
        return self

    def capacity_at(self, step: int, workers: int) -> "FaultInjector":
        self.capacity = (step, workers)
        return self

    def drain_deadline_after_notice(self, seconds: float) -> "FaultInjector":
        self.deadline_after_notice_s = seconds
        return self

    def standbys_warm_after(self, seconds: float) -> "FaultInjector":
        """A notice warm-up whose standbys are warm this long after it starts."""
        self.warmup = ScriptedWarmup(seconds)
        return self

    def started_after_waiting_for_capacity(self, seconds: float) -> "FaultInjector":
        """The scaling policy waited this long for capacity before it started this group (the test waits it out)."""
        self.group_start = GroupStart(waited_s=seconds)
        return self

    def room_elsewhere(self, workers: int, from_step: int = 0) -> "FaultInjector":
        self.room.append((from_step, workers))
        return self

    def leaving_nodes(self, step: int) -> Set[str]:
        leaving = {self.node_ids[rank] for rank, at in self.notices.items() if step >= at}
        if leaving and self._noticed_at is None:
            self._noticed_at = time.time()
        return leaving

    def usable_workers(self, step: int, leaving: Collection[str]) -> Optional[int]:
        return max(((at, workers) for at, workers in self.room if step >= at), default=(0, None))[1]

    def extra_capacity(self, step: int) -> Optional[ExtraCapacity]:
        """The capacity has been there since long before the step it is heard at."""
        return ExtraCapacity(self.capacity[1], math.inf) if self.capacity and step >= self.capacity[0] else None

    def drain_deadline_s(self, nodes: Collection[str]) -> Optional[float]:
        if self.deadline_after_notice_s is None or self._noticed_at is None:
            return None
        return self._noticed_at + self.deadline_after_notice_s


class ScriptedWarmup:
    """Standbys on the nodes a notice leaves, warm ``warm_after_s`` after the warm-up starts."""

    def __init__(self, warm_after_s: float):
        self.warm_after_s = warm_after_s
        self._started_at: Optional[float] = None

    def start(self, wanted):
        assert self._started_at is None, "one warm-up per group"
        self._started_at = time.time()

    def missing(self, wanted) -> int:
        return 0 if time.time() - self._started_at >= self.warm_after_s else sum(wanted.values())


class Counter:
    """Extra state a task declares: how many micro-batches this rank's loss has seen."""

    def __init__(self):
        self.count = 0

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


@dataclass
class LinearTask(TrainingTask):
    """Least squares on a fixed random linear map: small, deterministic, and the loss falls."""

    breach: str = ""
    """'' or the contract breach to commit: scalar_loss, changing_items, rank_dependent_model."""
    step_s: float = 0.0
    """Make every step last at least this long (a save then finishes within a step)."""

    def __post_init__(self):
        self.counter = Counter()

    def build_model(self) -> torch.nn.Module:
        model = torch.nn.Linear(8, 1)
        if self.breach == "rank_dependent_model":
            with torch.no_grad():
                model.bias.fill_(float(dist.get_rank()))
        return model

    def build_dataset(self, seed: int):
        breach = self.breach

        class Points(torch.utils.data.Dataset):
            def __len__(self):
                return 256

            def __getitem__(self, index):
                rng = np.random.default_rng([seed, index])
                x = rng.standard_normal(8).astype(np.float32)
                if breach == "changing_items":
                    x = x + np.random.standard_normal(8).astype(np.float32)
                return torch.from_numpy(x), torch.tensor([x @ np.arange(1, 9, dtype=np.float32)])

        return Points()

    def collate(self, samples):
        xs, ys = zip(*samples)
        return torch.stack(xs), torch.stack(ys)

    def loss(self, model, batch):
        self.counter.count += 1
        time.sleep(self.step_s / 2)  # two micro-batches a step
        x, y = batch
        per_sample = ((model(x) - y) ** 2).squeeze(1)
        return per_sample.mean() if self.breach == "scalar_loss" else per_sample

    def extra_state(self):
        return {"counter": self.counter}


@dataclass
class OptimizerProbe(LinearTask):
    """Writes, at each micro-batch's loss (inside a step, before its update), a fingerprint of what a
    checkpoint taken then would hold of the optimizer: a survivor's commit is taken then."""

    record: str = ""

    def build_optimizer(self, model, optim):
        self.optimizer = super().build_optimizer(model, optim)
        return self.optimizer

    def loss(self, model, batch):
        with open(self.record, "a") as f:
            f.write(fingerprint(self.optimizer.state_dict()) + "\n")
        return super().loss(model, batch)


def fingerprint(state) -> str:
    """Of a state nest's values (not of how its tensors share storage)."""
    digest = hashlib.sha256()

    def walk(value):
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        else:
            digest.update(repr(value).encode())

    walk(state)
    return digest.hexdigest()[:16]


def config(max_steps: int, interval_steps: int = 0, regrow: str = "after_settle", notice_standby_wait_s: float = 10.0,
           **trainer) -> Config:
    return Config(trainer=TrainerConfig(min_workers=1, max_workers=2, global_batch_size=8, micro_batch_size=2,
                                        max_steps=max_steps, torch_threads=1, **trainer),
                  elastic=ElasticConfig(regrow=regrow, notice_standby_wait_s=notice_standby_wait_s),
                  checkpoint=CheckpointingConfig(interval_steps=interval_steps),
                  optim=OptimConfig(lr=0.1, warmup_samples=0, weight_decay=0.0),
                  task={"_target_": "tests.test_loop.LinearTask"})


def run_rank(storage: str, faults: FaultInjector, cfg: Config, task: LinearTask, out: str,
             strategy: Strategy = SPOT) -> dict:
    """One rank of a group: train until the end, a handoff or a contract error; what it saw.
    Every rank is on a node of its own and keeps that node's local copy, as in a run."""
    group = RankGroup(torch.device("cpu"))
    events, reports = Recorder(), []
    durable = StoreTier("durable", LocalStore(storage), RUN, keep_latest_k=5)
    local = StoreTier("local", LocalStore(f"{storage}-on-{faults.node_ids[group.rank]}"), RUN, keep_latest_k=5)
    checkpoints = CheckpointManager(RUN, cfg.to_dict(), local, [durable], writes_local=True, events=events,
                                    scratch_root=f"{storage}/../scratch-{group.rank}", group=group)
    node_ids = faults.node_ids[:group.world_size]
    runtime = WorkerRuntime(group, node_ids, report=reports.append, signals=faults, group_start=faults.group_start)
    policy = strategy.group_policy(cfg, faults, node_ids, events.emit, faults.warmup)
    outcome: dict = {"outcome": "finished"}
    try:
        run_group(cfg, task, runtime, policy, checkpoints, events, Phases())
    except WorkerGroupHandoff as handoff:
        outcome = {"outcome": "handoff", "reason": handoff.reason, "step": handoff.step}
    except TaskContractError as error:
        outcome = {"outcome": "contract", "error": str(error)}
    result = {**outcome, "rank": group.rank, "reports": reports, "events": events.records,
              "counter": task.counter.count}
    with open(f"{out}/rank{group.rank}.json", "w") as f:
        json.dump(result, f, default=str)
    return result


def _spawned_rank(rank, world_size, init_file, storage, faults, cfg, task, out, strategy):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        run_rank(storage, faults, cfg, task, out, strategy)
    finally:
        dist.destroy_process_group()


def train_group(tmp_path, world_size: int, faults: FaultInjector, cfg: Config, task: Optional[LinearTask] = None,
                storage: Optional[str] = None, strategy: Strategy = SPOT) -> List[dict]:
    """A worker group of ``world_size`` ranks in fresh processes; each rank's result."""
    out = tmp_path / f"group-{len(list(tmp_path.glob('group-*')))}"
    out.mkdir()
    storage = storage or str(tmp_path / "durable")
    mp.start_processes(_spawned_rank, args=(world_size, str(out / "pg"), storage, faults, cfg, task or LinearTask(),
                                            str(out), strategy), nprocs=world_size, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def of(result: dict, kind: str) -> List[dict]:
    return [e for e in result["events"] if e["ev"] == kind]


def losses(result: dict) -> Dict[int, float]:
    return {e["step"]: e["loss"] for e in of(result, "step")}


NODES = ["node-a", "node-b", "node-c"]


def test_a_notice_hands_off_at_the_agreed_step_with_a_checkpoint_from_a_survivor(tmp_path):
    ranks = train_group(tmp_path, 2, FaultInjector(NODES).notice_at(step=5, rank=1), config(max_steps=20))
    assert [(r["outcome"], r["reason"], r["step"]) for r in ranks] == [("handoff", "preemption", 5)] * 2
    assert [h["preempted_ranks"] for h in of(ranks[0], "handoff")] == [[1]] and of(ranks[1], "handoff") == []
    manifest = read_manifest(node_copies(tmp_path, "node-a"), checkpoint_key(RUN, 5))
    assert (manifest.kind, manifest.reason, manifest.world_size) == ("jit", "preemption", 2)
    assert all(r["reports"][-1] == 5 for r in ranks), "no rank leaves before the checkpoint is reported"


def node_copies(tmp_path, node: str) -> LocalStore:
    """A node's local tier in train_group's layout."""
    return LocalStore(f"{tmp_path / 'durable'}-on-{node}")


def test_a_handoff_waits_for_the_staying_nodes_copies_and_the_next_group_copies_the_step_on(tmp_path):
    # The handoff's checkpoint is as large as the state; a node that stays reads its own copy back at
    # memory speed, so the handoff does not wait for the shared tiers (checkpoint/manager.py, SaveRequest.shared).
    train_group(tmp_path, 2, FaultInjector(NODES).notice_at(step=5, rank=1), config(max_steps=20))
    durable = LocalStore(str(tmp_path / "durable"))
    assert not durable.exists(f"{checkpoint_key(RUN, 5)}/{MANIFEST}"), "the handoff did not wait for durable storage"
    resumed = train_group(tmp_path, 1, FaultInjector(["node-a"]), config(max_steps=8, interval_steps=100))
    assert of(resumed[0], "restore")[0]["tier"] == "local" and of(resumed[0], "restore")[0]["step"] == 5
    manifest = read_manifest(durable, checkpoint_key(RUN, 5))
    assert (manifest.kind, manifest.reason) == ("jit", "preemption"), "the next group copied the step on, as saved"
    assert [(c["step"], c["tier"]) for c in of(resumed[0], "checkpoint")][:1] == [(5, "durable")]


def test_a_handoff_that_no_node_survives_waits_for_the_shared_tiers(tmp_path):
    ranks = train_group(tmp_path, 2, FaultInjector(NODES).notice_at(step=4, rank=0).notice_at(step=4, rank=1)
                        .room_elsewhere(workers=0), config(max_steps=20))
    assert [r["outcome"] for r in ranks] == ["handoff"] * 2
    assert read_manifest(LocalStore(str(tmp_path / "durable")), checkpoint_key(RUN, ranks[0]["step"])).kind == "jit"


def test_when_rank_0s_node_is_leaving_the_next_rank_writes(tmp_path):
    ranks = train_group(tmp_path, 2, FaultInjector(NODES).notice_at(step=3, rank=0), config(max_steps=20))
    assert [r["step"] for r in ranks] == [3, 3]
    assert of(ranks[0], "handoff") == [] and [h["nodes"] for h in of(ranks[1], "handoff")] == [["node-a"]]
    assert [c["step"] for c in of(ranks[1], "checkpoint")] == [3]
    assert read_manifest(node_copies(tmp_path, "node-b"), checkpoint_key(RUN, 3)).kind == "jit"


def test_every_node_keeps_the_same_checkpoint_so_a_restore_finds_no_mismatch(tmp_path):
    train_group(tmp_path, 2, FaultInjector(NODES), config(max_steps=4))  # the final save: a copy on each node
    # The resumed group: rank 0 on node-b, whose local copy rank 1 wrote; rank 1 on node-a.
    resumed = train_group(tmp_path, 2, FaultInjector(["node-b", "node-a"]), config(max_steps=6))
    assert [of(r, "restore")[0]["tier"] if of(r, "restore") else None for r in resumed][0] == "local"
    assert [e for r in resumed for e in of(r, "restore_mismatch")] == [], "the copies of one step must be equal"


def test_capacity_for_more_workers_regrows_through_the_same_handoff(tmp_path):
    ranks = train_group(tmp_path, 2, FaultInjector(NODES).capacity_at(step=4, workers=3), config(max_steps=20))
    assert [(r["reason"], r["step"]) for r in ranks] == [("regrow", 4)] * 2
    assert [(h["reason"], h["grow_to"]) for h in of(ranks[0], "handoff")] == [("regrow", 3)]
    assert read_manifest(node_copies(tmp_path, "node-a"), checkpoint_key(RUN, 4)).reason == "regrow"


def test_a_regrow_that_would_not_pay_before_the_run_ends_is_not_taken_and_the_decision_is_logged(tmp_path):
    ranks = train_group(tmp_path, 2, FaultInjector(NODES).capacity_at(step=4, workers=3),
                      config(max_steps=20, regrow="when_it_pays"))
    assert [r["outcome"] for r in ranks] == ["finished", "finished"], "ten seconds of restart for a 20-step run"
    decisions = of(ranks[0], "regrow_decision")
    assert decisions and not decisions[0]["grow"] and "before a regrow pays" in decisions[0]["reason"]
    assert of(ranks[1], "regrow_decision") == [], "rank 0 decides"


def test_the_ray_preemption_api_baseline_checkpoints_once_at_the_notice_and_trains_on(tmp_path):
    ranks = train_group(tmp_path, 2, FaultInjector(NODES).notice_at(step=4, rank=1),
                        config(max_steps=10), strategy=BASELINES["ray-preemption-api"])
    assert [r["outcome"] for r in ranks] == ["finished", "finished"], "the node's death, not a handoff, ends it"
    assert [(c["step"], c["kind"]) for c in of(ranks[0], "checkpoint")] == [(4, "jit"), (10, "final")]
    assert of(ranks[0], "handoff") == []


def test_a_notice_wins_over_a_regrow_at_the_same_step(tmp_path):
    faults = FaultInjector(NODES).capacity_at(step=4, workers=3).notice_at(step=4, rank=1)
    ranks = train_group(tmp_path, 2, faults, config(max_steps=20))
    assert [(r["reason"], r["step"]) for r in ranks] == [("preemption", 4)] * 2


def test_a_notice_with_nowhere_to_go_trains_on_and_hands_off_just_before_the_drain_deadline(tmp_path):
    faults = (FaultInjector(NODES).notice_at(step=6, rank=0).notice_at(step=6, rank=1).room_elsewhere(workers=0)
              .drain_deadline_after_notice(seconds=3.0))
    ranks = train_group(tmp_path, 2, faults, config(max_steps=400, interval_steps=2), task=LinearTask(step_s=0.05))
    (handoff,) = of(ranks[0], "handoff")
    assert [(r["outcome"], r["reason"]) for r in ranks] == [("handoff", "preemption")] * 2
    assert handoff["step"] > 6 + 10, "the steps between the notice and the deadline are trained"
    holds = of(ranks[0], "notice_hold")
    assert [h["hold"] for h in holds] == [True, False] and holds[0]["step"] == 6
    assert holds[1]["deadline_in_s"] <= holds[1]["needed_s"], "released for the deadline, with its numbers"
    deadline = holds[0]["t"] + 3.0  # the hold is decided as the notice is first heard
    jit = [c for c in of(ranks[0], "checkpoint") if c["kind"] == "jit"]
    assert [c["step"] for c in jit] == [handoff["step"]] and jit[0]["t"] < deadline
    assert of(ranks[0], "jit_late") == []


def test_a_notice_hold_ends_at_once_when_capacity_appears_elsewhere(tmp_path):
    faults = (FaultInjector(NODES).notice_at(step=4, rank=0).notice_at(step=4, rank=1).room_elsewhere(workers=0)
              .room_elsewhere(workers=1, from_step=9).drain_deadline_after_notice(seconds=60.0))
    ranks = train_group(tmp_path, 2, faults, config(max_steps=400, interval_steps=2), task=LinearTask(step_s=0.05))
    assert [(r["reason"], r["step"]) for r in ranks] == [("preemption", 9)] * 2
    assert [(h["hold"], h["usable_workers"]) for h in of(ranks[0], "notice_hold")] == [(True, 0), (False, 1)]


def test_a_group_that_has_not_saved_yet_holds_on_the_runs_earlier_commit_times(tmp_path):
    """Groups placed on nodes whose notice came while they started (bursts of notices) must hold
    too: the commit estimate travels in the loop state, not in the group's checkpoint manager."""
    first = FaultInjector(NODES).notice_at(step=6, rank=1).room_elsewhere(workers=1)
    train_group(tmp_path, 2, first, config(max_steps=400, interval_steps=2), task=LinearTask(step_s=0.05))
    noticed_at_start = (FaultInjector(NODES).notice_at(step=7, rank=0).notice_at(step=7, rank=1)
                        .room_elsewhere(workers=0).drain_deadline_after_notice(seconds=3.0))
    ranks = train_group(tmp_path, 2, noticed_at_start, config(max_steps=400), task=LinearTask(step_s=0.05))
    holds = of(ranks[0], "notice_hold")
    assert holds[0]["hold"] and holds[0]["step"] == 7, holds
    assert ranks[0]["step"] > 7 + 5


def loop_state(store: LocalStore, step: int) -> dict:
    """The loop state in the checkpoint of ``step``."""
    return load_state(stored_path(store, checkpoint_key(RUN, step), STATE_FILE))["loop"]


def test_a_restart_is_measured_from_the_handoff_less_the_scaling_policys_wait_for_capacity(tmp_path):
    """A group that lost its last node waits for new ones (a 41 s wait inside one restart on the V100 window
    held a regrow back a minute): the regrow rule weighs the restart, not the wait."""
    wait_s = 2.0
    train_group(tmp_path, 2, FaultInjector(NODES).notice_at(step=5, rank=1), config(max_steps=20))
    time.sleep(wait_s)
    resumed = train_group(tmp_path, 1, FaultInjector(["node-a"]).started_after_waiting_for_capacity(wait_s),
                          config(max_steps=8))
    handoff_at = loop_state(node_copies(tmp_path, "node-a"), 5)["handed_off_at"]
    (group,) = of(resumed[0], "group")
    measured = loop_state(node_copies(tmp_path, "node-a"), 8)
    assert measured["restarts_measured"] == 1
    assert measured["restart_s"] == pytest.approx(group["t"] - handoff_at - wait_s, abs=0.5)


def test_a_handoff_before_this_driver_started_is_no_restart_of_its_own():
    """A run resumed by a new driver from the last driver's handoff: the time between the two is no restart."""
    assert restart_since_handoff(100.0, 110.0, GroupStart(4.0, driver_started_at=50.0)) == MeasuredRestart(6.0, 4.0)
    assert restart_since_handoff(100.0, 5000.0, GroupStart(driver_started_at=4990.0)) is None
    assert restart_since_handoff(100.0, 110.0, None) is None, "no scaling policy said how the group started"


def test_a_notice_that_leaves_survivors_trains_on_until_their_standbys_are_warm(tmp_path):
    faults = (FaultInjector(NODES).notice_at(step=5, rank=1).room_elsewhere(workers=1)
              .drain_deadline_after_notice(seconds=60.0).standbys_warm_after(seconds=1.0))
    ranks = train_group(tmp_path, 2, faults, config(max_steps=400, interval_steps=2), task=LinearTask(step_s=0.05))
    assert [(r["outcome"], r["reason"]) for r in ranks] == [("handoff", "preemption")] * 2
    (handoff,) = of(ranks[0], "handoff")
    assert handoff["step"] > 5 + 10, "the group trains while the standbys warm"
    holds = of(ranks[0], "notice_hold")
    assert [(h["hold"], h["standbys_missing"]) for h in holds] == [(True, 1), (False, 0)], holds
    assert "while 1 standbys there import" in holds[0]["reason"], "node-a keeps rank 0: one standby"
    assert holds[1]["t"] - holds[0]["t"] >= 1.0 and "standbys warm" in holds[1]["reason"]
    assert loop_state(node_copies(tmp_path, "node-a"), handoff["step"])["handed_off_at"] > 0, \
        "the next group measures this restart"


def test_standbys_that_do_not_warm_in_time_are_not_waited_for(tmp_path):
    faults = (FaultInjector(NODES).notice_at(step=5, rank=1).room_elsewhere(workers=1)
              .drain_deadline_after_notice(seconds=60.0).standbys_warm_after(seconds=60.0))
    ranks = train_group(tmp_path, 2, faults, config(max_steps=400, interval_steps=2, notice_standby_wait_s=0.5),
                      task=LinearTask(step_s=0.05))
    holds = of(ranks[0], "notice_hold")
    assert [h["hold"] for h in holds] == [True, False] and "still importing after" in holds[1]["reason"]
    assert of(ranks[0], "handoff")[0]["step"] < 5 + 30
    off = (FaultInjector(NODES).notice_at(step=5, rank=1).room_elsewhere(workers=1)
           .drain_deadline_after_notice(seconds=60.0).standbys_warm_after(seconds=60.0))
    (tmp_path / "off").mkdir()
    ranks = train_group(tmp_path / "off", 2, off, config(max_steps=400, interval_steps=2, notice_standby_wait_s=0),
                      task=LinearTask(step_s=0.05))
    assert [r["step"] for r in ranks] == [5, 5], "elastic.notice_standby_wait_s=0 hands off at the notice"


def test_a_notice_that_leaves_survivors_hands_off_at_once(tmp_path):
    faults = (FaultInjector(NODES).notice_at(step=5, rank=1).room_elsewhere(workers=1)
              .drain_deadline_after_notice(seconds=60.0))
    ranks = train_group(tmp_path, 2, faults, config(max_steps=400, interval_steps=2), task=LinearTask(step_s=0.05))
    assert [(r["reason"], r["step"]) for r in ranks] == [("preemption", 5)] * 2


def test_inside_a_step_until_its_update_the_optimizer_holds_what_the_last_steps_checkpoint_holds(tmp_path):
    """A survivor commits the last step it completed while the next one is in flight (loop/survivor_commit.py).
    Its copy must hold what a save at that step holds: a restore found the head's copy of a step, a survivor's,
    unlike the nodes' periodic copies of it, because the next step's learning rate was already set."""
    record = tmp_path / "optimizer-inside-steps"
    [result] = train_group(tmp_path, 1, FaultInjector(NODES), config(max_steps=6, interval_steps=1),
                           OptimizerProbe(step_s=0.3, record=str(record)))
    assert result["outcome"] == "finished"
    inside = record.read_text().split()
    per_step = len(inside) // 6
    compared = 0
    for step in range(1, 6):
        key = checkpoint_key(RUN, step)
        if not node_copies(tmp_path, "node-a").exists(f"{key}/{MANIFEST}"):
            continue  # a save still in flight at this step: the loop skips it
        saved = load_state(stored_path(node_copies(tmp_path, "node-a"), key, STATE_FILE))["optimizer"]
        assert set(inside[step * per_step:(step + 1) * per_step]) == {fingerprint(saved)}, f"step {step + 1}"
        compared += 1
    assert compared >= 3


def test_periodic_saves_at_the_interval_and_a_final_one(tmp_path):
    ranks = train_group(tmp_path, 2, FaultInjector(NODES), config(max_steps=7, interval_steps=3),
                      task=LinearTask(step_s=0.3))
    assert [r["outcome"] for r in ranks] == ["finished", "finished"]
    assert [(c["step"], c["kind"]) for c in of(ranks[0], "checkpoint")] == [(3, "periodic"), (6, "periodic"),
                                                                             (7, "final")]
    assert ranks[1]["reports"][-1] == 7 and of(ranks[1], "checkpoint") == [], "only rank 0 writes"


@pytest.mark.parametrize("data_workers", [0, 2])
def test_a_preempted_run_resumed_at_another_size_continues_the_uninterrupted_loss_curve(tmp_path, data_workers):
    """Also with loader processes loading ahead (the reference loads on the training thread): what
    they loaded past the handoff is dropped and loaded again by the next group."""
    steps = 12
    reference = train_group(tmp_path, 1, FaultInjector(NODES), config(max_steps=steps), storage=str(tmp_path / "ref"))
    preempted = train_group(tmp_path, 2, FaultInjector(NODES).notice_at(step=5, rank=1),
                            config(max_steps=steps, data_workers=data_workers))
    resumed = train_group(tmp_path, 1, FaultInjector(NODES), config(max_steps=steps, data_workers=data_workers))
    assert [r["step"] for r in preempted] == [5, 5] and resumed[0]["outcome"] == "finished"
    assert of(resumed[0], "group")[0]["restored_step"] == 5
    curve = {**losses(preempted[0]), **losses(resumed[0])}
    assert sorted(curve) == list(range(1, steps + 1)), "no step skipped, none redone"
    expected = losses(reference[0])
    assert expected[steps] < 0.5 * expected[1], "the loss must fall for the comparison to mean anything"
    for step in range(1, steps + 1):
        assert math.isclose(curve[step], expected[step], rel_tol=1e-4), f"step {step}: {curve[step]} vs {expected[step]}"
    # The task's extra state came back: rank 0 had seen 5 steps x 2 micro-batches when it was saved.
    assert resumed[0]["counter"] == 5 * 2 + (steps - 5) * 4


@pytest.mark.parametrize("breach, message", [
    ("scalar_loss", "TrainingTask.loss returned () for a micro-batch of 2 samples; it must return one loss per sample"),
    ("changing_items", "returned different items on two reads"),
    ("rank_dependent_model", "build_model built different parameters on different ranks"),
])
def test_a_task_that_breaks_the_contract_stops_every_rank_with_the_fix(tmp_path, breach, message):
    ranks = train_group(tmp_path, 2, FaultInjector(NODES), config(max_steps=5), task=LinearTask(breach=breach))
    assert [r["outcome"] for r in ranks] == ["contract", "contract"]
    assert all(message in r["error"] and "Fix:" in r["error"] for r in ranks), ranks[0]["error"]
    assert all(r["counter"] <= 1 for r in ranks), "it stops at once, before a step commits"


def test_a_part_may_not_take_the_loop_states_name_and_a_missing_part_is_named():
    with pytest.raises(ValueError, match="'loop'"):
        training_state({"loop": Counter()}, LoopState())
    saved = training_state({"model": torch.nn.Linear(2, 2)}, LoopState(step=3))
    with pytest.raises(StateMismatch, match=r"not \['counter'\]"):
        load_training_state({"model": torch.nn.Linear(2, 2), "counter": Counter()}, saved)
    assert load_training_state({"model": torch.nn.Linear(2, 2)}, saved).step == 3
