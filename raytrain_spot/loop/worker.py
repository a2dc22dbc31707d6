"""The training loop each Ray Train worker runs. Read ``run_group`` top to bottom: step, agree,
update, apply the decision (loop/decision.py).

The loop knows no model: the task (loop/task.py) builds it, the dataset and the loss. What the
loop needs from Ray is injected (``WorkerRuntime``, the ``GroupPolicy``), so the same loop runs in
a plain process group in tests; ``run_worker`` is the Ray Train entry that builds them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import psutil
import ray.train
import torch
from torch.nn.parallel import DistributedDataParallel

from raytrain_spot._ray import TRAIN_UTIL_LOGGER
from raytrain_spot.checkpoint.advisor import CheckpointCadence, IntervalAdvisor
from raytrain_spot.checkpoint.manager import CheckpointManager, Restored, SaveRequest
from raytrain_spot.checkpoint.state import LoopState, ModelWeights
from raytrain_spot.checkpoint.copy_on import node_tiers
from raytrain_spot.config.schema import Config, config_from_dict
from raytrain_spot.elastic.capacity import GroupStarts, watch_capacity
from raytrain_spot.elastic.regrow import measured_rate
from raytrain_spot.elastic.signals import GroupStart
from raytrain_spot.elastic.survivors import SurvivorMarks, dead_nodes, survivor_commit_s
from raytrain_spot.elastic.standby import (STANDBY_MARKER, NoticeStandbys, claim_standby, decide_standbys,
                                           nodes_share_cores, top_up)
from raytrain_spot.observe.events import EventLog
from raytrain_spot.observe.records import Advice, Eval, Group, Resize, Restore, Samples, Step, Stopped
from raytrain_spot.loop.agreement import RankView, start_agreement
from raytrain_spot.loop.batches import StepBatches, StepRows
from raytrain_spot.distributed.collectives import RankGroup
from raytrain_spot.loop.evaluate import Evaluation
from raytrain_spot.loop.decision import JIT, PERIODIC, STOP, Continue, Finish, GroupPolicy, HandOff, Hold, decide
from raytrain_spot.elastic.policy import WorkerGroupHandoff
from raytrain_spot.loop.handoff import checkpoint_and_report, hand_off
from raytrain_spot.loop.runtime import WorkerRuntime
from raytrain_spot.loop.sample_order import GlobalSampleOrder, rank_positions
from raytrain_spot.loop.stop import StopPoll
from raytrain_spot.loop.survivor_commit import RecordReplay, StepGuard, SurvivorCommit, SurvivorWatch
from raytrain_spot.loop.strategy import SPOT, Strategy
from raytrain_spot.loop.step import accumulate, checked_optimizer, seed_step, set_learning_rate, step_seed, update
from raytrain_spot.config.errors import TaskContractError
from raytrain_spot.loop.task import TrainingTask, build_task, task_contract_problem

logger = logging.getLogger(__name__)
UNTIMED_STEPS = 2
"""A group's first steps (allocation, first collectives) are left out of its samples/s."""
PLANNED_EXITS = (WorkerGroupHandoff, TaskContractError, KeyboardInterrupt, SystemExit)
"""What leaves the step loop with nothing for the survivors to commit: a handoff (it committed), the
task's contract breach (a restart would fail the same way), an interrupt."""


@dataclass
class LoopContext:
    """What the driver hands every worker besides the config."""

    config: Dict[str, Any]
    storage_uri: str
    events: Any  # handle of the event-log actor, or None
    head_store: Any  # handle of the head-node checkpoint store, or None
    lease_owner: Optional[str] = None  # the driver's run lease, checked before durable writes
    strategy: Strategy = SPOT


