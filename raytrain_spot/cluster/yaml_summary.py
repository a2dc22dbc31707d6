"""What a cluster YAML will run and cost: per node type its pricing, machine, GPUs, worker counts,
preemption notice and price, and the cluster's hourly cost at its minimum and maximum size.

Prices come from a lookup ``(item, pricing, region) -> USD/h or None`` where ``item`` is a
machine type (its host: vCPU and memory) or an accelerator type (one GPU, built in or attached)
and ``pricing`` is ``spot`` or ``on_demand``; the default reads the price catalog the ledger
uses (raytrain_spot/cost/), with ``--prices FILE`` merged over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from raytrain_spot.cluster.cluster_yaml import (NOTICE_KEY, ON_DEMAND, SPOT, advance_notice_s, is_gcp, is_multizone,
                                                notice_of, pricing_of)
from raytrain_spot.cluster.gcp.machines import gpus_of, short_name
from raytrain_spot.cluster.gpu_checks import gpu_stack_of
from raytrain_spot.cost.pricing import PriceCatalog, PriceNotFound
from raytrain_spot.preemption.drain_decision import GCE_SHUTDOWN_S

PriceLookup = Callable[[str, str, str], Optional[float]]


def catalog_lookup(catalog: PriceCatalog) -> PriceLookup:
    """Prices from the catalog the ledger uses: a machine type's host, or one GPU; None where it has none."""

    def lookup(item: str, pricing: str, region: str) -> Optional[float]:
        try:
            if item in catalog.document.get("machines", {}):
                return catalog.machine_price(item, pricing, region).usd_per_hour
            return catalog.gpu_price(item, pricing, region).usd_per_hour
        except PriceNotFound:
            return None

    return lookup


@dataclass(frozen=True)
class NodeTypeSummary:
    name: str
    role: str
    """``head`` or ``worker``."""
    pricing: str
    machine: str
    gpus: str
    min_workers: int
    max_workers: int
    price_per_hour: Optional[float]
    """One node of this type, USD/h; None when the lookup has no price."""
    notice_s: Optional[float] = None
    """Spot types: seconds from the metadata notice to the hard stop (30, or 30 + the advance
    notice); None for types GCE never preempts."""
    advance_notice_s: int = 0
    """The type's ``scheduling.preemptionNoticeDuration`` in seconds (0: none)."""
    replacement_room: int = 0
    """Nodes of this type the autoscaler may launch beyond ``min_workers`` (within the cluster's
    ``max_workers``): replacements it can start while preempted VMs still run out their notice."""
    gpu_stack: Optional[str] = None
    """GPU worker types: the image's driver branch and the torch build the set-up installs."""


@dataclass(frozen=True)
class ClusterSummary:
    cluster_name: str
    provider: str
    region: str
    zones: str
    node_types: List[NodeTypeSummary]

    def cost_per_hour(self, at: str) -> Tuple[float, List[str]]:
        """USD/h with every type at its ``min`` or ``max`` count, and the types left unpriced."""
        total, unpriced = 0.0, []
        for node_type in self.node_types:
            count = 1 if node_type.role == "head" else (
                node_type.min_workers if at == "min" else node_type.max_workers)
            if count == 0:
                continue
            if node_type.price_per_hour is None:
                unpriced.append(node_type.name)
            else:
                total += count * node_type.price_per_hour
        return total, unpriced


