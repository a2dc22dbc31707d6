"""DDP's all-reduce between zones: the bytes a ring sends across zones and GCE's price for them."""

import pytest

from raytrain_spot.cost.inter_zone import GIB, cross_zone_gib_per_step, worst_spread_gib_per_step
from raytrain_spot.cost.pricing import PriceCatalog


def test_a_ring_in_one_zone_sends_nothing_across_zones():
    assert cross_zone_gib_per_step(GIB, ["a"] * 8) == 0.0


def test_each_ring_link_between_zones_carries_two_n_minus_one_over_n_of_the_gradients():
    # 4 ranks, zones a a b b: links a->a, a->b, b->b, b->a; two cross, each 2*3/4 GiB.
    assert cross_zone_gib_per_step(GIB, ["a", "a", "b", "b"]) == pytest.approx(3.0)
    assert worst_spread_gib_per_step(GIB, ranks=8, zones=3) == pytest.approx(14.0)
    assert worst_spread_gib_per_step(GIB, ranks=1, zones=3) == 0.0


def test_the_catalog_prices_inter_zone_traffic_and_names_its_source(tmp_path):
    catalog = PriceCatalog.load()
    assert catalog.inter_zone_usd_per_gib() == 0.01
    source = catalog.document["network"]["inter_zone_per_gib"]["source"]
    assert catalog.document["sources"][source]["url"] == "https://cloud.google.com/vpc/network-pricing"
    override = tmp_path / "prices.yaml"
    override.write_text("network: {inter_zone_per_gib: {usd: 0.02}}\n")
    assert PriceCatalog.load(str(override)).inter_zone_usd_per_gib() == 0.02
