"""A loss without notice, as the survivors and the controller see it.

A powered-off VM sends nothing: its peers block in the collective it never joins until Ray's
health checks declare its node dead, and only then does Ray Train's controller learn that the group
failed. At that moment every surviving rank still holds the state of the last step it completed
(data parallelism keeps a full copy on each). The survivors hear of the loss from the node table,
as the controller does (or from their failed collective, where the lost peer's connections were
reset), and commit that state (loop/survivor_commit.py); the controller's failure
policy waits for their commits before it tears the group down (``SurvivorWait``), bounded by
``elastic.survivor_commit_s``.

The two sides meet in the GCS key-value store (``SurvivorMarks``): a rank marks that it began
its commit and how it ended.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Set

from raytrain_spot.config.schema import Config

logger = logging.getLogger(__name__)

SURVIVOR_NAMESPACE = "raytrain_spot_survivors"
"""GCS key-value namespace: ``<run>/<rank>`` -> ``committing``, ``committed:<step>`` or ``failed``."""
COMMITTING, COMMITTED, FAILED = "committing", "committed", "failed"
FIRST_MARK_S = 3.0
"""How long the controller waits for the writer's mark: the survivors read the node table every
``WATCH_INTERVAL_S`` and learn of the death when the controller does, then wait a health-check
period for nodes lost with it (loop/survivor_commit.py)."""
WATCH_INTERVAL_S = 0.5
DECLARED_GRACE_S = 1.0
"""After the first node of a failed group is declared dead, how long to wait for others lost with it:
nodes that lost power together are declared dead within one health-check period (1 s)."""


def dead_nodes(node_ids: List[str]) -> Set[str]:
    """Those of ``node_ids`` the GCS has declared dead or no longer lists."""
    import ray

    return set(node_ids) - {node["NodeID"] for node in ray.nodes() if node["Alive"]}


class SurvivorMarks:
    """What each rank of run ``run_name``'s group said of its survivor commit, in the GCS key-value store."""

    def __init__(self, run_name: str):
        self._prefix = f"{run_name}/"

    def mark(self, rank: int, status: str) -> None:
        from raytrain_spot._ray import internal_kv_put

        internal_kv_put(f"{self._prefix}{rank}", status, overwrite=True, namespace=SURVIVOR_NAMESPACE)

    def read(self) -> Dict[int, str]:
        from raytrain_spot._ray import internal_kv_get, internal_kv_list

        marks = {}
        for key in internal_kv_list(self._prefix, namespace=SURVIVOR_NAMESPACE):
            value = internal_kv_get(key, namespace=SURVIVOR_NAMESPACE)
            if value is not None:
                marks[int(key.decode()[len(self._prefix):])] = value.decode()
        return marks

    def clear(self) -> None:
        from raytrain_spot._ray import internal_kv_del

        internal_kv_del(self._prefix, del_by_prefix=True, namespace=SURVIVOR_NAMESPACE)


@dataclass
class SurvivorOutcome:
    """What the controller waited for, and why it stopped waiting."""

    marks: Dict[int, str]
    waited_s: float
    reason: str

    @property
    def committed_steps(self) -> List[int]:
        return sorted(int(m.split(":")[1]) for m in self.marks.values() if m.startswith(COMMITTED))


class SurvivorWait:
    """The controller's wait, after a failure, for the survivors' commits: until the writer (the lowest
    surviving rank, which commits to the shared tiers) has said how its commit ended and every other
    rank that began has too; no longer than ``FIRST_MARK_S`` for a writer that says nothing; never past
    ``deadline_s`` from the failure. Then the marks are cleared for the next group. The outside world
    is injected."""

    def __init__(self, marks: SurvivorMarks, deadline_s: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, poll_s: float = 0.1):
        self._marks = marks
        self._deadline_s = deadline_s
        self._clock = clock
        self._sleep = sleep
        self._poll_s = poll_s

    def wait(self, writer: int) -> SurvivorOutcome:
        """``writer``: the lowest rank the failure did not take (the survivors that fail their collective
        each raise after their own commit: the first error must not end the wait for the writer's)."""
        started = self._clock()
        while True:
            waited = self._clock() - started
            marks = self._read()
            ended = all(m != COMMITTING for m in marks.values())
            if ended and writer in marks:
                reason = f"the writer (rank {writer}) and every survivor that began have ended"
                break
            if ended and waited >= FIRST_MARK_S:
                reason = f"no word from the writer (rank {writer}) within {FIRST_MARK_S:g} s"
                break
            if waited >= self._deadline_s:
                reason = f"the deadline (elastic.survivor_commit_s={self._deadline_s:g}) passed"
                break
            self._sleep(self._poll_s)
        try:
            self._marks.clear()
        except Exception:  # noqa: BLE001 - a stale mark costs the next failure at most its wait
            logger.warning("Cannot clear the survivors' marks", exc_info=True)
        outcome = SurvivorOutcome(marks, round(self._clock() - started, 2), reason)
        logger.info("Survivors' commits: %s after %.1f s (%s)", outcome.committed_steps or "none", outcome.waited_s,
                    reason)
        return outcome

    def _read(self) -> Dict[int, str]:
        try:
            return self._marks.read()
        except Exception:  # noqa: BLE001 - without the marks, wait no longer than for a first one
            logger.warning("Cannot read the survivors' marks", exc_info=True)
            return {}


def survivor_commit_s(cfg: Config) -> float:
    """The controller's longest wait for survivors' commits; 0 where there are none (sharded saves are collectives)."""
    return 0.0 if cfg.checkpoint.sharded else cfg.elastic.survivor_commit_s