def summarize(config: dict, price_lookup: Optional[PriceLookup] = None) -> ClusterSummary:
    price_lookup = price_lookup or catalog_lookup(PriceCatalog.load())
    gcp = is_gcp(config)
    provider = config["provider"]
    region = provider.get("region", "local")
    rows = []
    head_name = config["head_node_type"]
    workers = {name: t for name, t in config["available_node_types"].items() if name != head_name}
    # Room the cluster's max_workers leaves above every worker type's min_workers.
    cluster_room = config.get("max_workers", 0) - sum(t.get("min_workers", 0) for t in workers.values())
    for name, node_type in config["available_node_types"].items():
        node_config = node_type.get("node_config", {})
        pricing = pricing_of(node_type, gcp)
        machine = short_name(str(node_config.get("machineType", "local"))) if gcp else "local"
        gpus = gpus_of(node_config) if gcp else None
        price = None if gcp else 0.0  # a local cluster costs nothing by the hour
        if gcp:
            price = price_lookup(machine, pricing, region)  # the host
            if price is not None and gpus is not None:
                gpu_price = price_lookup(gpus.accelerator_type, pricing, region)
                price = None if gpu_price is None else price + gpus.count * gpu_price
        advance, _ = advance_notice_s(node_config) if gcp else (0, None)
        type_room = node_type.get("max_workers", 0) - node_type.get("min_workers", 0)
        rows.append(NodeTypeSummary(
            name=name, role="head" if name == head_name else "worker", pricing=pricing,
            machine=machine, gpus=str(gpus) if gpus else "-", min_workers=node_type.get("min_workers", 0),
            max_workers=node_type.get("max_workers", 0), price_per_hour=price,
            notice_s=notice_of(node_type, gcp) if name != head_name else None, advance_notice_s=advance or 0,
            replacement_room=max(0, min(type_room, cluster_room)) if name != head_name else 0,
            gpu_stack=gpu_stack_of(config, node_type) if gcp and gpus and name != head_name else None))
    if is_multizone(config):
        zones = f"head {provider.get('availability_zone')}, Spot over {', '.join(provider.get('availability_zones', []))}"
    else:
        zones = provider.get("availability_zone", "-")
    provider_name = provider["module"].rsplit(".", 1)[-1] if provider["type"] == "external" else provider["type"]
    return ClusterSummary(config["cluster_name"], provider_name, region, zones, rows)


def format_summary(summary: ClusterSummary) -> str:
    header = ("node type", "role", "pricing", "machine", "GPUs", "workers", "notice", "$/h each")
    rows = [(t.name, t.role, t.pricing, t.machine, t.gpus,
             "1" if t.role == "head" else f"{t.min_workers}-{t.max_workers}",
             "-" if t.notice_s is None else f"{t.notice_s:.0f} s",
             "?" if t.price_per_hour is None else f"{t.price_per_hour:.2f}") for t in summary.node_types]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [f"cluster {summary.cluster_name}: provider {summary.provider}, region {summary.region}, "
             f"zones {summary.zones}"]
    lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + rows]
    spot = sum(t.max_workers for t in summary.node_types if t.role == "worker" and t.pricing == SPOT)
    on_demand = sum(t.max_workers for t in summary.node_types if t.role == "worker" and t.pricing == ON_DEMAND)
    lines.append(f"  mode: {'hybrid' if spot and on_demand else 'all Spot' if spot else 'all on-demand'} "
                 f"({on_demand} on-demand + {spot} Spot workers at most)")
    for t in summary.node_types:
        if t.notice_s is None:
            continue
        if not t.advance_notice_s:
            lines.append(f"  {t.name}: preemption notice {t.notice_s:.0f} s before the hard stop (GCE's default)")
            continue
        room = (f"the autoscaler can start up to {t.replacement_room} replacement(s) while preempted VMs run out "
                "their notice" if t.replacement_room else
                "no room to start a replacement before a preempted VM stops (raise this type's max_workers and "
                "the top-level max_workers above min_workers)")
        lines.append(f"  {t.name}: preemption notice {t.notice_s:.0f} s before the hard stop ({NOTICE_KEY} "
                     f"{t.advance_notice_s} s, preview, + GCE's {GCE_SHUTDOWN_S:.0f} s); {room}")
    for t in summary.node_types:
        if t.gpu_stack:
            lines.append(f"  {t.name}: {t.gpu_stack}")
    for at in ("min", "max"):
        total, unpriced = summary.cost_per_hour(at)
        note = f" (not counting {', '.join(unpriced)}: no price)" if unpriced else ""
        lines.append(f"  estimated $/h with every type at {at}_workers: {total:.2f}{note}")
    return "\n".join(lines)
