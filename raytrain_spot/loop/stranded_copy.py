"""The copy-on of a handoff's step from a node's copy, run on that node for the controller (elastic/stranded.py)."""

from __future__ import annotations

from concurrent.futures import Future
from functools import partial
from typing import Callable

from raytrain_spot.config.schema import config_from_dict
from raytrain_spot.elastic.standby import WANTED_NOW
from raytrain_spot.loop.worker import LoopContext, node_checkpoint_manager
from raytrain_spot.observe.events import EventLog


def copy_on_from_nodes(context: LoopContext) -> Callable[[str, int], "Future[bool]"]:
    """``copy_on`` for ``SpotTorchTrainer``: a Ray task on the given node, owned by its caller (the
    controller, which outlives the worker group whose step it copies), in a process that preloads the
    stack at normal priority (the next group may wait for it)."""
    return partial(_submit, context)


def _submit(context: LoopContext, node_id: str, step: int) -> "Future[bool]":
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(commit_node_copy).options(
        num_cpus=0, max_retries=0, name="raytrain_spot.copy_on", runtime_env={"env_vars": {WANTED_NOW: "1"}},
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    return task.remote(context, node_id, step).future()


def commit_node_copy(context: LoopContext, node_id: str, step: int) -> bool:
    """Commit ``node_id``'s verified copy of ``step`` on the shared tiers; whether one holds it now."""
    cfg = config_from_dict(context.config)
    return node_checkpoint_manager(cfg, context, node_id, EventLog(context.events)).copy_on(step)
