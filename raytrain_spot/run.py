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
    status, error_text = "failed", None
    from raytrain_spot.local_cluster import connect

    with connect(cfg.cluster) as cluster:
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
        with ProgressPrinter(events_path, cfg.trainer.max_steps, cfg.trainer.log_every_steps, sys.stdout):
            try:
                build_trainer(cfg, context).fit()
                status = "finished"
            except Exception as error:  # the summary still tells what was done
                error_text = f"{type(error).__name__}: {error}"
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


if __name__ == "__main__":
    if problem := unknown_override_key(sys.argv[1:]):
        print(f"Configuration error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
