"""Ray Train 2.60's own answers to Spot, as strategies of this project's loop (raytrain_spot/loop/strategy.py).

Both run plain Ray Train around the loop (Ray's elastic and failure policies and timings, no warm
standbys, no capacity watch, periodic checkpoints), so a benchmark compares what hears of a
preemption and what is done about it, with steps and checkpoints that cost the same:

* ``plain-ray-train``: the loop hears of no notice and never regrows.
* ``ray-preemption-api``: Ray 2.60's documented recipe: every rank calls
  ``ray.train.get_preemption_info()`` after every step (a barrier); at the first notice every rank
  joins a just-in-time checkpoint, then trains on until the node dies and Ray restarts the group.

    python bench/baselines.py plain-ray-train +experiment=vlm ...   # the main command, as this baseline
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Collection, List, Optional, Sequence, Set

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raytrain_spot.elastic.signals import ExtraCapacity  # noqa: E402
from raytrain_spot.loop.agreement import Proposal, StepAgreement  # noqa: E402
from raytrain_spot.loop.decision import JIT, PERIODIC, Continue, Decision, ranks_on  # noqa: E402
from raytrain_spot.loop.strategy import Strategy  # noqa: E402


class QuietCluster:
    """Plain Ray Train's loop hears nothing: no notice, no capacity."""

    def __init__(self, capacity=None):
        pass

    def leaving_nodes(self, step: int) -> Set[str]:
        return set()

    def extra_capacity(self, step: int) -> Optional[ExtraCapacity]:
        return None

    def usable_workers(self, step: int, leaving: Collection[str]) -> Optional[int]:
        return None

    def drain_deadline_s(self, nodes: Collection[str]) -> Optional[float]:
        return None


class RayPreemptionInfo(QuietCluster):
    """Notices from ``ray.train.get_preemption_info()``, which every rank calls after every step."""

    def leaving_nodes(self, step: int) -> Set[str]:
        import ray.train

        info = ray.train.get_preemption_info()
        return set(info.preempted_node_ids) if info is not None else set()


class PeriodicOnly:
    """Train on through everything, checkpointing when the cadence says; at the first notice, if
    ``checkpoint_at_notice``, one just-in-time checkpoint first (Ray's recipe), then train on."""

    def __init__(self, signals, node_ids: Sequence[str], checkpoint_at_notice: bool):
        self._signals = signals
        self._node_ids = list(node_ids)
        self._checkpoint_at_notice = checkpoint_at_notice
        self._checkpointed_at_notice = False

    def leaving_ranks(self, step: int) -> List[int]:
        return ranks_on(self._node_ids, self._signals.leaving_nodes(step))

    def propose(self, leaving_ranks, step, step_s, commit_s, loop, world_size) -> Proposal:
        return Proposal()

    def decide(self, agreed: StepAgreement, step: int, world_size: int) -> Decision:
        if agreed.leaving_ranks and self._checkpoint_at_notice and not self._checkpointed_at_notice:
            self._checkpointed_at_notice = True
            return Continue(JIT, reason="Ray's recipe: one checkpoint at the notice, then train until the node dies")
        return Continue(PERIODIC if agreed.save_due else None)


def quiet_policy(cfg, signals, node_ids, emit: Callable[..., None], warmup) -> PeriodicOnly:
    return PeriodicOnly(signals, node_ids, checkpoint_at_notice=False)


def preemption_api_policy(cfg, signals, node_ids, emit: Callable[..., None], warmup) -> PeriodicOnly:
    return PeriodicOnly(signals, node_ids, checkpoint_at_notice=True)


BASELINES = {
    "plain-ray-train": Strategy("plain-ray-train", spot_aware=False, signals=QuietCluster, group_policy=quiet_policy),
    "ray-preemption-api": Strategy("ray-preemption-api", spot_aware=False, signals=RayPreemptionInfo,
                                   group_policy=preemption_api_policy),
}


if __name__ == "__main__":
    # Ray is imported only once the run has started its cluster (it reads its node address at import);
    # the workers get this module's classes by value, as cloudpickle sends those of ``__main__``.
    name = sys.argv.pop(1)
    from raytrain_spot.run import command

    command(BASELINES[name])
