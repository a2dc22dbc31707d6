"""Live monitoring fed with event records: TensorBoard by default, Weights & Biases when installed
and configured, and Ray metrics (Prometheus, hence the Ray dashboard and Grafana).

``MonitoringSink.write(record)`` turns records into scalars - loss, learning rate, samples/s,
world size, goodput so far, cost so far, preemptions - and hands them to every writer.
``EventFeed`` follows a run's ``events.jsonl`` in a thread and feeds any number of sinks (this
one, the alert runner), so the driver wires monitoring without touching the training loop.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence

from raytrain_spot.ledger.live import RunningTotals
from raytrain_spot.pricing import PriceCatalog

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
        if self.wandb_mode not in ("offline", "online"):
            raise ValueError(f"wandb_mode {self.wandb_mode!r}: use offline or online")


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


class RecordSink(Protocol):
    def write(self, record: Dict[str, Any]) -> None: ...

    def tick(self) -> Any: ...

    def close(self) -> None: ...


class EventFeed:
    """Follows ``events.jsonl`` in a thread; every new record goes to every sink, then each sink ticks."""

    def __init__(self, events_path: str, sinks: Sequence[RecordSink], poll_s: float = 1.0, from_start: bool = True):
        self._path, self._sinks, self._poll_s = events_path, list(sinks), poll_s
        self._offset = 0 if from_start or not os.path.exists(events_path) else os.path.getsize(events_path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="event-feed", daemon=True)

    def __enter__(self) -> "EventFeed":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        for sink in self._sinks:
            sink.close()

    def _follow(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.poll()

    def poll(self) -> None:
        """Hand every complete new line to the sinks, then let each sink tick once."""
        if os.path.exists(self._path):
            with open(self._path) as f:
                f.seek(self._offset)
                while (line := f.readline()).endswith("\n"):
                    self._offset = f.tell()
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    for sink in self._sinks:
                        self._call(sink, "write", record)
        for sink in self._sinks:
            self._call(sink, "tick")

    @staticmethod
    def _call(sink: RecordSink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception:  # a failing sink must not stop the others or the run
            logger.exception("monitoring: %s.%s failed", type(sink).__name__, method)
