"""A handoff's step held by node copies alone, copied on to the shared tiers when the next group is late.

A handoff that leaves nodes staying commits its step on their node copies alone (loop/handoff.py):
the next group restores it from them at memory speed and copies it on to the shared tiers
(``CheckpointManager.replicate``). Until that group starts, the step lives on those nodes only, and
a group that waits for capacity can wait long. On the V100 trace window a group of one regrew, its
node had a notice a second later, the next group waited 48 s for capacity, the node died with the
step, and 48 steps were redone (docs/benchmarks.md).

So once the scaling policy waits for capacity, ``StrandedStep`` has a node that holds the step commit
it on the shared tiers (``copy_on``: in a run, a Ray task on that node owned by the controller, which
outlives the group's processes). The next group starts only once that commit is done or has failed:
its own copy-on would otherwise race it on the head. A group that starts at once, as after most
handoffs, never waits for it.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

from raytrain_spot.elastic.capacity import NodeView

logger = logging.getLogger(__name__)

COPY_ON_WAIT_S = 120.0
"""Longest the next group's start waits for a copy-on in flight: minutes of a stuck head, not a
copy's seconds (0.5 GB reached the head in about 5 s on two shared cores)."""


@dataclass(frozen=True)
class StepOnNodes:
    step: int
    nodes: Tuple[str, ...]
    """The nodes whose copies alone hold ``step``."""


class StrandedStep:
    """The controller's view of the last handoff's step while no group runs (see the module docstring).

    ``copy_on(node_id, step)`` starts the commit of ``step`` from that node's copy and returns its
    future (True: a shared tier holds it)."""

    def __init__(self, copy_on: Callable[[str, int], "Future[bool]"], wait_s: float = COPY_ON_WAIT_S):
        self._copy_on = copy_on
        self._wait_s = wait_s
        self._stranded: Optional[StepOnNodes] = None
        self._tried: Tuple[str, ...] = ()
        self._copying: Optional["Future[bool]"] = None

    def handed_off(self, step: int, nodes: Iterable[str]) -> None:
        """The group ended at ``step``, held by ``nodes``' copies alone (none: on the shared tiers too)."""
        nodes = tuple(nodes)
        self._stranded = StepOnNodes(step, nodes) if nodes else None
        self._tried, self._copying = (), None

    def waiting_for_capacity(self, cluster: Callable[[], Iterable[NodeView]]) -> None:
        """The next group waits: start the copy-on from a node that holds the step, unless one runs or
        succeeded; after a failure, from the next holder still alive (a draining one last)."""
        if self._stranded is None or (self._copying is not None and not self._failed(self._copying)):
            return
        alive = {node.node_id: node.draining for node in cluster() if node.alive}
        holders = sorted((node for node in self._stranded.nodes if node in alive and node not in self._tried),
                         key=lambda node: alive[node])
        if not holders:
            return
        node = holders[0]
        self._tried += (node,)
        logger.warning("Copying step %d from node %s's copy on to the shared tiers: the next group waits for capacity, "
                       "and until it starts the step lives on %d node(s) alone", self._stranded.step, node,
                       len(self._stranded.nodes))
        self._copying = self._copy_on(node, self._stranded.step)

    def before_group_start(self) -> None:
        """Wait for the copy-on in flight, if any (the group's own copy-on would race it); the group then
        takes the step over."""
        if self._copying is not None:
            self._wait_for(self._stranded.step, self._copying)
        self._stranded, self._tried, self._copying = None, (), None

    def _wait_for(self, step: int, copying: "Future[bool]") -> None:
        if not copying.done():
            logger.info("The next group waits for step %d's copy-on to the shared tiers", step)
        try:
            committed = copying.result(timeout=self._wait_s)
        except FutureTimeout:
            logger.error("Step %d's copy-on to the shared tiers took over %.0f s; the next group starts without it",
                         step, self._wait_s)
        except Exception as error:  # its node died, or its tiers failed: the group restores what is left
            logger.warning("Step %d's copy-on to the shared tiers failed: %s: %s", step, type(error).__name__, error)
        else:
            logger.info("Step %d's copy-on %s", step, "committed it on the shared tiers" if committed
                        else "committed nothing (its node's copy did not verify, or no shared tier took it)")

    @staticmethod
    def _failed(copying: "Future[bool]") -> bool:
        return copying.done() and (copying.exception() is not None or not copying.result())