def run_group(cfg: Config, task: TrainingTask, runtime: WorkerRuntime, policy: GroupPolicy,
              checkpoints: CheckpointManager, events: EventLog, phases: "Phases") -> None:
    rank, world_size, group = runtime.rank, runtime.world_size, runtime.group
    device = group.device
    global_batch = cfg.trainer.global_batch_size
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    # Data: one global stream of positions; this rank takes every world_size-th of each step.
    dataset = task.build_dataset(cfg.run.seed)
    order = GlobalSampleOrder(sample_spans(dataset), cfg.run.seed)
    phases.mark("data")

    # Model and optimizer, identical on every rank before any checkpoint is loaded.
    torch.manual_seed(cfg.run.seed)
    model = task.build_model().to(device)
    check_same_parameters(model, group)
    optimizer = checked_optimizer(task.build_optimizer(model, cfg.optim), type(task).__name__)
    parts = {"model": ModelWeights(model), "optimizer": optimizer, **task.extra_state()}
    phases.mark("model")

    copied_by_controller = runtime.group_start.copying_on if runtime.group_start else None
    restored = checkpoints.restore(parts, rank, copied_by_controller)
    phases.mark("restore")
    loop = restored.loop if restored else LoopState()
    if restored and restored.manifest.reason != "regrow" and restored.manifest.kind != "final":
        loop.interruptions += 1  # a notice or a failure ended the previous group; a regrow is planned
    check_dataset(dataset, order.rows_at(rank_positions(loop.samples_seen, global_batch, rank, world_size))[:1],
                  group)
    ddp_model = wrap_ddp(model, device, task.unused_parameters)
    phases.mark("ddp")
    if rank == 0:
        announce_group(events, restored, world_size, loop, phases.durations, runtime.node_ids, **runtime.group_facts)

    evaluation = Evaluation(task, task.build_eval_dataset(cfg.run.seed), cfg.eval.every_steps,
                            cfg.trainer.micro_batch_size, group, policy.leaving_ranks, autocast_dtype)
    cadence = CheckpointCadence(cfg.checkpoint.interval_steps, IntervalAdvisor(
        cfg.checkpoint.mtbi_prior_s, cfg.checkpoint.min_interval_s, cfg.checkpoint.max_interval_s))
    if restored and restored.manifest.kind == "jit" and loop.handed_off_at:
        measure_restart(loop, group.broadcast_object(restart_since_handoff(loop.handed_off_at, time.time(),
                                                                           runtime.group_start), src=0))
    rows = StepRows(task, dataset, order, loop.samples_seen, cfg.trainer.max_steps - loop.step, global_batch,
                    cfg.trainer.micro_batch_size, rank, world_size)
    reported_step = loop.step
    steps_in_group = 0
    update_s = 0.0
    total_samples = cfg.trainer.max_steps * global_batch
    # A loss without notice: the survivors commit the last step they completed (loop/survivor_commit.py).
    guard = StepGuard(device)
    replay = RecordReplay(order, global_batch, world_size, events, cfg.run.log_sample_ids)
    survivor_commit = SurvivorCommit(checkpoints, parts, loop, guard, runtime.node_ids, rank, runtime.mark_survivor,
                                     events, replay)
    with StepBatches(rows, cfg.trainer.loader_processes, device, cfg.run.seed) as batches, \
            SurvivorWatch(runtime.node_ids, rank, runtime.dead_nodes, survivor_commit, guard.stalled, PLANNED_EXITS):
        batch = batches.next()
        while loop.step < cfg.trainer.max_steps:
            step_started = time.time()
            seed_step(step_seed(cfg.run.seed, loop.step, rank), device)

            loss_sum = accumulate(ddp_model, batch.micro_batches, task.loss, world_size / global_batch, autocast_dtype)

            # What each rank heard from the cluster, and rank 0's proposals, in the same all-reduce as the loss.
            next_step = loop.step + 1
            leaving = policy.leaving_ranks(next_step)
            view = RankView(loss_sum, leaving)
            if rank == 0:
                step_s = batch.data_s + time.time() - step_started + update_s  # the last step's update for this one's
                commit_s = max(checkpoints.commit_s[-3:], default=loop.commit_s)  # rank 0's own; earlier groups' else
                proposal = policy.propose(leaving, next_step, step_s, commit_s, loop, world_size)
                view = RankView(loss_sum, leaving, proposal,
                                save_due=periodic_save_due(checkpoints, next_step, cadence.interval_steps),
                                stop=runtime.stop_requested(), committed_step=checkpoints.committed_step,
                                commit_s=commit_s, step_s=step_s, at=time.time())
            pending = start_agreement(view, group)
            # The next batch is taken (or, without loader processes, loaded) while the all-reduce is in flight.
            trained, batch = batch, batches.next()
            agreed = pending.result()
            # The step's collectives are behind it: only now do the weights and the loop state move, together.
            with guard.moving():  # the learning rate too: a survivor's copy of the last step must not hold this one's
                lr = set_learning_rate(optimizer, task.learning_rate(loop.samples_seen, total_samples, cfg.optim),
                                       type(task).__name__)
                update_started = time.time()
                grad_norm = update(ddp_model, optimizer, cfg.optim.grad_clip)
                update_s = time.time() - update_started
                first_position = loop.samples_seen
                loop.step = next_step
                loop.samples_seen += global_batch
                loop.train_time_s += agreed.step_s
                loop.commit_s = agreed.commit_s
                steps_in_group += 1
                if steps_in_group > UNTIMED_STEPS:  # rank 0's clock, so every rank keeps the same figures
                    loop.samples_per_s, loop.measured_s = measured_rate(loop.samples_per_s, loop.measured_s,
                                                                        world_size, global_batch, agreed.step_s)

            if steps_in_group == 1:  # the optimizer's state exists from its first step on
                checkpoints.reserve_snapshot(parts, loop, writer=rank == 0)
            if cfg.run.log_sample_ids:
                events.emit_soon(Samples(step=loop.step, rank=rank, ids=trained.rows))
            # This step's own loading, training and wait for the agreement, not the next one's loading.
            duration_s = trained.data_s + time.time() - step_started - (batch.data_s if batch else 0.0)
            step_record = Step(step=loop.step, world_size=world_size, samples=[first_position, loop.samples_seen],
                               loss=agreed.loss_sum / global_batch, lr=lr, grad_norm=grad_norm, duration_s=duration_s,
                               data_s=trained.data_s)
            replay.stepped(step_record)  # every rank keeps the last ones, should rank 0 be lost without notice
            if rank == 0:
                events.emit_soon(step_record)

            decision = decide(agreed, loop.step, cfg.trainer.max_steps, world_size, policy)
            if not isinstance(decision, (Continue, Hold)) or decision.checkpoint:
                events.send()  # records of every step the checkpoint holds are out before a kill could take them
            if isinstance(decision, Finish):  # a resume after a stop goes on from it, no interruption
                if decision.reason == STOP and rank == 0:
                    events.emit(Stopped(step=loop.step))
                checkpoint_and_report(checkpoints, parts, SaveRequest(loop, world_size, "final",
                                                                      reason=STOP if decision.reason == STOP else ""),
                                      rank, 0, runtime.report)
                evaluate(evaluation, ddp_model, loop.step, rank, events)
                return
            if isinstance(decision, HandOff):
                loop.handed_off_at = agreed.at
                hand_off(decision, checkpoints, parts, loop, rank, runtime.node_ids, events, runtime.report,
                         runtime.signals.drain_deadline_s)
            if decision.checkpoint == JIT:
                checkpoint_and_report(checkpoints, parts, SaveRequest(loop, world_size, "jit", reason="preemption"),
                                      rank, 0, runtime.report)
            elif decision.checkpoint == PERIODIC:
                checkpoints.save(parts, SaveRequest(loop, world_size, "periodic"), writer=rank == 0)
            if evaluation.due(loop.step):
                evaluate(evaluation, ddp_model, loop.step, rank, events)
            if agreed.committed_step > reported_step:
                reported_step = agreed.committed_step
                runtime.report(reported_step)
            if rank == 0 and (advice := cadence.update(checkpoints.stall_s, checkpoints.commit_s, loop.interruptions,
                                                       loop.train_time_s, world_size, loop.step)):
                logger.info("Checkpoint advisor: %s", advice.explain())
                events.emit(Advice(**advice.__dict__))


