"""Live monitoring fed with event records: TensorBoard by default, Weights & Biases when installed
and configured, and Ray metrics (Prometheus, hence the Ray dashboard and Grafana).

``MonitoringSink.write(record)`` turns records into scalars - loss, learning rate, gradient norm,
step time, samples/s, checkpoint stalls and durable checkpoints, world size, goodput so far, cost so
far, preemptions - and hands them to every writer, at the training step they belong to.
``MonitoringSink`` is a sink of ``raytrain_spot.observe.events.EventFeed``, beside the alert runner and the
progress printer, so the driver wires monitoring without touching the training loop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from typing import Any, Dict, List, Optional, Protocol, Sequence

from raytrain_spot.config.monitoring import MonitoringConfig
from raytrain_spot.cost.live import RunningTotals
from raytrain_spot.cost.pricing import PriceCatalog
from raytrain_spot.observe.records import Add, Alert, Checkpoint, End, Eval, Group, Kill, Notice, Remove, Resize, Step

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
DURABLE_TIER = "durable"
"""The tier name of checkpoint records that reached durable storage (checkpoint/tiers.py)."""


class ScalarWriter(Protocol):
    def write(self, scalars: Dict[str, float], step: int, wall_time: float) -> None: ...

    def write_table(self, tag: str, rows: List[Dict[str, str]], step: int, wall_time: float) -> None:
        """Rows of text (an evaluation's examples), where the backend shows text."""

    def close(self) -> None: ...


def markdown_table(rows: List[Dict[str, str]]) -> str:
    """Rows with the same columns as a Markdown table (what TensorBoard's text tab renders)."""
    columns = list(rows[0])

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                      *("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows)])


def flat_settings(settings: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nest of settings as ``{"optim.lr": 0.003, ...}``: numbers, strings and booleans as they
    are, anything else (None, a list) as its text; what hyperparameter tables take."""
    flat: Dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class TensorBoardWriter:
    """Scalars into TensorBoard event files (tensorboardX, which ships with Ray), and the run's
    settings into the same run's HParams session, beside the metrics it compares runs on."""

    HPARAM_METRICS = ("train/loss", "goodput/so_far", "cost/usd_so_far")

    def __init__(self, logdir: str, settings: Optional[Dict[str, Any]] = None):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=logdir)
        if settings:
            from tensorboardX.summary import hparams

            experiment, session_start, self._session_end = hparams(
                flat_settings(settings), {tag: 0.0 for tag in self.HPARAM_METRICS})
            for summary in (experiment, session_start):
                self._writer.file_writer.add_summary(summary)

    def write(self, scalars: Dict[str, float], step: int, wall_time: float) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step, walltime=wall_time)

    def write_table(self, tag: str, rows: List[Dict[str, str]], step: int, wall_time: float) -> None:
        self._writer.add_text(tag, markdown_table(rows), global_step=step, walltime=wall_time)

    def close(self) -> None:
        if getattr(self, "_session_end", None) is not None:
            self._writer.file_writer.add_summary(self._session_end)
        self._writer.close()


def wandb_run_id(run_name: str) -> str:
    """The W&B run id of a run: the same at every resume of ``run_name``, so W&B continues one run.
    The name's characters W&B allows (letters, digits, ``-``, ``_``), cut to fit, then a hash of the
    whole name, so names that differ only in the characters dropped get runs of their own."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")[:48]
    return f"{readable}-{hashlib.sha256(run_name.encode()).hexdigest()[:8]}"


class WandbWriter:
    """Scalars into a Weights & Biases run whose step is the training step.

    The run id comes from the run name (``wandb_run_id``), so every resume continues the same W&B
    run. Records that are not steps (a notice, a kill, a resize) are logged at the current training
    step and so never advance it. W&B keeps the first value of a step and refuses a step below the
    run's latest: steps redone after a restore, and the records a resumed driver reads again from the
    start of the event log, are not sent."""

    def __init__(self, project: str, run_name: str, mode: str, directory: str,
                 settings: Optional[Dict[str, Any]] = None):
        import wandb

        self._run = wandb.init(project=project, name=run_name, id=wandb_run_id(run_name), resume="allow",
                               mode=mode, dir=directory, config=settings or {})

    def write(self, scalars: Dict[str, float], step: int, wall_time: float) -> None:
        if step >= self._run.step:
            self._run.log(scalars, step=step)

    def write_table(self, tag: str, rows: List[Dict[str, str]], step: int, wall_time: float) -> None:
        import wandb

        if step >= self._run.step:
            columns = list(rows[0])
            self._run.log({tag: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])},
                          step=step)

    def close(self) -> None:
        self._run.finish()


class RayMetricsWriter:
    """Scalars as Ray metrics (Prometheus, tagged with the run name), named as Prometheus has it:
    a counter ends in ``_total``, every other name in its unit. Ray prefixes them with ``ray_``.

    The last durable checkpoint is exported as its Unix time, not its age: a Spot operator alerts on
    ``time() - raytrain_spot_last_durable_checkpoint_timestamp_seconds > 1800``, which goes on
    rising when this driver stops reporting, where an age gauge would freeze at its last value."""

    GAUGES = {"goodput/so_far": "raytrain_spot_goodput_ratio", "cluster/world_size": "raytrain_spot_world_size",
              "cost/usd_so_far": "raytrain_spot_cost_usd", "train/loss": "raytrain_spot_loss",
              "checkpoint/durable_step": "raytrain_spot_last_durable_checkpoint_step"}
    STEP = "raytrain_spot_step"
    DURABLE_AT = "raytrain_spot_last_durable_checkpoint_timestamp_seconds"
    PREEMPTIONS = "raytrain_spot_preemptions"
    """A Counter: Ray exports it as ``ray_raytrain_spot_preemptions_total``. It counts the
    preemptions recorded since this writer started; a counter restarts with its process."""

    def __init__(self, run_name: str):
        from ray.util.metrics import Counter, Gauge

        self._tags = {"run": run_name}

        def gauge(name: str, what: str):
            return Gauge(name, description=f"raytrain-spot {what}", tag_keys=("run",))

        self._gauges = {tag: gauge(name, tag) for tag, name in self.GAUGES.items()}
        self._step = gauge(self.STEP, "training steps completed")
        self._durable_at = gauge(self.DURABLE_AT, "Unix time of the last checkpoint in durable storage")
        self._preemptions = Counter(self.PREEMPTIONS, description="raytrain-spot Spot preemptions",
                                    tag_keys=("run",))
        self._preemptions_counted = 0.0
        self._started_at = time.time()

    def write(self, scalars: Dict[str, float], step: int, wall_time: float) -> None:
        self._step.set(step, tags=self._tags)
        for tag, value in scalars.items():
            if tag in self._gauges:
                self._gauges[tag].set(value, tags=self._tags)
        if "checkpoint/durable_step" in scalars:
            self._durable_at.set(wall_time, tags=self._tags)
        preemptions = scalars.get("cluster/preemptions", 0.0)
        if preemptions > self._preemptions_counted:
            if wall_time >= self._started_at:  # a resumed driver reads the log from its start: no recount
                self._preemptions.inc(preemptions - self._preemptions_counted, tags=self._tags)
            self._preemptions_counted = preemptions

    def write_table(self, tag: str, rows: List[Dict[str, str]], step: int, wall_time: float) -> None:
        """Prometheus holds numbers only."""

    def close(self) -> None:
        """Metrics live as long as the process."""


def build_writers(config: MonitoringConfig, run_dir: str, run_name: str,
                  settings: Optional[Dict[str, Any]] = None) -> List[ScalarWriter]:
    """The writers ``config`` asks for; W&B only when the package is importable. ``settings``: the
    run's resolved settings, secrets redacted (``Config.to_dict()``), logged as its hyperparameters."""
    writers: List[ScalarWriter] = []
    if config.tensorboard:
        writers.append(TensorBoardWriter(os.path.join(run_dir, TENSORBOARD_DIR), settings))
    if config.wandb_project:
        try:
            writers.append(WandbWriter(config.wandb_project, run_name, config.wandb_mode, run_dir, settings))
        except ImportError:
            logger.warning("monitoring: wandb_project=%s but wandb is not installed; W&B logging is off. Fix: "
                           "pip install 'raytrain-spot[trackers]'", config.wandb_project)
    if config.ray_metrics:
        writers.append(RayMetricsWriter(run_name))
    return writers


class MonitoringSink:
    """Event records in, scalars out to every writer."""

    def __init__(self, writers: Sequence[ScalarWriter], catalog: PriceCatalog, region: Optional[str] = None):
        self._writers = list(writers)
        self.totals = RunningTotals(catalog, region)
        self._step = 0
        self._stall_logged_step: Optional[int] = None

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("ev") == Alert.ev:
            return
        self.totals.feed(record)
        t, ev = float(record["t"]), record["ev"]
        if ev == Step.ev:
            self._step = int(record["step"])
            scalars = {"train/loss": float(record["loss"]), "train/lr": float(record["lr"]),
                       "train/step_s": float(record["duration_s"]), **self._run_scalars(t)}
            if record.get("grad_norm") is not None:
                scalars["train/grad_norm"] = float(record["grad_norm"])
            if self.totals.samples_per_s is not None:
                scalars["train/samples_per_s"] = self.totals.samples_per_s
        elif ev == Eval.ev:
            scalars = {"eval/loss": float(record["loss"])}
            if record.get("examples"):
                for writer in self._writers:
                    writer.write_table("eval/examples", record["examples"], int(record["step"]), t)
        elif ev == Checkpoint.ev:
            scalars = self._checkpoint_scalars(record)
            if not scalars:
                return
        elif ev in (Kill.ev, Notice.ev, Group.ev, Resize.ev, Add.ev, Remove.ev, End.ev):
            scalars = self._run_scalars(t)
        else:
            return
        for writer in self._writers:
            writer.write(scalars, self._step, t)

    def _checkpoint_scalars(self, record: Dict[str, Any]) -> Dict[str, float]:
        """The training stall of a save, at its first record (the tier the workers wrote first; its
        copies to further tiers stall nothing), and the step of each checkpoint that reaches durable storage."""
        scalars: Dict[str, float] = {}
        step = int(record["step"])
        if step != self._stall_logged_step:
            self._stall_logged_step = step
            scalars["checkpoint/stall_s"] = float(record["stall_s"])
        if record["tier"] == DURABLE_TIER:
            scalars["checkpoint/durable_step"] = float(step)
        return scalars

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
