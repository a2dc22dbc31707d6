"""The planner against real Spot traces it was not fitted on (``bench/bench_plan_validation.py`` has the
method and runs every window): its recommendation, planned from the window before, against the
cheapest shape that met the deadline when the test window is replayed."""

import os

import pytest

from raytrain_spot.cost.spot_capacity import load_trace
from raytrain_spot.cost.pricing import PriceCatalog
from tests.conftest import REPO, load_bench

TRACES = os.path.join(REPO, "..", "shared", "traces")
pytestmark = pytest.mark.skipif(not os.path.isdir(TRACES), reason="shared/traces is not next to the repository")


def _pair(zone, fit_h, test_h, modes=("exp_prev",)):
    bench = load_bench("bench_plan_validation")
    args = bench.parse_args(["--replications", "100"])
    name = f"preemption__4-node__aws-08-03-2023__{zone}_v100_1.json"
    counts, tick_s = load_trace(os.path.join(TRACES, name))
    ticks = lambda h: round(h * 3600 / tick_s)  # noqa: E731
    return bench.validate_pair(name, counts, tick_s, max(counts), range(ticks(fit_h), ticks(fit_h + 72)),
                               range(ticks(test_h), ticks(test_h + 72)), args, PriceCatalog.load(), modes)


def _check(row, mode, target=0.05):
    entry = row[mode]
    assert entry["met_deadline_in_replay"], (row["cheapest_feasible"], entry)
    assert entry["gap"] <= target, (row["cheapest_feasible"], row["cheapest_cost_usd"], entry)


@pytest.mark.parametrize("zone, fit_h, test_h, cheapest", [
    ("us-west-2c", 0, 72, "4 spot"),                   # 91% Spot capacity: all Spot
    ("us-east-2a", 0, 72, "4 spot"),                   # 100%
    ("us-east-1f", 144, 216, "2 on-demand + 2 spot"),  # 66%, with outages: a hybrid is cheapest
])
def test_held_out_recommendation_is_within_5_percent_of_the_cheapest_on_time(zone, fit_h, test_h, cheapest):
    row = _pair(zone, fit_h, test_h)
    assert set(row["replay"]) == {"4 on-demand", "4 spot", "1 on-demand + 3 spot", "2 on-demand + 2 spot"}
    assert row["cheapest_feasible"] == cheapest
    _check(row, "exp_prev")
    # The planner's own cost for its pick is close to what the replay charged.
    assert row["exp_prev"]["predicted_cost_usd"] == pytest.approx(row["exp_prev"]["replayed_cost_usd"], rel=0.1)


@pytest.mark.xfail(strict=True, reason="the 5% target does not hold across a regime change: after a window with "
                   "1% Spot capacity the planner picks all on-demand ($238), the next window has 95% and all Spot "
                   "costs $103 (+130%); no fit on the past window can see it (docs/goodput-and-cost.md)")
def test_held_out_recommendation_after_a_regime_change():
    _check(_pair("us-east-2a", 216, 288, modes=("exp_prev",)), "exp_prev")
