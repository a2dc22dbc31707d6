"""Which zone the next Spot VM goes to, and which zones to avoid after a failed launch.

Pure: no Ray, no HTTP, the clock is injected. The multi-zone node provider asks
``ZonePolicy.choose`` before every insert and tells ``ZonePolicy.record_failure`` about every
capacity or quota error; both return a decision carrying its reason, which the provider logs.

Failures are classified from the code and message GCE returns (``classify_failure``):

- a stockout (``ZONE_RESOURCE_POOL_EXHAUSTED[_WITH_DETAILS]``, "does not have enough
  resources", "resource availability", "stockout") blocks that zone;
- ``QUOTA_EXCEEDED`` blocks what the quota covers: GCE's message names the region ("... in
  region us-central1") or says "globally", and another zone under the same quota would fail
  the same way, so every configured zone in that scope is blocked. A quota message that names
  neither blocks just the zone it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Dict, Mapping, Optional, Tuple

STOCKOUT_CODES = frozenset({"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"})
QUOTA_CODES = frozenset({"QUOTA_EXCEEDED", "quotaExceeded"})
_STOCKOUT_WORDS = ("does not have enough resources", "resource availability", "stockout",
                   "resource_pool_exhausted")
_QUOTA_REGION = re.compile(r"in region ([a-z]+-[a-z]+\d+)")


class FailureKind(str, Enum):
    STOCKOUT = "stockout"
    QUOTA = "quota"


@dataclass(frozen=True)
class LaunchFailure:
    """A launch that failed for want of capacity or quota, as GCE described it."""

    kind: FailureKind
    code: str
    message: str
    quota_region: Optional[str] = None
    """Region the quota applies to, when the message names one."""
    quota_global: bool = False
    """True when the message says the quota is global (all regions)."""


def classify_failure(code: str, message: str) -> Optional[LaunchFailure]:
    """Capacity or quota failure from a GCE error code/reason and message; None for anything else."""
    lowered = message.lower()
    if code in QUOTA_CODES or ("quota" in lowered and "exceeded" in lowered):
        region = _QUOTA_REGION.search(message)
        return LaunchFailure(FailureKind.QUOTA, code or "QUOTA_EXCEEDED", message,
                             quota_region=region.group(1) if region else None,
                             quota_global="globally" in lowered)
    if code in STOCKOUT_CODES or any(word in lowered for word in _STOCKOUT_WORDS):
        return LaunchFailure(FailureKind.STOCKOUT, code or "ZONE_RESOURCE_POOL_EXHAUSTED", message)
    return None


class Placement(str, Enum):
    SPREAD = "spread"
    """Fewest of this node type first: a zone-wide preemption wave takes fewer workers at once."""
    PACK = "pack"
    """Most of this node type first: workers stay together (no inter-zone DDP traffic, which GCE bills)."""


@dataclass(frozen=True)
class ZonePolicyConfig:
    """Where Spot workers may go and how long a zone is avoided after a failed launch."""

    zones: Tuple[str, ...]
    """Zones to place workers in, in order of preference (ties go to the earlier zone)."""
    block_s: float = 600.0
    """Seconds a zone is skipped after a stockout or quota failure in it."""
    placement: Placement = Placement.PACK
    """How to pick among the open zones: pack or spread (see ``Placement``). Pack by default: spread
    sends every step's all-reduce across zones, which GCE bills per GiB (docs/cluster.md)."""

    def __post_init__(self):
        if not self.zones:
            raise ValueError("availability_zones: empty. Fix: list at least one zone, e.g. [us-central1-a]")
        if len(set(self.zones)) != len(self.zones):
            raise ValueError(f"availability_zones: {list(self.zones)} repeats a zone. Fix: list each zone once")
        if self.block_s < 0:
            raise ValueError(f"zone_block_s: {self.block_s} is negative. Fix: set zone_block_s to 0 or more seconds")


@dataclass(frozen=True)
class ZoneChoice:
    """Where the next VM goes, or None when every zone is blocked."""

    zone: Optional[str]
    reason: str


@dataclass(frozen=True)
class BlockDecision:
    """Zones blocked because of one failure, and until when (policy clock)."""

    zones: Tuple[str, ...]
    until: float
    reason: str


@dataclass
class ZonePolicy:
    """Zone choice and blocking for one node type. Not thread-safe: the provider holds its lock."""

    config: ZonePolicyConfig
    clock: Callable[[], float]
    _blocked_until: Dict[str, float] = field(default_factory=dict)

    def blocked(self) -> Dict[str, float]:
        """Zones blocked now, with the seconds left on each."""
        now = self.clock()
        return {zone: until - now for zone, until in self._blocked_until.items() if until > now}

    def choose(self, nodes_per_zone: Mapping[str, int]) -> ZoneChoice:
        """Pick a zone for one more VM, given how many of this node type each zone holds."""
        blocked = self.blocked()
        open_zones = [zone for zone in self.config.zones if zone not in blocked]
        counts = ", ".join(f"{zone}={nodes_per_zone.get(zone, 0)}" for zone in self.config.zones)
        if not open_zones:
            waits = ", ".join(f"{zone} for {left:.0f}s" for zone, left in sorted(blocked.items()))
            return ZoneChoice(None, f"every zone is blocked ({waits}); nodes per zone: {counts}")
        order = {zone: index for index, zone in enumerate(self.config.zones)}
        if self.config.placement is Placement.SPREAD:
            zone = min(open_zones, key=lambda z: (nodes_per_zone.get(z, 0), order[z]))
        else:
            zone = min(open_zones, key=lambda z: (-nodes_per_zone.get(z, 0), order[z]))
        skipped = f"; blocked: {', '.join(f'{z} ({left:.0f}s left)' for z, left in sorted(blocked.items()))}" \
            if blocked else ""
        return ZoneChoice(zone, f"{self.config.placement.value}: {zone} among open zones "
                                f"{', '.join(open_zones)}; nodes per zone: {counts}{skipped}")

    def record_failure(self, zone: str, failure: LaunchFailure) -> BlockDecision:
        """Block the zones ``failure`` rules out for ``config.block_s`` seconds."""
        if failure.kind is FailureKind.QUOTA and failure.quota_global:
            zones, scope = tuple(self.config.zones), "quota is global"
        elif failure.kind is FailureKind.QUOTA and failure.quota_region:
            zones = tuple(z for z in self.config.zones if _region(z) == failure.quota_region) or (zone,)
            scope = f"quota is regional ({failure.quota_region})"
        else:
            zones, scope = (zone,), f"{failure.kind.value} in {zone}"
        until = self.clock() + self.config.block_s
        for blocked_zone in zones:
            self._blocked_until[blocked_zone] = max(until, self._blocked_until.get(blocked_zone, 0.0))
        return BlockDecision(zones, until, f"{failure.code}: {scope}; blocking {', '.join(zones)} "
                                           f"for {self.config.block_s:.0f}s")


def _region(zone: str) -> str:
    return zone.rsplit("-", 1)[0]
