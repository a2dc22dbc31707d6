"""What DDP's gradient all-reduce sends between zones, and what GCE bills for it.

A ring all-reduce of ``gradient_bytes`` over N ranks sends ``2 (N - 1) / N * gradient_bytes``
over every link of the ring, each step. A link whose ends are in different zones of the region
is billed per GiB (the catalog's ``network.inter_zone_per_gib``, from GCP's VPC network pricing);
a link within a zone is free. NCCL may pick trees or several rings; the ring over the ranks in
order is the estimate, and the ranks' order follows the group's placement, not the zones.
"""

from __future__ import annotations

from typing import Sequence

GIB = 1 << 30


def cross_zone_gib_per_step(gradient_bytes: float, zone_of_rank: Sequence[str]) -> float:
    """GiB sent between zones by one ring all-reduce over ranks in ``zone_of_rank`` order."""
    ranks = len(zone_of_rank)
    if ranks < 2:
        return 0.0
    crossing = sum(1 for rank in range(ranks) if zone_of_rank[rank] != zone_of_rank[(rank + 1) % ranks])
    return crossing * 2 * (ranks - 1) / ranks * gradient_bytes / GIB


def worst_spread_gib_per_step(gradient_bytes: float, ranks: int, zones: int) -> float:
    """The same for ``ranks`` dealt over ``zones`` zones in turn (what ``spread`` placement tends to):
    with two zones or more, every link of the ring crosses a zone."""
    return cross_zone_gib_per_step(gradient_bytes, [str(rank % max(zones, 1)) for rank in range(ranks)])