def evaluate(evaluation: Evaluation, model: torch.nn.Module, step: int, rank: int, events: EventLog) -> None:
    """Collective: evaluate the weights of ``step``; rank 0 logs the result (none where a notice stopped it)."""
    result = evaluation.run(model, step)
    if result is not None and rank == 0:
        events.emit(Eval(step=step, loss=result.loss, samples=result.samples, duration_s=result.duration_s,
                         examples=result.examples or None))


@dataclass(frozen=True)
class MeasuredRestart:
    seconds: float
    """From the handoff to now, less ``waited_s``."""
    waited_s: float
    """The scaling policy's wait for capacity in between."""


def restart_since_handoff(handed_off_at: float, now: float, start: Optional[GroupStart]) -> Optional[MeasuredRestart]:
    """What the restart since the handoff at ``handed_off_at`` cost: the time since, less the scaling
    policy's wait for capacity (a group with nowhere to go trains nowhere, restarted or not). None
    where it was no restart of this driver's (the handoff ended an earlier driver's run) or the group's
    start is unknown."""
    if start is None or handed_off_at < start.driver_started_at:
        return None
    return MeasuredRestart(max(0.0, now - handed_off_at - start.waited_s), start.waited_s)


def measure_restart(loop: LoopState, restart: Optional[MeasuredRestart]) -> None:
    """Fold the restart that began at the last handoff into the run's mean restart cost."""
    if restart is None:
        logger.info("This group's restart is not measured: it follows an earlier driver's handoff, or the "
                    "scaling policy did not say how it started the group")
        return
    loop.restart_s = (loop.restart_s * loop.restarts_measured + restart.seconds) / (loop.restarts_measured + 1)
    loop.restarts_measured += 1
    logger.info("This restart took %.1f s from the handoff, not counting %.1f s waiting for capacity (mean of %d: "
                "%.1f s)", restart.seconds, restart.waited_s, loop.restarts_measured, loop.restart_s)


