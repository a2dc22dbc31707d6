"""Builds the Ray Train ``TorchTrainer`` for a run: elastic scaling, Spot-proof failure handling."""

from __future__ import annotations

from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.config import LoggingConfig

from raytrain_spot.config.schema import Config
from raytrain_spot.distributed.process_group import StoreFirstTorchConfig
from raytrain_spot.elastic.policy import SpotTorchTrainer
from raytrain_spot.elastic.standby import STANDBY_MARKER, TASK_MODULES
from raytrain_spot.elastic.stranded import copy_on_from_nodes
from raytrain_spot.elastic.survivors import survivor_commit_s
from raytrain_spot.loop.task import task_class
from raytrain_spot.loop.worker import LoopContext, run_worker


def ray_storage(storage_uri: str) -> dict:
    """RunConfig storage arguments: a local path, or a bucket path plus a pyarrow filesystem for GCS."""
    if storage_uri.startswith("gs://"):
        from raytrain_spot.storage.gcs import GcsStore

        store = GcsStore.from_uri(storage_uri)
        return {"storage_path": store.ray_storage_path(), "storage_filesystem": store.pyarrow_filesystem()}
    return {"storage_path": storage_uri[len("file://"):]}


def task_modules(task_target: str) -> str:
    """What the run's processes preload besides the stack (elastic/standby.py's ``TASK_MODULES``): the
    module of the task class ``task_target`` names and its ``preload_modules``."""
    return ",".join([task_target.rpartition(".")[0], *task_class(task_target).preload_modules])


def build_trainer(cfg: Config, context: LoopContext) -> TorchTrainer:
    trainer_cfg = cfg.trainer
    spot_aware = context.strategy.spot_aware
    fixed = trainer_cfg.min_workers == trainer_cfg.max_workers
    scaling = ScalingConfig(
        num_workers=trainer_cfg.max_workers if fixed else (trainer_cfg.min_workers, trainer_cfg.max_workers),
        use_gpu=trainer_cfg.use_gpu,
        resources_per_worker=trainer_cfg.resources_per_worker,
        elastic_resize_monitor_interval_s=cfg.tuning.resize_check_interval_s,
    )
    run_config = RunConfig(
        name=cfg.run.name,
        **ray_storage(context.storage_uri),
        # A lost Spot node is a failure to Ray unless it came with a drain: never give up on those.
        failure_config=FailureConfig(max_failures=trainer_cfg.max_failures, max_preemption_failures=-1),
        logging_config=LoggingConfig(log_level="WARNING"),
        # Marks the workers' processes so each node can count its idle standbys (standby.py), and names the
        # task's modules they preload. Each group decides whether to keep standbys (standby.py's decide_standbys).
        worker_runtime_env=({"env_vars": {STANDBY_MARKER: cfg.run.name,
                                          TASK_MODULES: task_modules(cfg.task["_target_"])}}
                            if spot_aware and cfg.elastic.warm_standby is not False else None),
    )
    spot = ({"failure_settle_s": cfg.elastic.failure_settle_s,
             "max_identical_failures": trainer_cfg.max_identical_failures,
             "survivor_commit_s": survivor_commit_s(cfg),
             "copy_on": copy_on_from_nodes(context.config, context.storage_uri, context.head_store,
                                           context.lease_owner, context.events)}
            if spot_aware else {})
    trainer_cls = SpotTorchTrainer if spot_aware else TorchTrainer
    # The baselines keep Ray's own process group setup; ours opens the store first (distributed/process_group.py).
    torch_config_cls = StoreFirstTorchConfig if spot_aware else TorchConfig
    return trainer_cls(
        run_worker,
        **spot,
        train_loop_config={"context": context},
        scaling_config=scaling,
        run_config=run_config,
        torch_config=torch_config_cls(backend="nccl" if trainer_cfg.use_gpu else "gloo",
                                      timeout_s=int(trainer_cfg.collective_timeout_s)),
    )
