"""The main job: ``python -m raytrain_spot.run +experiment=vlm [overrides]``.

Validates the configuration, starts (or joins) the Ray cluster, trains with elastic DDP
and prints a summary. Everything the run writes is under ``outputs/<run.name>/``; running
again with the same ``run.name`` resumes from the newest valid checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from raytrain_spot.config import ConfigError, load_config, register_configs, unknown_override_key
from raytrain_spot.events import EVENTS_FILE, EventLog, start_event_log
from raytrain_spot.progress import ProgressPrinter, format_summary, summarize

logger = logging.getLogger("raytrain_spot")
register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dict_cfg: DictConfig) -> None:
    try:
        cfg = load_config(dict_cfg)
    except ConfigError as error:
        print(f"Configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    run_dir = HydraConfig.get().runtime.output_dir
    storage_uri = cfg.storage.resolved_uri(os.getcwd())

    from raytrain_spot.data.parquet import ensure_dataset

    dataset = ensure_dataset(cfg.data, cfg.run.seed)
    started = time.time()
    from raytrain_spot.local_cluster import connect

    with connect(cfg.cluster) as cluster:
        from raytrain_spot.cluster_monitor import ClusterMonitor
        from raytrain_spot.trainer import build_trainer
        from raytrain_spot.worker import LoopContext

        event_actor = start_event_log(run_dir)
        events = EventLog(event_actor)
        events.emit("start", run=cfg.run.name, embedded=cluster is not None, dataset=dataset)
        events_path = os.path.join(run_dir, EVENTS_FILE)
        print(f"run {cfg.run.name}: {cfg.trainer.min_workers}-{cfg.trainer.max_workers} workers, "
              f"global batch {cfg.trainer.global_batch_size}, {cfg.trainer.max_steps} steps, "
              f"checkpoints in {storage_uri}/{cfg.run.name}, logs in {run_dir}", flush=True)
        context = LoopContext(config=cfg.to_dict(), storage_uri=storage_uri, events=event_actor)
        with ClusterMonitor(events), \
                ProgressPrinter(events_path, cfg.trainer.max_steps, cfg.trainer.log_every_steps, sys.stdout) as progress:
            fit = FitThread(build_trainer(cfg, context))
            simulator = None
            if cfg.chaos is not None:
                from raytrain_spot.chaos import SpotSimulator

                simulator = SpotSimulator(cfg.chaos, cluster, events, lambda: progress.latest_step)
            try:
                # Ray wants node changes from the main thread, so training runs in a thread of its own.
                while fit.is_alive():
                    if simulator is not None:
                        simulator.tick()
                    fit.join(0.1)
            finally:
                if simulator is not None:
                    simulator.close()
            status = "finished" if fit.error is None else "failed"
            error_text = None if fit.error is None else f"{type(fit.error).__name__}: {fit.error}"
            if fit.error is not None:
                logger.error("Training failed: %s", error_text)
            events.emit("end", status=status, error=error_text)
            events.flush()

    summary = summarize(events_path, started, f"{storage_uri}/{cfg.run.name}/checkpoints")
    summary["status"] = status
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_summary(summary, status), flush=True)
    if status != "finished":
        sys.exit(1)


class FitThread(threading.Thread):
    """Runs ``trainer.fit()``; keeps the error it raised, if any."""

    def __init__(self, trainer):
        super().__init__(name="fit", daemon=True)
        self._trainer = trainer
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self._trainer.fit()
        except Exception as error:  # reported by the driver after the summary
            self.error = error


if __name__ == "__main__":
    if problem := unknown_override_key(sys.argv[1:]):
        print(f"Configuration error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
