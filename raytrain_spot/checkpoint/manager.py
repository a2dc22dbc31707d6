"""Saving and restoring the training state of one worker."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from raytrain_spot.checkpoint.format import (
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
from raytrain_spot.events import EventLog
from raytrain_spot.storage import Store

logger = logging.getLogger(__name__)

POINTER_FILE = "pointer.json"


@dataclass
class Progress:
    """Where training is: the only loop state a resume needs besides model and optimizer."""

    step: int = 0
    samples_seen: int = 0


@dataclass
class Restored:
    progress: Progress
    tier: str
    manifest: Manifest
    duration_s: float


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> Dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "progress": {"step": progress.step, "samples_seen": progress.samples_seen}}


class Checkpointer:
    """Writes checkpoints to a store and restores the newest valid one."""

    def __init__(self, store: Store, run_name: str, config: Dict[str, Any], keep_latest_k: int, events: EventLog):
        self.store = store
        self.run_name = run_name
        self.config = config
        self.keep_latest_k = keep_latest_k
        self.events = events

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress, world_size: int,
             kind: str) -> None:
        started = time.time()
        key = checkpoint_key(self.run_name, progress.step)
        with tempfile.TemporaryDirectory(prefix="raytrain-spot-save-") as scratch:
            path = os.path.join(scratch, STATE_FILE)
            entry = write_state(training_state(model, optimizer, progress), path)
            manifest = Manifest(step=progress.step, samples_seen=progress.samples_seen, kind=kind,
                                world_size=world_size, files={STATE_FILE: entry}, config=self.config)
            commit(self.store, key, {STATE_FILE: path}, manifest)
        duration = time.time() - started
        self.events.emit("checkpoint", step=progress.step, tier="durable", kind=kind, stall_s=duration,
                         duration_s=duration, bytes=entry.size)
        self._apply_retention()

    def _apply_retention(self) -> None:
        for step in listed_steps(self.store, self.run_name)[self.keep_latest_k:]:
            self.store.delete_prefix(checkpoint_key(self.run_name, step))

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, hint_step: Optional[int]) -> Optional[Restored]:
        """Load the newest checkpoint that validates, skipping (and naming) any that do not."""
        started = time.time()
        steps: List[int] = listed_steps(self.store, self.run_name)
        if hint_step is not None and hint_step not in steps:
            logger.warning("Ray Train's latest checkpoint (step %d) is not in %s; using what is there",
                           hint_step, self.store.uri)
        for step in steps:
            key = checkpoint_key(self.run_name, step)
            with tempfile.TemporaryDirectory(prefix="raytrain-spot-restore-") as scratch:
                try:
                    manifest, paths = fetch_verified(self.store, key, scratch)
                    state = load_state(paths[STATE_FILE])
                except InvalidCheckpoint as why:
                    logger.warning("Skipping checkpoint %s/%s: %s", self.store.uri, key, why)
                    continue
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            progress = Progress(**state["progress"])
            return Restored(progress, "durable", manifest, duration_s=time.time() - started)
        return None


def write_pointer(directory: str, run_name: str, step: int, store_uri: str) -> None:
    """The small checkpoint Ray Train keeps: which step, and where its data is."""
    with open(os.path.join(directory, POINTER_FILE), "w") as f:
        json.dump({"run": run_name, "step": step, "key": checkpoint_key(run_name, step), "store": store_uri}, f)


def read_pointer_step(checkpoint) -> Optional[int]:
    """The step of a pointer checkpoint from ``ray.train.get_checkpoint()``, if any."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        try:
            with open(os.path.join(directory, POINTER_FILE)) as f:
                return int(json.load(f)["step"])
        except (OSError, ValueError, KeyError):
            return None
