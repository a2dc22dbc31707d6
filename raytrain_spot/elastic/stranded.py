"""A handoff's step held by node copies alone, copied on to the shared tiers by the controller when it is at risk.

A handoff that leaves nodes staying commits its step on their node copies alone (loop/handoff.py):
the next group restores it from them at memory speed and copies it on to the shared tiers
(``CheckpointManager.replicate``). Until then the step lives on those nodes only. Two cases put it
at risk, and in both the controller copies it on itself (``copy_on``: in a run, a Ray task on a
holding node, owned by the controller, which outlives the group's processes):

* **one node holds it**: its loss before the next group has copied the step on loses the step.
  On the V100 trace window a group of one regrew; its node had a notice a second later, the node
  the group regrew onto was lost, the next group waited 48 s for capacity, and the node died with
  the step: 48 steps redone (docs/benchmarks.md). The copy starts at the handoff, before any notice
  can come (Ray places no new task on a draining node);
* **the next group waits for capacity** (fewer than ``min_workers`` fit): the wait may last minutes.
  The copy starts when the wait does.

The group then started is told the step the controller copies (``GroupStart.copying_on``) and leaves
its copy-on to it: two uploads of one step to the head would spoil each other. In a run, ``copy_on`` is
``copy_on_from_nodes``: checkpoint/copy_on.py's ``commit_node_copy`` in a process that preloads nothing.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from raytrain_spot.checkpoint.copy_on import commit_node_copy
from raytrain_spot.elastic.capacity import NodeView
from raytrain_spot.elastic.standby import NO_PRELOAD

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOnNodes:
    step: int
    nodes: Tuple[str, ...]
    """The nodes whose copies alone hold ``step``."""


class StrandedStep:
    """The controller's view of the last handoff's step until the next group runs (see the module docstring).

    ``copy_on(node_id, step)`` starts the commit of ``step`` from that node's copy and returns its
    future (True: a shared tier holds it). ``cluster`` reads the node table."""

    def __init__(self, copy_on: Callable[[str, int], "Future[bool]"], cluster: Callable[[], Iterable[NodeView]]):
        self._copy_on = copy_on
        self._cluster = cluster
        self._stranded: Optional[StepOnNodes] = None
        self._tried: Tuple[str, ...] = ()
        self._copying: Optional["Future[bool]"] = None

    def handed_off(self, step: int, nodes: Iterable[str]) -> None:
        """The group ended at ``step``, held by ``nodes``' copies alone (none: on the shared tiers too)."""
        nodes = tuple(nodes)
        self._stranded = StepOnNodes(step, nodes) if nodes else None
        self._tried, self._copying = (), None
        if len(nodes) == 1:
            self._copy(f"only node {nodes[0]} holds it")

    def waiting_for_capacity(self) -> None:
        """The next group waits for capacity: copy the step on, unless a copy runs or committed it."""
        self._copy("the next group waits for capacity")

    def group_starting(self) -> Optional[int]:
        """The step whose copy-on the starting group leaves to the controller: one running or committed."""
        copying = self._copying is not None and not self._failed(self._copying)
        return self._stranded.step if copying else None

    def group_running(self) -> None:
        """A group runs: it restored the step, or the nodes holding it are gone."""
        self._stranded, self._tried, self._copying = None, (), None

    def _copy(self, why: str) -> None:
        """From a holder still alive and not draining (Ray places no task on a draining node); after a
        failed copy, from the next such holder."""
        if self._stranded is None or (self._copying is not None and not self._failed(self._copying)):
            return
        usable = {node.node_id for node in self._cluster() if node.alive and not node.draining}
        node = next((node for node in self._stranded.nodes if node in usable and node not in self._tried), None)
        if node is None:
            return
        self._tried += (node,)
        step = self._stranded.step
        logger.warning("Copying step %d from node %s's copy on to the shared tiers: %s, and until the next group "
                       "copies it on, the step lives on %d node(s) alone", step, node, why, len(self._stranded.nodes))
        self._copying = self._copy_on(node, step)
        self._copying.add_done_callback(lambda done: self._report(step, node, done))

    @staticmethod
    def _report(step: int, node: str, done: "Future[bool]") -> None:
        if done.exception() is not None:  # its node died, or its tiers failed: what is left is restored
            logger.warning("Step %d's copy-on from node %s failed: %s: %s", step, node,
                           type(done.exception()).__name__, done.exception())
        elif done.result():
            logger.info("Step %d is on the shared tiers, copied on from node %s", step, node)
        else:
            logger.warning("Step %d's copy-on from node %s committed nothing (its copy did not verify, or no shared "
                           "tier took it)", step, node)

    @staticmethod
    def _failed(copying: "Future[bool]") -> bool:
        return copying.done() and (copying.exception() is not None or not copying.result())


def copy_on_from_nodes(config: Dict[str, Any], storage_uri: str, head_store: Any, lease_owner: Optional[str],
                       events: Any) -> Callable[[str, int], "Future[bool]"]:
    """``copy_on`` for ``SpotTorchTrainer``: checkpoint/copy_on.py's ``commit_node_copy`` as a Ray task on
    the given node, owned by its caller (the controller), in a process that preloads nothing (``NO_PRELOAD``)."""
    return partial(_submit, config, storage_uri, head_store, lease_owner, events)


def _submit(config: Dict[str, Any], storage_uri: str, head_store: Any, lease_owner: Optional[str], events: Any,
            node_id: str, step: int) -> "Future[bool]":
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(commit_node_copy).options(
        num_cpus=0, max_retries=0, name="raytrain_spot.copy_on", runtime_env={"env_vars": {NO_PRELOAD: "1"}},
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    return task.remote(config, storage_uri, head_store, lease_owner, events, node_id, step).future()