def sample_spans(dataset) -> List[tuple]:
    """Index ranges the sample order shuffles within (a dataset's ``row_group_spans`` keeps reads
    local to a Parquet row group); one span of the whole dataset otherwise."""
    spans = getattr(dataset, "row_group_spans", None)
    return spans() if callable(spans) else [(0, len(dataset))]


def wrap_ddp(model: torch.nn.Module, device: torch.device, unused_parameters: bool) -> DistributedDataParallel:
    # Gradients as views of DDP's all-reduce buckets: one copy of the gradients per rank instead of
    # two (full fine-tuning of the 2.2B preset needs about 42 GiB per rank without it).
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=unused_parameters, gradient_as_bucket_view=True)


def check_same_parameters(model: torch.nn.Module, group: RankGroup) -> None:
    """Every rank must build the same initial parameters (loop/task.py's contract)."""
    digests = group.all_gather_object(parameter_digest(model))
    if len(set(digests)) > 1:
        raise TaskContractError(
            f"build_model built different parameters on different ranks (digests {digests}): a fresh start would "
            "train from rank 0's alone and no rerun would reproduce it. Fix: draw every random initial value from "
            "torch's default generator (the framework seeds it with run.seed), not from the clock or a generator "
            "of your own")


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def parameter_digest(model: torch.nn.Module) -> str:
    """Integer sums of each parameter's bit patterns: exact, so equal bits give equal digests on any
    GPU model, CPU or memory layout. Float sums do not: their reduction order (and so their last
    bits) depends on the kernel, and a rank on another GPU model would be refused for weights it
    shares. Summed where the parameters live, without a host copy of the model."""
    with torch.no_grad():
        sums = [(name, tuple(p.shape), str(p.dtype),
                 int(p.detach().contiguous().view(_BITS[p.element_size()]).sum(dtype=torch.int64)))
                for name, p in model.named_parameters()]
    return hashlib.sha256(repr(sums).encode()).hexdigest()[:16]


