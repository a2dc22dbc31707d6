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
        events.emit("group", world_size=world_size, step=progress.step,
                    restored_step=restored.progress.step if restored else None)

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
        totals = torch.tensor([loss_sum], dtype=torch.float64)
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

        interval = cfg.checkpoint.interval_steps
        if (interval and progress.step % interval == 0) or progress.step == cfg.trainer.max_steps:
            kind = "final" if progress.step == cfg.trainer.max_steps else "periodic"
            report_checkpoint(checkpointer, model, optimizer, progress, world_size, rank, kind)


def report_checkpoint(checkpointer: Checkpointer, model, optimizer, progress: Progress, world_size: int,
                      rank: int, kind: str) -> None:
    """Rank 0 writes the checkpoint; every rank then joins Ray Train's report of its pointer."""
    with tempfile.TemporaryDirectory(prefix="raytrain-spot-pointer-") as pointer_dir:
        checkpoint = None
        if rank == 0:
            checkpointer.save(model, optimizer, progress, world_size, kind)
            write_pointer(pointer_dir, checkpointer.run_name, progress.step, checkpointer.store.uri)
            checkpoint = ray.train.Checkpoint.from_directory(pointer_dir)
        ray.train.report({"step": progress.step, "samples_seen": progress.samples_seen}, checkpoint=checkpoint,
                         checkpoint_dir_name=f"pointer_{progress.step:08d}")
