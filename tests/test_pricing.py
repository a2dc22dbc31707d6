"""The price catalog: the data matches the seed guide it cites, lookups fall back as documented, a user
file overrides it."""

import json

import pytest

from raytrain_spot.cost.pricing import PriceCatalog, PriceNotFound

# The seed guide's Section 1 figures (us-central1, per GPU-hour): name -> (Spot, on-demand, stated saving).
SEED_FIGURES = {
    "h200": (3.72, 12.00, 0.69),
    "h100": (2.25, 7.50, 0.70),
    "a3-mega": (2.38, 8.00, 0.70),
    "a100-80gb": (1.57, 3.67, 0.57),
    "a100-40gb": (1.15, 2.93, 0.61),
    "l4": (0.43, 0.70, 0.39),
    "t4": (0.20, 0.35, 0.43),
    "v100": (1.07, 2.48, 0.57),
}
SEED_A100_80GB_SPOT_BY_REGION = {"us-central1": 1.57, "us-west1": 1.65, "us-east4": 1.60, "europe-west4": 1.73,
                                 "asia-southeast1": 1.82}


@pytest.fixture(scope="module")
def catalog():
    return PriceCatalog.load()


def _figures(document):
    for section in ("accelerators", "machines"):
        for name, entry in document[section].items():
            for region, by_pricing in entry["prices"].items():
                for pricing, figure in by_pricing.items():
                    yield f"{section}.{name}.{region}.{pricing}", figure


def test_every_figure_has_a_date_and_a_known_source(catalog):
    sources = catalog.document["sources"]
    figures = list(_figures(catalog.document))
    assert len(figures) >= 20
    for where, figure in figures:
        assert figure["usd"] > 0, where
        assert figure["date"], where
        assert figure["source"] in sources, where
    for name, factor in catalog.document["regional_factors"].items():
        assert factor["source"] in sources, name


@pytest.mark.parametrize("gpu", sorted(SEED_FIGURES))
def test_gpu_prices_are_the_seed_figures(catalog, gpu):
    spot, on_demand, saving = SEED_FIGURES[gpu]
    assert catalog.gpu_price(gpu, "spot").usd_per_hour == spot
    assert catalog.gpu_price(gpu, "on_demand").usd_per_hour == on_demand
    # The guide's own saving percentages agree with its prices (to its rounding).
    assert 1 - spot / on_demand == pytest.approx(saving, abs=0.006)


@pytest.mark.parametrize("region", sorted(SEED_A100_80GB_SPOT_BY_REGION))
def test_regional_a100_figures_are_exact(catalog, region):
    quote = catalog.gpu_price("a100-80gb", "spot", region)
    assert quote.usd_per_hour == SEED_A100_80GB_SPOT_BY_REGION[region]
    assert not quote.estimated


def test_missing_regional_figures_scale_by_the_region_factor(catalog):
    factor = SEED_A100_80GB_SPOT_BY_REGION["europe-west4"] / SEED_A100_80GB_SPOT_BY_REGION["us-central1"]
    quote = catalog.gpu_price("l4", "spot", "europe-west4")
    assert quote.usd_per_hour == pytest.approx(0.43 * factor, rel=1e-3)
    assert quote.estimated and "europe-west4 factor" in quote.basis


def test_local_node_types_are_priced_as_a_real_machine_and_marked_notional(catalog):
    worker = catalog.node_price("local-cpu-spot", "spot")
    head = catalog.node_price("local-head", "on_demand")
    assert worker.notional and head.notional
    assert worker.usd_per_hour == catalog.machine_price("e2-standard-4", "spot").usd_per_hour
    assert head.usd_per_hour == catalog.machine_price("e2-standard-4", "on_demand").usd_per_hour
    assert worker.usd_per_hour < head.usd_per_hour


def test_a_user_file_overrides_and_extends_the_catalog(tmp_path):
    user = tmp_path / "prices.yaml"
    user.write_text(
        "accelerators:\n"
        "  nvidia-a100-80gb:\n"
        "    prices:\n"
        "      us-central1:\n"
        "        spot: {usd: 1.40, date: '2026-01-02', source: assumption}\n"
        "node_types:\n"
        "  gpu-spot:\n"
        "    machine: e2-standard-4\n"
        "    accelerator: l4\n")
    catalog = PriceCatalog.load(str(user))
    assert catalog.gpu_price("a100-80gb", "spot").usd_per_hour == 1.40
    assert catalog.gpu_price("a100-80gb", "on_demand").usd_per_hour == 3.67  # untouched
    node = catalog.node_price("gpu-spot", "spot", gpus=2)
    expected = 2 * 0.43 + catalog.machine_price("e2-standard-4", "spot").usd_per_hour
    assert node.usd_per_hour == pytest.approx(expected)
    assert not node.notional


def test_json_user_files_work_too(tmp_path):
    user = tmp_path / "prices.json"
    user.write_text(json.dumps({"regional_factors": {"us-south1": {"factor": 1.2, "source": "assumption"}}}))
    catalog = PriceCatalog.load(str(user))
    assert catalog.gpu_price("t4", "on_demand", "us-south1").usd_per_hour == pytest.approx(0.35 * 1.2)


@pytest.mark.parametrize("lookup, words", [
    (lambda c: c.gpu_price("b200", "spot"), "accelerators"),
    (lambda c: c.node_price("gpu-spot-unknown", "spot"), "node_types"),
    (lambda c: c.gpu_price("t4", "spot", "mars-north1"), "regional factor"),
    (lambda c: c.machine_price("n9-huge", "spot"), "machines"),
])
def test_missing_prices_say_what_to_add(catalog, lookup, words):
    with pytest.raises(PriceNotFound) as error:
        lookup(catalog)
    assert words in str(error.value) and "price file" in str(error.value)


def test_mtbi_comes_from_the_catalog(catalog):
    assert catalog.mtbi_hours("a100-80gb") == 6.0  # the midpoint of the seed's 4-8 h
    assert catalog.mtbi_hours("t4") == 12.0  # 8-16 h
    assert catalog.mtbi_hours("h100") == 4.0  # 2-6 h
