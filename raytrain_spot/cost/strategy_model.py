"""The job and the cluster the planner simulates, and the closed-form pieces of its model.

A job's figures (steps, step time, checkpoint, restore and recovery costs) under raytrain-spot's
handling of preemptions or plain Ray Train's, the cluster shape (k on-demand + n Spot nodes) and its
hourly price, the share of notices whose just-in-time checkpoint commits in time, and the checkpoint
interval (Young/Daly). ``docs/goodput-and-cost.md`` has the details.

The defaults describe raytrain-spot (notice-time checkpoints, its checkpoint advisor, elastic down
to one node, its measured restart); ``plain_ray_train`` gives the row beside it: Ray Train 2.60
without notice handling, periodic checkpoints only, its measured restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from raytrain_spot.checkpoint.advisor import daly_interval
from raytrain_spot.cost.pricing import PriceCatalog

HOUR = 3600.0
PRODUCT, PLAIN = "raytrain-spot", "plain-ray-train"

# What raytrain-spot does and what was measured for it (docs/benchmarks.md); the CLI's defaults.
PRODUCT_CHECKPOINT_S = 1.0
"""Stall of an async snapshot (measured 0.19 s for 1 GB on 2 CPU cores; 0.08 s for 4 GiB on an H100 host)."""
PRODUCT_JIT_S = 10.0
"""Notice to a committed just-in-time checkpoint on the head tier, from a step boundary (assumed:
under 1 s to see the notice, then the snapshot and its write to the head; 6.4 s for 1 GB measured)."""
PRODUCT_RECOVERY_S = 6.0
"""Handoff at the notice to training at the new size, less the restore: median 6.1 s measured."""
PRODUCT_KILL_RECOVERY_S = 15.0
"""A loss without a usable notice: 4 s failure settle + ~3 s dead-node detection + a restart (estimate)."""
PRODUCT_INTERVAL_BOUNDS_S = (10.0, 1800.0)
"""The checkpoint advisor clamps Young/Daly into checkpoint.min_interval_s..max_interval_s."""
GCE_NOTICE_S = 30.0
DRAIN_MARGIN_S = 5.0
"""The watcher drains the node this long before the hard stop (``--margin-s``)."""
PLAIN_RECOVERY_S = 76.0
"""Plain elastic Ray Train 2.60, kill to training again: median 75.6 s in the GCE-like benchmark
(it retries the old size, then waits out RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S); 27-47 s elsewhere."""
PLAIN_REGROW_S = 32.0
"""Plain Ray Train's regrow, a full restart (20-44 s measured)."""


# What is simulated --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """The training job, measured at full cluster size."""

    steps: int
    """Optimizer steps to finish."""
    step_time_s: float
    """Wall time of one step on the full cluster."""
    checkpoint_s: float = 0.0
    """Time the training loop stalls per checkpoint (C)."""
    restore_s: float = 0.0
    """Time to load the checkpoint into a re-formed group."""
    recovery_s: float = 0.0
    """A planned restart (a handoff at a notice, a regrow): to a re-formed group, excluding the restore."""
    notice_s: float = GCE_NOTICE_S
    """Warning before a Spot VM stops (GCE: 30 s; 120 s with ``scheduling.preemptionNoticeDuration``)."""
    jit_checkpoint: bool = False
    """Save on the notice: no progress is lost when the save commits before the drain deadline."""
    min_nodes: int = 1
    """Fewest nodes the job trains on; below it, it waits for capacity."""
    jit_s: Optional[float] = None
    """Notice to a committed just-in-time checkpoint when the loop is at a step boundary (seeing the
    notice, the snapshot, the write); None: ``checkpoint_s``."""
    margin_s: float = DRAIN_MARGIN_S
    """The drain deadline comes this long before the hard stop; the save must commit by then."""
    kill_recovery_s: Optional[float] = None
    """A restart after a loss without a usable notice (no notice handling, or the save did not make
    it): to a re-formed group, excluding the restore; None: ``recovery_s``."""
    regrow_by_handoff: bool = True
    """A returning node joins after a checkpoint (raytrain-spot); False: the group is restarted from
    the last periodic checkpoint, as Ray Train's own elastic policy does."""
    interval_bounds_s: Optional[Tuple[float, float]] = None
    """The checkpoint advisor's clamp on Young/Daly (raytrain-spot: 10-1800 s); None: the planner's
    optimum (Daly on the losses that lose work)."""

    def __post_init__(self):
        if self.steps <= 0 or self.step_time_s <= 0:
            raise ValueError("steps and step_time_s must be > 0")
        if min(self.checkpoint_s, self.restore_s, self.recovery_s, self.notice_s, self.margin_s,
               self.jit_save_s, self.kill_restart_s) < 0:
            raise ValueError("checkpoint_s, restore_s, recovery_s, notice_s, margin_s, jit_s and kill_recovery_s "
                             "must be >= 0")
        if self.min_nodes < 1:
            raise ValueError("min_nodes must be >= 1")

    @property
    def work_s(self) -> float:
        return self.steps * self.step_time_s

    @property
    def jit_save_s(self) -> float:
        return self.checkpoint_s if self.jit_s is None else self.jit_s

    @property
    def kill_restart_s(self) -> float:
        return self.recovery_s if self.kill_recovery_s is None else self.kill_recovery_s