def check_dataset(dataset, probe_rows: List[int], group: RankGroup) -> None:
    """Collective: every rank stops with the same error when any rank's dataset breaks the contract."""
    problems = [p for p in group.all_gather_object(task_contract_problem(dataset, probe_rows)) if p]
    if problems:
        raise TaskContractError(problems[0])


def periodic_save_due(checkpoints: CheckpointManager, next_step: int, interval_steps: Optional[int]) -> bool:
    """Whether the step about to finish should be checkpointed (rank 0 decides for everyone)."""
    if checkpoints.busy:
        return False  # at most one save in flight; a due one waits for it to finish
    if checkpoints.deferred is not None:
        return True
    if interval_steps is None:  # the advisor has no measurement yet: take one early to measure
        return checkpoints.last_save_step < 0 and next_step >= 5
    return interval_steps > 0 and next_step - max(checkpoints.last_save_step, 0) >= interval_steps


class Phases:
    """Wall time of each startup phase of the training function, for the ``group`` event."""

    def __init__(self):
        self._last = time.time()
        self.durations: Dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.time()
        self.durations[phase] = round(now - self._last, 3)
        self._last = now


def announce_group(events: EventLog, restored: Optional[Restored], world_size: int, loop: LoopState,
                   startup_s: Dict[str, float], node_ids: List[str], **details: Any) -> None:
    if restored:
        events.emit(Restore(step=restored.loop.step, tier=restored.tier, duration_s=restored.duration_s,
                            read_s=restored.read_s))
    events.emit(Group(world_size=world_size, step=loop.step,
                      restored_step=restored.loop.step if restored else None, startup_s=startup_s, nodes=node_ids,
                      **details))
    if restored and restored.manifest.world_size != world_size:
        events.emit(Resize(old_world_size=restored.manifest.world_size, world_size=world_size, step=loop.step))


# -- the Ray Train entry ------------------------------------------------------------------

