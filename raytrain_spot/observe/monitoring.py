"""Live monitoring fed with event records: TensorBoard by default, Weights & Biases when installed
and configured, and Ray metrics (Prometheus, hence the Ray dashboard and Grafana).

``MonitoringSink.write(record)`` turns records into scalars - loss, learning rate, samples/s,
world size, goodput so far, cost so far, preemptions - and hands them to every writer.
``MonitoringSink`` is a sink of ``raytrain_spot.observe.events.EventFeed``, beside the alert runner and the
progress printer, so the driver wires monitoring without touching the training loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence

from raytrain_spot.config.errors import require
from raytrain_spot.cost.live import RunningTotals
from raytrain_spot.cost.pricing import PriceCatalog

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


@dataclass
class MonitoringConfig:
    """Which monitoring backends a run writes to."""

    tensorboard: bool = True
    """Write TensorBoard event files under ``<run dir>/tensorboard``."""
    wandb_project: Optional[str] = None
    """Also log to this Weights & Biases project when ``wandb`` is importable; unset: no W&B."""
    wandb_mode: str = "offline"
    """W&B mode: ``offline`` (sync later with ``wandb sync``) or ``online``."""
    ray_metrics: bool = True
    """Export goodput, world size, cost and preemptions as Ray metrics (Prometheus gauges)."""

    def __post_init__(self):
        require(self.wandb_mode in ("offline", "online"), "monitoring.wandb_mode", f"{self.wandb_mode!r} is not a mode",
                "use monitoring.wandb_mode=offline or online")


class ScalarWriter(Protocol):
    def write(self, scalars: Dict[str, float], step: int, wall_time: float) -> None: ...

    def close(self) -> None: ...


class TensorBoardWriter:
    """Scalars into TensorBoard event files (tensorboardX, which ships with Ray)."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=logdir)

    def write(self, scalars: Dict[str, float], step: int, wall_time: float) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step, walltime=wall_time)

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """Scalars into a Weights & Biases run. W&B wants increasing steps, so the step goes in as a value."""

    def __init__(self, project: str, run_name: str, mode: str, directory: str):
        import wandb

        self._run = wandb.init(project=project, name=run_name, mode=mode, dir=directory, resume="allow")

    def write(self, scalars: Dict[str, float], step: int, wall_time: float) -> None:
        self._run.log({**scalars, "train/step": step})

    def close(self) -> None:
        self._run.finish()


class RayMetricsWriter:
    """The latest value of each scalar as a Ray ``Gauge``, tagged with the run name."""

    EXPORTED = {"goodput/so_far": "raytrain_spot_goodput", "cluster/world_size": "raytrain_spot_world_size",
                "cost/usd_so_far": "raytrain_spot_cost_usd", "cluster/preemptions": "raytrain_spot_preemptions"}

    def __init__(self, run_name: str):
        from ray.util.metrics import Gauge

        self._tags = {"run": run_name}
        self._gauges = {tag: Gauge(name, description=f"raytrain-spot {tag}", tag_keys=("run",))
                        for tag, name in self.EXPORTED.items()}

    def write(self, scalars: Dict[str, float], step: int, wall_time: float) -> None:
        for tag, value in scalars.items():
            if tag in self._gauges:
                self._gauges[tag].set(value, tags=self._tags)

    def close(self) -> None:
        """Gauges live as long as the process."""


def build_writers(config: MonitoringConfig, run_dir: str, run_name: str) -> List[ScalarWriter]:
    """The writers ``config`` asks for; W&B only when the package is importable."""
    writers: List[ScalarWriter] = []
    if config.tensorboard:
        writers.append(TensorBoardWriter(os.path.join(run_dir, TENSORBOARD_DIR)))
    if config.wandb_project:
        try:
            writers.append(WandbWriter(config.wandb_project, run_name, config.wandb_mode, run_dir))
        except ImportError:
            logger.warning("monitoring: wandb_project=%s but wandb is not installed; W&B logging is off",
                           config.wandb_project)
    if config.ray_metrics:
        writers.append(RayMetricsWriter(run_name))
    return writers


class MonitoringSink:
    """Event records in, scalars out to every writer."""

    def __init__(self, writers: Sequence[ScalarWriter], catalog: PriceCatalog, region: Optional[str] = None):
        self._writers = list(writers)
        self.totals = RunningTotals(catalog, region)
        self._step = 0

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("ev") == "alert":
            return
        self.totals.feed(record)
        t, ev = float(record["t"]), record["ev"]
        if ev == "step":
            self._step = int(record["step"])
            scalars = {"train/loss": float(record["loss"]), "train/lr": float(record["lr"]), **self._run_scalars(t)}
            if self.totals.samples_per_s is not None:
                scalars["train/samples_per_s"] = self.totals.samples_per_s
        elif ev in ("kill", "notice", "group", "resize", "add", "remove", "end"):
            scalars = self._run_scalars(t)
        else:
            return
        for writer in self._writers:
            writer.write(scalars, self._step, t)

    def _run_scalars(self, t: float) -> Dict[str, float]:
        goodput = self.totals.goodput(t)
        return {"cluster/world_size": float(self.totals.world_size),
                "cluster/preemptions": float(len(self.totals.preemptions())),
                "cost/usd_so_far": self.totals.cost_usd(t),
                **({"goodput/so_far": goodput} if goodput is not None else {})}

    def tick(self) -> None:
        """Nothing is time-driven here; the feed calls it on every poll."""

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
