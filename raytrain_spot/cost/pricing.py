"""Hourly prices of GCP GPUs and machines, on-demand and Spot, read from a catalog that is data.

The catalog (``raytrain_spot/cost/prices_gcp_2025.json``) holds every figure with its date and
source; a user file (JSON or YAML, same layout) is merged over it to correct or extend it. A
region without a figure of its own is priced from the base region times the region's factor,
and the quote says so (``estimated``). Node types of a Ray cluster map to a machine and/or an
accelerator in the catalog's ``node_types`` section; ``docs/goodput-and-cost.md`` describes the
layout.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Dict, List, Optional

PRICING_MODELS = ("spot", "on_demand")
CATALOG_RESOURCE = "prices_gcp_2025.json"


class PriceNotFound(KeyError):
    """The catalog has no figure for what was asked; the message says what to add."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Quote:
    """An hourly price and where it came from."""

    usd_per_hour: float
    """Price of one unit (a GPU, a machine or a whole node) for one hour."""
    basis: str
    """How the price was made, e.g. ``8 x nvidia-a100-80gb spot us-central1 @1.57 (seed-2025-11, 2025-11-16)``."""
    estimated: bool = False
    """True when a regional factor stood in for a missing regional figure."""
    notional: bool = False
    """True for local stand-ins (the embedded cluster's virtual nodes): the money is not real."""

    def __add__(self, other: "Quote") -> "Quote":
        return Quote(self.usd_per_hour + other.usd_per_hour, f"{self.basis} + {other.basis}",
                     self.estimated or other.estimated, self.notional or other.notional)

    def times(self, count: float) -> "Quote":
        return Quote(self.usd_per_hour * count, f"{count:g} x {self.basis}", self.estimated, self.notional)


def _merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_document(path: str) -> Dict[str, Any]:
    with open(os.path.expanduser(path)) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(f) or {}
        return json.load(f)


class PriceCatalog:
    """Lookups over a catalog document. Build with :meth:`load` (packaged catalog + user file)."""

    def __init__(self, document: Dict[str, Any]):
        self.document = document
        self.default_region: str = document.get("default_region", "us-central1")
        self._aliases = {name: name for name in document.get("accelerators", {})}
        for name, entry in document.get("accelerators", {}).items():
            for alias in entry.get("aliases", []):
                self._aliases[alias] = name

    @classmethod
    def load(cls, user_file: Optional[str] = None) -> "PriceCatalog":
        """The packaged catalog, with ``user_file`` (JSON or YAML, same layout) merged over it."""
        document = json.loads(resources.files("raytrain_spot.cost").joinpath(CATALOG_RESOURCE).read_text())
        if user_file:
            document = _merge(document, _read_document(user_file))
        return cls(document)

    @property
    def regions(self) -> List[str]:
        return list(self.document.get("regional_factors", {}))

    def accelerator_name(self, name: str) -> str:
        """The catalog's name for an accelerator, given it or one of its aliases (``a100-80gb``)."""
        try:
            return self._aliases[name.lower()]
        except KeyError:
            raise PriceNotFound(f"accelerator {name!r} is not in the price catalog (known: "
                                f"{', '.join(sorted(self._aliases))}); add it under 'accelerators' "
                                f"in a user price file") from None

    def gpu_price(self, accelerator: str, pricing: str, region: Optional[str] = None) -> Quote:
        """Price of one GPU for one hour."""
        name = self.accelerator_name(accelerator)
        return self._price("accelerators", name, pricing, region or self.default_region)

    def machine_price(self, machine: str, pricing: str, region: Optional[str] = None) -> Quote:
        """Price of one VM's vCPUs and memory (no accelerators) for one hour."""
        if machine not in self.document.get("machines", {}):
            raise PriceNotFound(f"machine type {machine!r} is not in the price catalog; add it under "
                                f"'machines' in a user price file")
        return self._price("machines", machine, pricing, region or self.default_region)

    def inter_zone_usd_per_gib(self) -> float:
        """What GCE bills per GiB a VM sends to a VM in another zone of its region."""
        try:
            return float(self.document["network"]["inter_zone_per_gib"]["usd"])
        except KeyError:
            raise PriceNotFound("network.inter_zone_per_gib is not in the price catalog; add it (usd per GiB) "
                                "in a user price file") from None

    def node_price(self, node_type: str, pricing: str, gpus: float = 0, region: Optional[str] = None) -> Quote:
        """Price of one node of a Ray node type for one hour: its machine plus ``gpus`` accelerators.

        The node type's entry may fix ``gpus`` itself; otherwise the count the node reported is used.
        """
        entry = self.document.get("node_types", {}).get(node_type)
        if entry is None:
            raise PriceNotFound(f"node type {node_type!r} is not in the price catalog; map it to a machine "
                                f"and/or an accelerator under 'node_types' in a user price file")
        parts: List[Quote] = []
        if entry.get("machine"):
            parts.append(self.machine_price(entry["machine"], pricing, region))
        if entry.get("accelerator"):
            count = entry.get("gpus", gpus)
            parts.append(self.gpu_price(entry["accelerator"], pricing, region).times(count))
        if not parts:
            raise PriceNotFound(f"node type {node_type!r} names neither a machine nor an accelerator")
        quote = parts[0]
        for part in parts[1:]:
            quote = quote + part
        if entry.get("notional"):
            quote = Quote(quote.usd_per_hour, f"notional: {quote.basis}", quote.estimated, True)
        return quote

    def mtbi_hours(self, accelerator: str) -> float:
        """Mean time between interruptions of one Spot VM with this accelerator, in hours."""
        entry = self.document["accelerators"][self.accelerator_name(accelerator)]
        if "mtbi_hours" not in entry:
            raise PriceNotFound(f"accelerator {accelerator!r} has no 'mtbi_hours' in the catalog; add one "
                                f"or pass the MTBI explicitly")
        return float(entry["mtbi_hours"]["hours"])

    def _price(self, section: str, name: str, pricing: str, region: str) -> Quote:
        if pricing not in PRICING_MODELS:
            raise ValueError(f"pricing must be one of {PRICING_MODELS}, got {pricing!r}")
        by_region = self.document[section][name].get("prices", {})
        figure = by_region.get(region, {}).get(pricing)
        if figure is not None:
            return Quote(float(figure["usd"]), self._describe(name, pricing, region, figure))
        base = by_region.get(self.default_region, {}).get(pricing)
        if base is None:
            raise PriceNotFound(f"no {pricing} price for {name!r} in {region} nor in the base region "
                                f"{self.default_region}; add one under '{section}' in a user price file")
        factor_entry = self.document.get("regional_factors", {}).get(region)
        if factor_entry is None:
            raise PriceNotFound(f"no {pricing} price for {name!r} in {region} and no regional factor for "
                                f"{region}; add either to a user price file")
        factor = float(factor_entry["factor"])
        basis = f"{self._describe(name, pricing, self.default_region, base)} x {factor:g} ({region} factor)"
        return Quote(float(base["usd"]) * factor, basis, estimated=True)

    @staticmethod
    def _describe(name: str, pricing: str, region: str, figure: Dict[str, Any]) -> str:
        return f"{name} {pricing} {region} @{float(figure['usd']):g} ({figure['source']}, {figure['date']})"