def run_worker(loop_config: Dict[str, Any]) -> None:
    phases = Phases()
    quiet_handoff_tracebacks()
    context: LoopContext = loop_config["context"]
    cfg: Config = config_from_dict(context.config)
    task = build_task(cfg.task)
    events = EventLog(context.events)
    torch.set_num_threads(cfg.trainer.torch_threads)
    group = RankGroup.for_training(ray.train.torch.get_device())
    rank = group.rank
    localize_before_collectives(task, group, cfg)

    # Which node each rank runs on, when its process started (a warm standby predates the restart), and
    # rank 0's decision on standbys, which every rank follows.
    decision = decide_standbys(cfg, context.strategy.spot_aware, nodes_share_cores) if rank == 0 else None
    placements = group.all_gather_object((ray.get_runtime_context().get_node_id(), psutil.Process().create_time(),
                                          decision))
    node_ids = [node_id for node_id, _, _ in placements]
    standbys = placements[0][2]
    if rank == 0:
        logger.info("Warm standbys %s: %s", "on" if standbys.enabled else "off", standbys.reason)
    marked = os.environ.get(STANDBY_MARKER) == cfg.run.name  # the run's processes can be counted as standbys
    if marked:
        claim_standby(cfg.run.name)
    if standbys.enabled and node_ids.index(node_ids[rank]) == rank:
        threading.Thread(target=top_up, args=(cfg.run.name, node_ids[rank], node_ids.count(node_ids[rank]),
                                              cfg.elastic.standby_delay_s), name="standby-top-up", daemon=True).start()
    spot_aware = context.strategy.spot_aware
    capacity = watch_capacity(cfg, node_ids, standbys.enabled) if rank == 0 and spot_aware else None
    try:
        checkpoints = build_checkpoint_manager(cfg, context, group, node_ids, events)
        warmup = (NoticeStandbys(cfg.run.name, group_keeps_standbys=standbys.enabled,
                               hurry_s=cfg.elastic.notice_standby_wait_s, max_workers=cfg.trainer.max_workers,
                               room_outside=capacity.room_outside_group) if capacity is not None and marked else None)
        signals = context.strategy.signals(capacity)
        policy = context.strategy.group_policy(cfg, signals, node_ids, events.emit, warmup)
        marks = SurvivorMarks(cfg.run.name)
        survivors = ({"dead_nodes": dead_nodes, "mark_survivor": marks.mark}
                     if spot_aware and survivor_commit_s(cfg) > 0 else {})
        if survivors and rank == 0:
            marks.clear()  # an earlier group's, left where the controller never waited (a restart after a
            # notice), would end the controller's next wait at once
        group_start = GroupStarts(cfg.run.name).latest() if rank == 0 and spot_aware else None
        runtime = WorkerRuntime(group, node_ids, report=report_step, signals=signals, group_start=group_start,
                                group_facts={"process_age_s": [round(time.time() - t, 1) for _, t, _ in placements],
                                             "warm_standby": standbys.enabled,
                                             "capacity_wait_s": round(group_start.waited_s, 2) if group_start else None},
                                stop_requested=StopPoll(cfg.run.name), **survivors)
        phases.mark("setup")  # the task's and the framework's parts; the task's data, model and state follow
        run_group(cfg, task, runtime, policy, checkpoints, events, phases)
    finally:
        events.send()  # the last steps' records
        if capacity is not None:
            capacity.stop()


def localize_before_collectives(task: TrainingTask, group: RankGroup, cfg: Config) -> None:
    """The node-local copies first, then the group's first collective: the ranks that finish early
    wait in a barrier bounded by trainer.startup_timeout_s, not in a collective that gives up after
    trainer.collective_timeout_s (a fresh node's model copy from gs:// timed its peers out)."""
    task.localize(cfg.run.seed)
    group.wait_for_all(cfg.trainer.startup_timeout_s)


def quiet_handoff_tracebacks() -> None:
    """Ray logs every exception leaving the training function with its traceback; a handoff
    is a planned restart, already logged as an event, so keep it out of the console."""
    logging.getLogger(TRAIN_UTIL_LOGGER).addFilter(
        lambda record: "WorkerGroupHandoff" not in record.getMessage())


def build_checkpoint_manager(cfg: Config, context: LoopContext, group: RankGroup, node_ids: List[str],
                             events: EventLog) -> CheckpointManager:
    """The lowest rank on each Ray node keeps that node's local copy (Ray's own local_rank
    groups workers by IP, which virtual nodes on one machine share)."""
    rank = group.rank
    node_id = node_ids[rank]
    local, shared = node_tiers(cfg, context.storage_uri, context.head_store, context.lease_owner, node_id)
    return CheckpointManager(cfg.run.name, context.config, local, shared, group=group,
                             writes_local=node_ids.index(node_id) == rank,
                             events=events, compression=cfg.checkpoint.compression,
                             scratch_root=cfg.checkpoint.local_root(context.storage_uri, node_id),
                             sharded=cfg.checkpoint.sharded)


def report_step(step: int) -> None:
    """Every rank joins Ray Train's report of a committed step: a barrier, so no rank hands off
    before the checkpoint is in. No checkpoint goes to Ray: its upload into storage.uri would
    re-raise a long bucket outage into training (docs/checkpoints.md, "Ray Train holds no checkpoint")."""
    import ray.train

    ray.train.report({"step": step})
