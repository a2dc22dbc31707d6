"""The training loop each Ray Train worker runs. Read it top to bottom."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict

import ray.train
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from raytrain_spot.checkpoint.manager import Checkpointer, Progress, read_pointer_step, write_pointer
from raytrain_spot.config import Config, config_from_dict
from raytrain_spot.data.parquet import ImageCaptionDataset, ensure_dataset
from raytrain_spot.data.sampler import GlobalSampleOrder, rank_positions
from raytrain_spot.data.shapes import PAD, TOKEN_ID, VOCAB, max_caption_tokens
from raytrain_spot.elastic import CapacityWatcher, LiveCapacity, WorkerGroupHandoff, local_preemption_notice
from raytrain_spot.events import EventLog
from raytrain_spot.model import VisionLanguageModel
from raytrain_spot.storage import open_store
from raytrain_spot.train import build_optimizer, learning_rate, set_learning_rate, step_seed, train_step

logger = logging.getLogger(__name__)


@dataclass
class LoopContext:
    """What the driver hands every worker besides the config."""

    config: Dict[str, Any]
    storage_uri: str
    events: Any  # handle of the event-log actor, or None


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    context: LoopContext = loop_config["context"]
    cfg: Config = config_from_dict(context.config)
    events = EventLog(context.events)
    train_ctx = ray.train.get_context()
    rank, world_size = train_ctx.get_world_rank(), train_ctx.get_world_size()
    torch.set_num_threads(cfg.trainer.torch_threads)
    device = ray.train.torch.get_device()
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    # Data: one global stream of positions; this rank takes every world_size-th of each step.
    dataset = ImageCaptionDataset(ensure_dataset(cfg.data, cfg.run.seed), cfg.data.image_size,
                                  cfg.data.max_shapes, cfg.data.cached_row_groups)
    order = GlobalSampleOrder(dataset.row_group_spans(), cfg.run.seed)

    # Model and optimizer, identical on every rank before any checkpoint is loaded.
    torch.manual_seed(cfg.run.seed)
    model = VisionLanguageModel(cfg.model, len(VOCAB), max_caption_tokens(cfg.data.max_shapes),
                                TOKEN_ID[PAD]).to(device)
    optimizer = build_optimizer(model, cfg.optim)

    checkpointer = Checkpointer(open_store(context.storage_uri), cfg.run.name, context.config,
                                cfg.checkpoint.keep_latest_k, events)
    restored = checkpointer.restore(model, optimizer, hint_step=read_pointer_step(ray.train.get_checkpoint()))
    progress = restored.progress if restored else Progress()
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if rank == 0:
        if restored:
            events.emit("restore", step=restored.progress.step, tier=restored.tier, duration_s=restored.duration_s)
        previous = restored.manifest.world_size if restored else None
        events.emit("group", world_size=world_size, step=progress.step,
                    restored_step=restored.progress.step if restored else None)
        if previous is not None and previous != world_size:
            events.emit("resize", old_world_size=previous, world_size=world_size, step=progress.step)
    capacity = None
    if rank == 0 and world_size < cfg.trainer.max_workers:
        capacity = CapacityWatcher(LiveCapacity({"CPU": cfg.trainer.cpus_per_worker}, cfg.trainer.max_workers),
                                   world_size, cfg.trainer.resize_check_interval_s, cfg.trainer.regrow_settle_s).start()

    global_batch = cfg.trainer.global_batch_size
    total_samples = cfg.trainer.max_steps * global_batch
    while progress.step < cfg.trainer.max_steps:
        step_started = time.time()
        positions = rank_positions(progress.samples_seen, global_batch, rank, world_size)
        images, tokens, sample_ids = dataset.batch(order.rows_at(positions))
        lr = learning_rate(progress.samples_seen, total_samples, cfg.optim)
        set_learning_rate(optimizer, lr)
        torch.manual_seed(step_seed(cfg.run.seed, progress.step, rank))

        loss_sum = train_step(ddp_model, optimizer, images.to(device), tokens.to(device),
                              cfg.trainer.micro_batch_size, world_size / global_batch, cfg.optim.grad_clip,
                              autocast_dtype)
        # One all-reduce carries the loss and the signals every rank must agree on at this step.
        notice = local_preemption_notice() is not None
        grow_to = capacity.grow_to if capacity else 0
        totals = torch.tensor([loss_sum, float(notice), float(grow_to)], dtype=torch.float64)
        dist.all_reduce(totals)
        first_position = progress.samples_seen
        progress.step += 1
        progress.samples_seen += global_batch

        if cfg.run.log_sample_ids:
            events.emit("samples", step=progress.step, rank=rank, ids=sample_ids)
        if rank == 0:
            events.emit("step", step=progress.step, world_size=world_size,
                        samples=[first_position, progress.samples_seen], loss=totals[0].item() / global_batch,
                        lr=lr, duration_s=time.time() - step_started)
        if progress.step == cfg.trainer.max_steps:
            report_checkpoint(checkpointer, model, optimizer, progress, world_size, rank, writer=0, kind="final")
            break

        if totals[1] > 0:
            handoff_on_preemption(checkpointer, model, optimizer, progress, world_size, rank, events)
        if totals[2] > 0:
            if rank == 0:
                events.emit("handoff", reason="regrow", step=progress.step, world_size=world_size,
                            grow_to=int(totals[2]))
            report_checkpoint(checkpointer, model, optimizer, progress, world_size, rank, writer=0, kind="jit")
            raise WorkerGroupHandoff("regrow", progress.step)
        interval = cfg.checkpoint.interval_steps
        if interval and progress.step % interval == 0:
            report_checkpoint(checkpointer, model, optimizer, progress, world_size, rank, writer=0, kind="periodic")
    if capacity:
        capacity.stop()


def handoff_on_preemption(checkpointer, model, optimizer, progress: Progress, world_size: int, rank: int,
                          events: EventLog) -> None:
    """All ranks agreed a notice arrived: checkpoint from a surviving rank, then restart without the node."""
    info = ray.train.get_preemption_info()  # a barrier: every rank gets rank 0's view
    if info is None:
        return  # rank 0 has not received the signal yet; the ranks agree again next step
    survivors = [r for r in range(world_size) if r not in set(info.preempted_ranks)]
    writer = survivors[0] if survivors else 0
    if rank == writer:
        events.emit("handoff", reason="preemption", step=progress.step, world_size=world_size,
                    preempted_ranks=info.preempted_ranks, nodes=info.preempted_node_ids,
                    deadline=info.deadline_ms / 1000 if info.deadline_ms else None)
    report_checkpoint(checkpointer, model, optimizer, progress, world_size, rank, writer=writer, kind="jit")
    raise WorkerGroupHandoff("preemption", progress.step)


def report_checkpoint(checkpointer: Checkpointer, model, optimizer, progress: Progress, world_size: int,
                      rank: int, writer: int, kind: str) -> None:
    """``writer`` writes the checkpoint; every rank then joins Ray Train's report of its pointer."""
    with tempfile.TemporaryDirectory(prefix="raytrain-spot-pointer-") as pointer_dir:
        checkpoint = None
        if rank == writer:
            checkpointer.save(model, optimizer, progress, world_size, kind)
            write_pointer(pointer_dir, checkpointer.run_name, progress.step, checkpointer.store.uri)
            checkpoint = ray.train.Checkpoint.from_directory(pointer_dir)
        ray.train.report({"step": progress.step, "samples_seen": progress.samples_seen}, checkpoint=checkpoint,
                         checkpoint_dir_name=f"pointer_{progress.step:08d}")
