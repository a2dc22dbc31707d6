"""The training loop each Ray Train worker runs. Read it top to bottom."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import psutil
import ray.train
import torch
from torch.nn.parallel import DistributedDataParallel

from raytrain_spot.agreement import RankView, agree
from raytrain_spot.checkpoint.advisor import CheckpointCadence, IntervalAdvisor
from raytrain_spot.checkpoint.manager import CheckpointManager, Progress, SaveRequest
from raytrain_spot.checkpoint.tiers import HeadTier, StoreTier
from raytrain_spot.collectives import RankGroup
from raytrain_spot.config import Config, TrainerConfig, config_from_dict
from raytrain_spot.data.parquet import ImageCaptionDataset, ensure_dataset
from raytrain_spot.data.sampler import GlobalSampleOrder, rank_positions
from raytrain_spot.data.shapes import PAD, TOKEN_ID, VOCAB, max_caption_tokens
from raytrain_spot.elastic import (
    CapacityWatcher,
    LiveCapacity,
    NodeView,
    WorkerGroupHandoff,
    drain_deadline_s,
    local_preemption_notice,
    workers_that_fit,
)
from raytrain_spot.events import EventLog
from raytrain_spot.model import VisionLanguageModel
from raytrain_spot.standby import standby_enabled, top_up, warm_joined_node
from raytrain_spot.storage import LocalStore, open_store
from raytrain_spot.train import build_optimizer, learning_rate, set_learning_rate, step_seed, train_step

logger = logging.getLogger(__name__)


@dataclass
class LoopContext:
    """What the driver hands every worker besides the config."""

    config: Dict[str, Any]
    storage_uri: str
    events: Any  # handle of the event-log actor, or None
    head_store: Any  # handle of the head-node checkpoint store, or None


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    phases = Phases()
    quiet_handoff_tracebacks()
    context: LoopContext = loop_config["context"]
    cfg: Config = config_from_dict(context.config)
    events = EventLog(context.events)
    train_ctx = ray.train.get_context()
    rank, world_size = train_ctx.get_world_rank(), train_ctx.get_world_size()
    torch.set_num_threads(cfg.trainer.torch_threads)
    device = ray.train.torch.get_device()
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    group = RankGroup.for_training(device)

    # Data: one global stream of positions; this rank takes every world_size-th of each step.
    dataset = ImageCaptionDataset(ensure_dataset(cfg.data, cfg.run.seed), cfg.data.image_size,
                                  cfg.data.max_shapes, cfg.data.cached_row_groups)
    order = GlobalSampleOrder(dataset.row_group_spans(), cfg.run.seed)
    phases.mark("data")

    # Model and optimizer, identical on every rank before any checkpoint is loaded.
    torch.manual_seed(cfg.run.seed)
    model = VisionLanguageModel(cfg.model, len(VOCAB), max_caption_tokens(cfg.data.max_shapes),
                                TOKEN_ID[PAD]).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    phases.mark("model")

    # Which node each rank runs on, and when its process started (a warm standby predates the restart).
    placements = group.all_gather_object((ray.get_runtime_context().get_node_id(), psutil.Process().create_time()))
    node_ids = [node_id for node_id, _ in placements]
    checkpoints = build_checkpoint_manager(cfg, context, group, node_ids, events)
    restored = checkpoints.restore(model, optimizer, rank)
    phases.mark("restore")
    progress = restored.progress if restored else Progress()
    if restored and restored.manifest.reason != "regrow" and restored.manifest.kind != "final":
        progress.interruptions += 1  # a notice or a failure ended the previous group; a regrow is planned
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    phases.mark("ddp")
    if rank == 0:
        announce_group(events, restored, world_size, progress, phases.durations, node_ids,
                       [round(time.time() - started, 1) for _, started in placements])
    if standby_enabled(cfg.trainer) and node_ids.index(node_ids[rank]) == rank:
        threading.Thread(target=top_up, args=(cfg.run.name, node_ids[rank], node_ids.count(node_ids[rank])),
                         name="standby-top-up", daemon=True).start()

    capacity = watch_capacity(cfg.trainer, node_ids) if rank == 0 and cfg.trainer.spot_aware else None
    cadence = CheckpointCadence(cfg.checkpoint.interval_steps, IntervalAdvisor(
        cfg.checkpoint.mtbi_prior_s, cfg.checkpoint.min_interval_s, cfg.checkpoint.max_interval_s))
    reported_step = progress.step

    global_batch = cfg.trainer.global_batch_size
    total_samples = cfg.trainer.max_steps * global_batch
    while progress.step < cfg.trainer.max_steps:
        step_started = time.time()
        positions = rank_positions(progress.samples_seen, global_batch, rank, world_size)
        images, tokens, sample_ids = dataset.batch(order.rows_at(positions))
        data_s = time.time() - step_started
        lr = learning_rate(progress.samples_seen, total_samples, cfg.optim)
        set_learning_rate(optimizer, lr)
        torch.manual_seed(step_seed(cfg.run.seed, progress.step, rank))

        loss_sum = train_step(ddp_model, optimizer, images.to(device), tokens.to(device),
                              cfg.trainer.micro_batch_size, world_size / global_batch, cfg.optim.grad_clip,
                              autocast_dtype)

        # Decisions rank 0 makes alone travel in the same all-reduce as the loss.
        leaving = ranks_with_notice(node_ids, capacity) if cfg.trainer.spot_aware else ()
        view = (RankView(loss_sum, leaving, grow_to=capacity.grow_to if capacity else 0,
                         save_due=periodic_save_due(checkpoints, progress.step + 1, cadence.interval_steps),
                         committed_step=checkpoints.committed_step) if rank == 0 else RankView(loss_sum, leaving))
        agreed = agree(view, group)
        first_position = progress.samples_seen
        progress.step += 1
        progress.samples_seen += global_batch
        progress.train_time_s += time.time() - step_started

        if cfg.run.log_sample_ids:
            events.emit("samples", step=progress.step, rank=rank, ids=sample_ids)
        if rank == 0:
            events.emit("step", step=progress.step, world_size=world_size,
                        samples=[first_position, progress.samples_seen], loss=agreed.loss_sum / global_batch,
                        lr=lr, duration_s=time.time() - step_started, data_s=data_s)

        if progress.step == cfg.trainer.max_steps:
            checkpoint_and_report(checkpoints, model, optimizer, SaveRequest(progress, world_size, "final"),
                                  rank, writer=0)
            break
        if agreed.leaving_ranks:
            handoff_on_preemption(checkpoints, model, optimizer, progress, agreed.leaving_ranks, node_ids, rank,
                                  events)
        if agreed.grow_to > 0:
            if rank == 0:
                events.emit("handoff", reason="regrow", step=progress.step, world_size=world_size,
                            grow_to=agreed.grow_to)
            checkpoint_and_report(checkpoints, model, optimizer,
                                  SaveRequest(progress, world_size, "jit", reason="regrow"), rank, writer=0)
            raise WorkerGroupHandoff("regrow", progress.step)
        if agreed.save_due:
            checkpoints.save(model, optimizer, SaveRequest(progress, world_size, "periodic"), writer=rank == 0)
        if agreed.committed_step > reported_step:
            reported_step = agreed.committed_step
            report_step(reported_step)
        if rank == 0 and (advice := cadence.update(checkpoints.stall_s, checkpoints.commit_s, progress.interruptions,
                                                   progress.train_time_s, world_size, progress.step)):
            logger.info("Checkpoint advisor: %s", advice.explain())
            events.emit("advice", **advice.__dict__)
    if capacity:
        capacity.stop()


def quiet_handoff_tracebacks() -> None:
    """Ray logs every exception leaving the training function with its traceback; a handoff
    is a planned restart, already logged as an event, so keep it out of the console."""
    logging.getLogger("ray.train.v2._internal.util").addFilter(
        lambda record: "WorkerGroupHandoff" not in record.getMessage())


def watch_capacity(trainer_cfg: TrainerConfig, node_ids: List[str]) -> CapacityWatcher:
    """Rank 0's watch on the cluster: regrow capacity, notices, and standbys for nodes that join."""
    per_worker, most = trainer_cfg.resources_per_worker, trainer_cfg.max_workers

    def warm(node: NodeView) -> None:
        warm_joined_node(node.node_id, workers_that_fit([node], per_worker, most))

    return CapacityWatcher(LiveCapacity(per_worker, most), node_ids, trainer_cfg.resize_check_interval_s,
                           trainer_cfg.regrow_settle_s, on_join=warm if standby_enabled(trainer_cfg) else None).start()