def plain_ray_train(job: Job, recovery_s: float = PLAIN_RECOVERY_S, regrow_s: float = PLAIN_REGROW_S,
                    checkpoint_s: Optional[float] = None) -> Job:
    """The same job on plain Ray Train 2.60: no notice handling (a loss is a kill), periodic checkpoints
    at the planner's Daly interval, a full restart from the last one on every loss and every regrow.
    Its elastic ScalingConfig keeps the same minimum."""
    return replace(job, jit_checkpoint=False, jit_s=None, recovery_s=regrow_s, kill_recovery_s=recovery_s,
                   regrow_by_handoff=False, interval_bounds_s=None,
                   checkpoint_s=job.checkpoint_s if checkpoint_s is None else checkpoint_s)


@dataclass(frozen=True)
class ClusterShape:
    """How many nodes of each pricing model, and what is on a node."""

    accelerator: str
    """GPU type, a catalog name or alias (``a100-80gb``)."""
    on_demand_nodes: int
    """Nodes that are never preempted."""
    spot_nodes: int
    """Spot nodes (preemptible, replaced when capacity returns)."""
    gpus_per_node: int = 1
    """GPUs per node."""
    machine: Optional[str] = None
    """Host machine type to add to the GPU price; None prices GPUs only (as the seed guide does)."""

    @property
    def nodes(self) -> int:
        return self.on_demand_nodes + self.spot_nodes

    @property
    def name(self) -> str:
        if not self.spot_nodes:
            return f"{self.on_demand_nodes} on-demand"
        if not self.on_demand_nodes:
            return f"{self.spot_nodes} spot"
        return f"{self.on_demand_nodes} on-demand + {self.spot_nodes} spot"

    def node_usd_per_hour(self, catalog: PriceCatalog, pricing: str, region: str) -> float:
        price = catalog.gpu_price(self.accelerator, pricing, region).usd_per_hour * self.gpus_per_node
        if self.machine:
            price += catalog.machine_price(self.machine, pricing, region).usd_per_hour
        return price

    def usd_per_hour(self, catalog: PriceCatalog, region: str) -> float:
        """Hourly price with every node alive."""
        return (self.on_demand_nodes * self.node_usd_per_hour(catalog, "on_demand", region)
                + self.spot_nodes * self.node_usd_per_hour(catalog, "spot", region))


def system_mtbi_s(mtbi_s: float, spot_nodes: int) -> float:
    """Mean time between losses in a group of ``spot_nodes`` independent Spot VMs."""
    return mtbi_s / spot_nodes if spot_nodes else math.inf


def jit_complete_fraction(job: Job, group_fraction: float = 1.0) -> float:
    """Share of notices whose just-in-time checkpoint commits by the drain deadline.

    The notice lands at a uniform point of a step; the loop finishes that step (at ``group_fraction``
    of the cluster a step takes ``step_time_s / group_fraction``), then the save takes ``jit_s``; the
    drain deadline is ``notice_s - margin_s`` after the notice.
    """
    if not job.jit_checkpoint:
        return 0.0
    slack = job.notice_s - job.margin_s - job.jit_save_s
    if slack < 0:
        return 0.0
    return min(1.0, slack * max(group_fraction, 1e-12) / job.step_time_s)


def jit_covers_preemptions(job: Job) -> bool:
    """Every notice of the full group gets a committed just-in-time checkpoint."""
    return jit_complete_fraction(job) >= 1.0


def interval_for(job: Job, mtbi_s: float, spot_nodes: int) -> float:
    """Training time between periodic checkpoints.

    With ``interval_bounds_s`` (raytrain-spot), what its checkpoint advisor does: Daly on every
    interruption of the group, clamped into the bounds. Otherwise the planner's optimum: Daly on the
    losses that lose work (those without a committed just-in-time checkpoint); none when there are none.
    """
    system = system_mtbi_s(mtbi_s, spot_nodes)
    if math.isinf(system):
        return math.inf
    if job.interval_bounds_s is not None:
        low, high = job.interval_bounds_s
        return min(max(daly_interval(job.checkpoint_s, system) if job.checkpoint_s > 0 else low, low), high)
    uncovered = 1.0 - jit_complete_fraction(job)
    if uncovered <= 0:
        return math.inf
    if job.checkpoint_s == 0:
        return job.step_time_s  # free checkpoints: every step
    return daly_interval(job.checkpoint_s, system / uncovered)