def build_checkpoint_manager(cfg: Config, context: LoopContext, group: RankGroup, node_ids: List[str],
                             events: EventLog) -> CheckpointManager:
    """The lowest rank on each Ray node keeps that node's local copy (Ray's own local_rank
    groups workers by IP, which virtual nodes on one machine share)."""
    rank = group.rank
    node_id = node_ids[rank]
    node_root = cfg.checkpoint.local_root(context.storage_uri, node_id)
    local = None
    if cfg.checkpoint.use_local and not cfg.checkpoint.sharded:  # one node holds only its ranks' shares
        local = StoreTier("local", LocalStore(node_root), cfg.run.name, cfg.checkpoint.keep_latest_k)
    durable = StoreTier("durable", open_store(context.storage_uri), cfg.run.name, cfg.checkpoint.keep_latest_k,
                        cfg.checkpoint.milestone_every_steps)
    rate = cfg.checkpoint.max_transfer_mbps * 1e6 if cfg.checkpoint.max_transfer_mbps else None
    shared = [HeadTier(context.head_store, rate), durable] if context.head_store is not None else [durable]
    return CheckpointManager(cfg.run.name, context.config, local, shared, group=group,
                             writes_local=node_ids.index(node_id) == rank,
                             events=events, compression=cfg.checkpoint.compression, scratch_root=node_root,
                             sharded=cfg.checkpoint.sharded)


class Phases:
    """Wall time of each startup phase of the training function, for the ``group`` event."""

    def __init__(self):
        self._last = time.time()
        self.durations: Dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.time()
        self.durations[phase] = round(now - self._last, 3)
        self._last = now


def announce_group(events: EventLog, restored, world_size: int, progress: Progress,
                   startup_s: Dict[str, float], node_ids: List[str], process_age_s: List[float]) -> None:
    if restored:
        events.emit("restore", step=restored.progress.step, tier=restored.tier, duration_s=restored.duration_s)
    events.emit("group", world_size=world_size, step=progress.step,
                restored_step=restored.progress.step if restored else None, startup_s=startup_s, nodes=node_ids,
                process_age_s=process_age_s)
    if restored and restored.manifest.world_size != world_size:
        events.emit("resize", old_world_size=restored.manifest.world_size, world_size=world_size,
                    step=progress.step)


def periodic_save_due(checkpoints: CheckpointManager, next_step: int, interval_steps: Optional[int]) -> bool:
    """Whether the step about to finish should be checkpointed (rank 0 decides for everyone)."""
    if checkpoints.busy:
        return False  # at most one save in flight; a due one waits for it to finish
    if checkpoints.deferred is not None:
        return True
    if interval_steps is None:  # the advisor has no measurement yet: take one early to measure
        return checkpoints.last_save_step < 0 and next_step >= 5
    return interval_steps > 0 and next_step - max(checkpoints.last_save_step, 0) >= interval_steps


def ranks_with_notice(node_ids: List[str], capacity: Optional[CapacityWatcher]) -> List[int]:
    """Ranks on nodes with a preemption notice, as this rank knows it: from Ray Train's relay of
    the drain, and on rank 0 also from its own reading of the GCS (whichever is first)."""
    draining = set(local_preemption_notice() or ())
    if capacity is not None:
        draining |= capacity.draining
    return [r for r, node_id in enumerate(node_ids) if node_id in draining]


def handoff_on_preemption(checkpoints, model, optimizer, progress: Progress, leaving: List[int],
                          node_ids: List[str], rank: int, events: EventLog) -> None:
    """All ranks agreed which ranks' nodes got a notice: checkpoint from a surviving rank, then restart
    without those nodes."""
    world_size = len(node_ids)
    survivors = [r for r in range(world_size) if r not in leaving]
    writer = survivors[0] if survivors else 0
    if rank == writer:
        events.emit("handoff", reason="preemption", step=progress.step, world_size=world_size,
                    preempted_ranks=leaving, nodes=sorted({node_ids[r] for r in leaving}))
    deadline_s = drain_deadline_s({node_ids[r] for r in leaving}) if rank == writer else None
    checkpoint_and_report(checkpoints, model, optimizer,
                          SaveRequest(progress, world_size, "jit", reason="preemption"), rank, writer)
    if deadline_s is not None and (late_by_s := time.time() - deadline_s) > 0:
        logger.error("The JIT checkpoint of step %d committed %.1f s after the drain deadline", progress.step,
                     late_by_s)
        events.emit("jit_late", step=progress.step, late_by_s=late_by_s, deadline=deadline_s)
    raise WorkerGroupHandoff("preemption", progress.step)


def checkpoint_and_report(checkpoints: CheckpointManager, model, optimizer, request: SaveRequest, rank: int,
                          writer: int) -> None:
    """Save this step on every tier now (the run is about to end or restart), then report it to Ray."""
    if checkpoints.last_save_step != request.progress.step:
        checkpoints.save(model, optimizer, request, writer=rank == writer, wait=True)
    checkpoints.wait()
    report_step(request.progress.step)


def report_step(step: int) -> None:
    """Every rank joins Ray Train's report of a committed step: a barrier, so no rank hands off
    before the checkpoint is in. No checkpoint goes to Ray: its upload into storage.uri would
    re-raise a long bucket outage into training (docs/checkpoints.md, "Ray Train holds no checkpoint")."""
    ray.train.report({"step": step})
