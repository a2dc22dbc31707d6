"""The planner: the seed guide's worked examples, convergence to the closed-form expectation of an
exponential preemption process, Young/Daly against a numerical optimum, deadlines, traces, the CLI."""

import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys

import pytest

from raytrain_spot.checkpoint.advisor import daly_interval, young_interval
from raytrain_spot.cost.ledger import write_ledger
from raytrain_spot.cost.plan import build_jobs, fixed_goodput_estimate, parse_args, plan, resolve_figures
from raytrain_spot.cost.pricing import PriceCatalog
from raytrain_spot.cost.run_facts import measure_run
from raytrain_spot.cost.spot_capacity import ExponentialLosses, Preemptions, TraceReplay
from raytrain_spot.cost.strategy_model import (PLAIN, PLAIN_RECOVERY_S, PRODUCT, PRODUCT_INTERVAL_BOUNDS_S,
                                               ClusterShape, Job, interval_for, jit_complete_fraction,
                                               plain_ray_train)
from raytrain_spot.cost.strategy_sim import simulate_run

HOUR = 3600.0
TRACES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "traces")


@pytest.fixture(scope="module")
def catalog():
    return PriceCatalog.load()


def expected_wall_s(work_s, interval_s, checkpoint_s, restart_s, rate):
    """Closed form for exponential failures at ``rate`` (Daly 2006): a segment of w seconds that must run
    without failure, each failure followed by a restart that itself starts over on a failure, takes
    (exp(rate w) - 1) exp(rate R) / rate on average. The job is k checkpointed segments and a last
    one without a checkpoint."""
    segment = lambda w: (math.exp(rate * w) - 1) * math.exp(rate * restart_s) / rate  # noqa: E731
    k = math.ceil(work_s / interval_s - 1e-9) - 1
    return k * segment(interval_s + checkpoint_s) + segment(work_s - k * interval_s)


def simulate_many(job, shape, interval_s, mtbi_s, replacement_s, runs, seed=0):
    outcomes = []
    for run in range(runs):
        rng = random.Random(f"{seed}/{run}")
        outcomes.append(simulate_run(job, shape, interval_s, ExponentialLosses(mtbi_s, replacement_s, rng), rng,
                                     horizon_s=50 * job.work_s))
    return outcomes


def assert_mean_matches(values, expected, sigmas=4.0):
    standard_error = statistics.stdev(values) / math.sqrt(len(values))
    assert abs(statistics.fmean(values) - expected) < sigmas * standard_error, (statistics.fmean(values), expected)


# The seed guide's worked examples --------------------------------------------------------------------

A100_8 = ClusterShape("a100-80gb", on_demand_nodes=0, spot_nodes=8)
A100_8_ON_DEMAND = ClusterShape("a100-80gb", on_demand_nodes=8, spot_nodes=0)
A100_HYBRID = ClusterShape("a100-80gb", on_demand_nodes=1, spot_nodes=7)


def test_seed_on_demand_8xa100_for_100h_costs_2936(catalog):
    job = Job(steps=100_000, step_time_s=3.6)  # 100 h of work
    result = plan(job, [A100_8_ON_DEMAND], ["us-central1"], catalog, Preemptions(), replications=1)
    estimate = result.estimates[0]
    assert estimate.wall_h == pytest.approx(100.0)
    assert round(estimate.cost_usd) == 2936
    assert estimate.checkpoint_interval_s is None and estimate.preemptions == 0


def test_seed_spot_with_10_percent_overhead_costs_1382(catalog):
    wall_h, cost, _ = fixed_goodput_estimate(A100_8, catalog, "us-central1", work_h=100, steps_per_hour=100,
                                             goodput=1 / 1.1)
    assert wall_h == pytest.approx(110.0)
    assert round(cost) == 1382
    assert round(2936 - cost) == 1554  # the guide's "53% ($1,554)"


def test_seed_overheads_elsewhere_in_the_guide(catalog):
    # "115 hours (15% preemption overhead) = $1,444"
    assert round(fixed_goodput_estimate(A100_8, catalog, "us-central1", 100, 100, 1 / 1.15)[1]) == 1444
    # Hybrid 1 on-demand + 7 Spot is $14.66/h: the table's $1,466 is 100 h, the text's $1,613 is 110 h.
    assert A100_HYBRID.usd_per_hour(catalog, "us-central1") == pytest.approx(14.66)
    assert round(fixed_goodput_estimate(A100_HYBRID, catalog, "us-central1", 100, 100, 1.0)[1]) == 1466
    assert round(fixed_goodput_estimate(A100_HYBRID, catalog, "us-central1", 100, 100, 1 / 1.1)[1]) == 1613


def test_seed_cost_per_step_from_calculate_cost_efficiency(catalog):
    """The guide's inputs: 100 steps/h, goodput 0.99 / 0.87 / 0.94 for on-demand / Spot / hybrid."""
    per_step = {name: fixed_goodput_estimate(shape, catalog, "us-central1", 100, 100, goodput)[2]
                for name, shape, goodput in (("on_demand", A100_8_ON_DEMAND, 0.99), ("spot_optimal", A100_8, 0.87),
                                             ("hybrid", A100_HYBRID, 0.94))}
    assert round(per_step["spot_optimal"], 2) == 0.14 and round(per_step["spot_optimal"] * 1000) == 144
    assert round(per_step["hybrid"], 2) == 0.16 and round(per_step["hybrid"] * 1000) == 156
    # The guide prints $0.37 for on-demand, but its own function gives 29.36 / 99 = $0.30 (see the docs).
    assert round(per_step["on_demand"], 2) == 0.30


def test_simulated_spot_run_with_10_percent_overhead_costs_what_the_seed_says(catalog):
    """Pick the MTBI at which the closed form gives 10% overhead; the simulation must then cost ~$1,382."""
    work_s, checkpoint_s, restart_s = 100 * HOUR, 60.0, 240.0

    def overhead(mtbi_per_node):
        system = mtbi_per_node / 8
        interval = daly_interval(checkpoint_s, system)
        return expected_wall_s(work_s, interval, checkpoint_s, restart_s, 1 / system) / work_s

    low, high = 10 * HOUR, 10_000 * HOUR
    for _ in range(60):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if overhead(middle) > 1.1 else (low, middle)
    mtbi = math.sqrt(low * high)
    job = Job(steps=100_000, step_time_s=3.6, checkpoint_s=checkpoint_s, restore_s=60.0, recovery_s=180.0)
    interval = daly_interval(checkpoint_s, mtbi / 8)
    outcomes = simulate_many(job, A100_8, interval, mtbi, replacement_s=0.0, runs=300)
    price = catalog.gpu_price("a100-80gb", "spot").usd_per_hour
    costs = [price * o.spot_node_s / HOUR for o in outcomes]
    assert_mean_matches(costs, 1.57 * 8 * 110)
    assert round(statistics.fmean(costs), -1) == pytest.approx(1382, abs=15)


# Convergence to the closed form -------------------------------------------------------------------------

def test_simulation_converges_to_the_exponential_closed_form():
    # A restart long enough against the MTBI that losses during it matter (they start it over).
    job = Job(steps=10_000, step_time_s=3.6, checkpoint_s=120.0, restore_s=300.0, recovery_s=1500.0)
    shape = ClusterShape("t4", on_demand_nodes=0, spot_nodes=4)
    mtbi, interval = 8 * HOUR, 1800.0
    outcomes = simulate_many(job, shape, interval, mtbi, replacement_s=0.0, runs=1500)
    expected = expected_wall_s(job.work_s, interval, job.checkpoint_s, job.recovery_s + job.restore_s, 4 / mtbi)
    assert expected > 1.2 * job.work_s  # a regime where preemptions matter
    assert_mean_matches([o.wall_s for o in outcomes], expected)
    # Replacement is immediate, so all four Spot VMs are billed the whole time.
    assert all(o.spot_node_s == pytest.approx(4 * o.wall_s) for o in outcomes)
    assert_mean_matches([o.preemptions for o in outcomes], statistics.fmean(o.wall_s for o in outcomes) * 4 / mtbi)


def test_a_just_in_time_checkpoint_loses_no_work():
    job = Job(steps=10_000, step_time_s=3.6, checkpoint_s=20.0, restore_s=60.0, recovery_s=240.0)
    shape = ClusterShape("t4", 0, 4)
    rate = 4 / (8 * HOUR)
    jit = simulate_many(dataclasses.replace(job, jit_checkpoint=True), shape, math.inf, 8 * HOUR, 0.0, runs=600)
    # Nothing is lost, so failures only add time: they come at ``rate`` during the work, and each
    # costs the save plus a restart (C + R) that starts over (R) whenever another VM is lost.
    restart = job.recovery_s + job.restore_s
    first_try = job.checkpoint_s + restart
    per_failure = (1 - math.exp(-rate * first_try)) * math.exp(rate * restart) / rate
    assert_mean_matches([o.wall_s for o in jit], job.work_s * (1 + rate * per_failure))
    plain = simulate_many(job, shape, daly_interval(job.checkpoint_s, 2 * HOUR), 8 * HOUR, 0.0, runs=300)
    assert statistics.fmean(o.wall_s for o in jit) < statistics.fmean(o.wall_s for o in plain)


# Young / Daly ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint_s, mtbi_s", [(120, 14400), (600, 3600), (1800, 3600), (3000, 3600)])
def test_daly_interval_is_near_the_numerical_optimum(checkpoint_s, mtbi_s):
    rate = 1 / mtbi_s
    waste = lambda tau: (math.exp(rate * (tau + checkpoint_s)) - 1) / tau  # noqa: E731  (time per unit of work)
    optimum = min((mtbi_s * i / 20_000 for i in range(1, 60_000)), key=waste)
    daly, young = daly_interval(checkpoint_s, mtbi_s), young_interval(checkpoint_s, mtbi_s)
    assert daly == pytest.approx(optimum, rel=0.02)
    assert waste(daly) <= waste(young) * (1 + 1e-9)
    if checkpoint_s / mtbi_s >= 0.5:
        assert waste(young) > 1.04 * waste(daly)  # where Daly's correction matters


def test_young_is_sqrt_2cm_and_daly_caps_at_m():
    assert young_interval(120, 14400) == pytest.approx(math.sqrt(2 * 120 * 14400))
    assert daly_interval(7200, 3600) == 3600


def test_the_seed_interval_formula_depends_on_its_units():
    """sqrt(2 * MTBI * save / load) is not a duration: the seed's example in three unit systems."""
    seed = lambda mtbi, save, load: math.sqrt(2 * mtbi * save / load)  # noqa: E731
    in_minutes = seed(240, 2, 1.5)
    in_hours_as_minutes = seed(4, 2 / 60, 1.5 / 60) * 60
    in_seconds_as_minutes = seed(14400, 120, 90) / 60
    assert round(in_minutes, 1) == 25.3  # the guide's arithmetic is right, the formula is not
    assert in_hours_as_minutes > 7 * in_minutes and in_seconds_as_minutes < in_minutes / 7
    young = [young_interval(2, 240), young_interval(2 / 60, 4) * 60, young_interval(120, 14400) / 60]
    assert young == pytest.approx([31.0] * 3, abs=0.05)


# Planning decisions ---------------------------------------------------------------------------------------

def test_recommended_interval_is_daly_for_the_spot_group(catalog):
    job = Job(steps=2000, step_time_s=3.6, checkpoint_s=60.0, restore_s=30.0, recovery_s=45.0)
    result = plan(job, [A100_8], ["us-central1"], catalog, Preemptions(mtbi_s=6 * HOUR), replications=20)
    assert result.estimates[0].checkpoint_interval_s == pytest.approx(daly_interval(60.0, 6 * HOUR / 8))


def test_deadline_picks_the_cheapest_configuration_that_meets_it(catalog):
    job = Job(steps=36_000, step_time_s=1.0, checkpoint_s=30.0, restore_s=30.0, recovery_s=45.0)  # 10 h
    shapes = [A100_8_ON_DEMAND, A100_8, A100_HYBRID]
    calm = Preemptions(mtbi_s=100 * HOUR, replacement_s=300.0)
    loose = plan(job, shapes, ["us-central1"], catalog, calm, replications=60)
    assert loose.recommended.config == "8 spot"
    assert [e.cost_usd for e in loose.estimates] == sorted(e.cost_usd for e in loose.estimates)
    tight = plan(job, shapes, ["us-central1"], catalog, calm, replications=60, deadline_h=10.01)
    assert tight.recommended.config == "8 on-demand"
    impossible = plan(job, shapes, ["us-central1"], catalog, calm, replications=20, deadline_h=9.0)
    assert impossible.recommended is None


def test_hybrid_keeps_training_when_spot_capacity_never_returns(catalog):
    job = Job(steps=3600, step_time_s=1.0, checkpoint_s=10.0, restore_s=10.0, recovery_s=20.0)
    never = Preemptions(mtbi_s=0.5 * HOUR, replacement_s=1e12)
    result = plan(job, [ClusterShape("t4", 0, 2), ClusterShape("t4", 1, 1)], ["us-central1"], catalog, never,
                  replications=40, horizon_factor=5)
    by_config = {e.config: e for e in result.estimates}
    assert by_config["1 on-demand + 1 spot"].finish_probability == 1.0
    assert by_config["2 spot"].finish_probability < 0.5  # both VMs gone for good, well before the end


def test_regions_change_price_not_the_simulation(catalog):
    job = Job(steps=2000, step_time_s=3.6, checkpoint_s=60.0)
    result = plan(job, [A100_8], ["us-central1", "europe-west4"], catalog, Preemptions(mtbi_s=6 * HOUR),
                  replications=30)
    by_region = {e.region: e for e in result.estimates}
    assert by_region["europe-west4"].wall_h == by_region["us-central1"].wall_h
    assert by_region["europe-west4"].cost_usd / by_region["us-central1"].cost_usd == pytest.approx(1.73 / 1.57)


# Traces ---------------------------------------------------------------------------------------------------

def test_trace_replay_loses_and_regains_the_nodes_the_trace_does():
    counts = [4, 4, 3, 3, 1, 4, 4, 2, 2, 4]
    replay = TraceReplay(counts, tick_s=100.0, spot_nodes=8, offset_s=250.0)  # scaled x2, started mid-tick
    alive, t, lost, regained = replay.target_at(0.0), 0.0, 0, 0
    assert alive == 6  # counts[2] = 3, scaled
    while True:
        change = replay.next_change(t, alive)
        if change.t > 2 * len(counts) * 100.0:  # two loops of the trace
            break
        assert change.t > t
        t, alive = change.t, alive + change.nodes
        assert alive == replay.target_at(t)
        lost += max(0, -change.nodes)
        regained += max(0, change.nodes)
    drops_per_loop = sum(max(0, counts[i - 1] - counts[i]) for i in range(len(counts)))  # wraps around
    assert lost == regained == 2 * 2 * drops_per_loop  # two loops, each node of the trace is two here


@pytest.mark.skipif(not os.path.isdir(TRACES), reason="shared/traces is not next to the repository")
def test_plan_replays_a_shared_trace(catalog):
    path = os.path.join(TRACES, "preemption__4-node__aws-08-03-2023__us-east-1f_v100_1.json")
    result = subprocess.run([sys.executable, "-m", "raytrain_spot.cost.plan", "--steps", "3600", "--step-time-s", "10",
                             "--gpu", "v100", "--gpus", "4", "--hybrid", "1", "--regions", "us-central1",
                             "--trace", path, "--replications", "20"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "4 spot" in result.stdout and "recommended:" in result.stdout


# Command line -----------------------------------------------------------------------------------------------

def test_cli_prints_a_plan_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = subprocess.run([sys.executable, "-m", "raytrain_spot.cost.plan", "--steps", "5000", "--step-time-s", "3.6",
                             "--regions", "us-central1,us-west1", "--deadline-h", "48", "--replications", "20",
                             "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "recommended:" in result.stdout and "2 on-demand + 6 spot" in result.stdout
    document = json.loads(out.read_text())
    assert document["recommended"]["meets_deadline"] is True
    assert document["recommended"]["strategy"] == PRODUCT
    # 4 shapes in 2 regions, and a plain Ray Train row beside each of the 3 with Spot nodes.
    assert len(document["estimates"]) == 4 * 2 + 3 * 2
    assert {e["config"] for e in document["estimates"] if e["strategy"] == PLAIN} == {
        "8 spot", "1 on-demand + 7 spot", "2 on-demand + 6 spot"}
    assert "8 spot (plain Ray Train)" in result.stdout and "plain Ray Train on the same shape:" in result.stdout


def test_cli_fixed_goodput_mode_reproduces_the_seed_table():
    result = subprocess.run([sys.executable, "-m", "raytrain_spot.cost.plan", "--steps", "10000", "--step-time-s", "36",
                             "--regions", "us-central1", "--goodput", "0.9090909"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert "$     2,936" in lines["8 on-demand"] and "$     1,382" in lines["8 spot"]


# raytrain-spot's defaults and the plain Ray Train row ---------------------------------------------------

def test_the_cli_defaults_describe_raytrain_spot_with_a_plain_row_beside_it():
    args = parse_args(["--steps", "1000", "--step-time-s", "3.6"])
    values, shown, run = resolve_figures(args)
    job, baseline = build_jobs(args, values)
    assert run is None and all(not f.source.startswith("run:") for f in shown)
    # Notice-time checkpoints, the advisor's interval, elastic down to one node, GCE's 30 s notice.
    assert job.jit_checkpoint and job.interval_bounds_s == PRODUCT_INTERVAL_BOUNDS_S
    assert job.min_nodes == 1 and job.notice_s == 30.0 and job.regrow_by_handoff
    assert jit_complete_fraction(job) == 1.0  # a 10 s save in a 30 s notice (5 s margin), 3.6 s steps
    # Plain Ray Train: no notice handling, periodic checkpoints only, its own restart.
    assert not baseline.jit_checkpoint and not baseline.regrow_by_handoff and baseline.interval_bounds_s is None
    assert baseline.kill_restart_s == PLAIN_RECOVERY_S and baseline.min_nodes == job.min_nodes
    assert jit_complete_fraction(baseline) == 0.0
    assert parse_args(["--steps", "1", "--step-time-s", "1", "--no-jit", "--no-plain"]).jit is False


def test_the_plain_row_loses_work_and_restarts_slower(catalog):
    job = Job(steps=36_000, step_time_s=1.0, checkpoint_s=1.0, restore_s=30.0, recovery_s=6.0, jit_checkpoint=True,
              jit_s=10.0, kill_recovery_s=15.0, interval_bounds_s=PRODUCT_INTERVAL_BOUNDS_S)
    result = plan(job, [A100_8], ["us-central1"], catalog, Preemptions(mtbi_s=6 * HOUR, replacement_s=600.0),
                  replications=40, baseline=plain_ray_train(job))
    product = next(e for e in result.estimates if e.strategy == PRODUCT)
    plain = result.plain_for(product)
    assert product.jit_complete == 1.0 and plain.jit_complete is None
    assert plain.wall_h > product.wall_h and plain.cost_usd > product.cost_usd
    assert result.recommended.strategy == PRODUCT
    # The product's advisor clamps Daly on every interruption; plain gets the planner's Daly.
    assert product.checkpoint_interval_s == pytest.approx(
        min(max(daly_interval(1.0, 6 * HOUR / 8), 10.0), 1800.0))
    assert plain.checkpoint_interval_s == pytest.approx(daly_interval(1.0, 6 * HOUR / 8))


def test_a_longer_notice_completes_more_just_in_time_checkpoints(catalog):
    # 20 s steps and 15 s to commit the save: in a 30 s notice with a 5 s margin, 10 s of slack cover
    # half of the notices (those landing in the last half of a step); a 120 s notice covers them all.
    job = Job(steps=3_600, step_time_s=20.0, checkpoint_s=1.0, restore_s=60.0, recovery_s=6.0, jit_checkpoint=True,
              jit_s=15.0, kill_recovery_s=15.0, interval_bounds_s=PRODUCT_INTERVAL_BOUNDS_S)
    assert jit_complete_fraction(job) == pytest.approx(0.5)
    assert jit_complete_fraction(job, group_fraction=0.5) == pytest.approx(0.25)  # half the group: 40 s steps
    longer = dataclasses.replace(job, notice_s=120.0)
    assert jit_complete_fraction(longer) == 1.0
    assert jit_complete_fraction(dataclasses.replace(job, notice_s=15.0)) == 0.0
    shapes = [ClusterShape("a100-80gb", 0, 8)]
    calm = Preemptions(mtbi_s=6 * HOUR, replacement_s=0.0)  # immediate replacement: always the full group
    short, long = (plan(j, shapes, ["us-central1"], catalog, calm, replications=60).estimates[0] for j in (job, longer))
    assert short.jit_complete == pytest.approx(0.5, abs=0.08)
    assert long.jit_complete == 1.0
    assert long.wall_h < short.wall_h
    cli = subprocess.run([sys.executable, "-m", "raytrain_spot.cost.plan", "--steps", "3600", "--step-time-s", "20",
                          "--jit-s", "15", "--notice-s", "120", "--regions", "us-central1", "--replications", "5",
                          "--no-plain"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "120 s notice" in cli.stdout and "option --notice-s" in cli.stdout


def test_without_full_notice_coverage_the_planner_checkpoints_for_the_uncovered_losses():
    job = Job(steps=1000, step_time_s=20.0, checkpoint_s=60.0, jit_checkpoint=True, jit_s=15.0)  # half covered
    assert interval_for(job, 6 * HOUR, 8) == pytest.approx(daly_interval(60.0, 6 * HOUR / 8 / 0.5))
    assert math.isinf(interval_for(dataclasses.replace(job, notice_s=120.0), 6 * HOUR, 8))


# Planning from a measured run ------------------------------------------------------------------------------

def _measured_run(tmp_path, strategy="raytrain-spot"):
    """A hand-built run: 20 steps of 0.4 s on 3 workers, a notice answered by a handoff (a 0.7 s
    just-in-time save, a 1.0 s restore, training again 6.4 s after the notice), 20 steps on 2, then a
    kill without notice (a 0.5 s restore, training again 11.9 s after the kill) and steps 21-25 redone."""
    t0, records = 1000.0, []

    def ev(t, record, **fields):
        records.append({"t": t0 + t, "ev": record, **fields})

    ev(0.0, "start", run="measured", strategy=strategy, min_workers=1, max_workers=3)
    ev(0.1, "add", node="h", node_type="local-head", pricing="on_demand", gpus=0.0)
    for node in ("w1", "w2", "w3"):
        ev(0.1, "add", node=node, node_type="local-cpu-spot", pricing="spot", gpus=0.0)
    ev(10.0, "group", world_size=3, step=0, restored_step=None, nodes=["w1", "w2", "w3"])

    def steps(first, last, start, duration, world):
        for i, step in enumerate(range(first, last + 1)):
            ev(start + (i + 1) * duration, "step", step=step, world_size=world, samples=[step * 8, step * 8 + 8],
               loss=1.0, lr=0.1, duration_s=duration)

    steps(1, 10, 10.0, 0.4, 3)
    ev(14.05, "checkpoint", step=10, tier="head", kind="periodic", stall_s=0.01, duration_s=0.1, bytes=1)
    steps(11, 20, 14.1, 0.4, 3)
    ev(18.2, "notice", node="w3", notice_s=10.0)
    ev(18.25, "drain", node="w3", deadline=t0 + 23.2)
    ev(18.4, "handoff", reason="preemption", step=20, world_size=3, preempted_ranks=[2], nodes=["w3"])
    ev(18.9, "checkpoint", step=20, tier="head", kind="jit", stall_s=0.02, duration_s=0.1, bytes=1)
    ev(24.0, "restore", step=20, tier="local", duration_s=1.0)
    ev(24.1, "group", world_size=2, step=20, restored_step=20, nodes=["w1", "w2"])
    ev(28.2, "kill", node="w3", with_notice=True)
    steps(21, 40, 24.6, 0.6, 2)
    ev(36.7, "kill", node="w2", with_notice=False)
    ev(48.0, "restore", step=20, tier="head", duration_s=0.5)
    ev(48.1, "group", world_size=1, step=20, restored_step=20, nodes=["w1"])
    steps(21, 25, 48.6, 1.2, 1)
    ev(55.0, "end", status="finished")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_plan_from_a_measured_run(tmp_path, catalog):
    run_dir = _measured_run(tmp_path)
    write_ledger(str(run_dir), catalog, plot=False)
    figures = measure_run(str(run_dir)).figures
    assert figures["step_time_s"].value == pytest.approx(0.4)  # world size 3, redone steps left out
    assert figures["checkpoint_s"].value == pytest.approx(0.015)  # the ledger's mean stall
    assert figures["restore_s"].value == pytest.approx(0.75)  # the ledger's mean restore
    assert figures["jit_s"].value == pytest.approx(0.7)
    assert figures["recovery_s"].value == pytest.approx(6.4 - 0.7 - 1.0)  # notice to training, less save, restore
    assert figures["kill_recovery_s"].value == pytest.approx(11.9 - 0.5)  # kill to training, less the restore
    out = tmp_path / "plan.json"
    result = subprocess.run([sys.executable, "-m", "raytrain_spot.cost.plan", "--steps", "100000", "--from-run",
                             str(run_dir), "--restore-s", "9", "--gpus", "4", "--hybrid", "1", "--regions",
                             "us-central1", "--mtbi-hours", "6", "--replications", "5", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    job = document["job"]
    assert job["step_time_s"] == pytest.approx(0.4) and job["checkpoint_s"] == pytest.approx(0.015)
    assert job["restore_s"] == 9.0  # an option wins over the run
    assert job["jit_s"] == pytest.approx(0.7) and job["recovery_s"] == pytest.approx(4.7)
    assert job["kill_recovery_s"] == pytest.approx(11.4)
    sources = {f["key"]: f["source"] for f in document["figures"]}
    assert all(sources[k].startswith("run:") for k in ("step_time_s", "checkpoint_s", "jit_s", "recovery_s",
                                                        "kill_recovery_s"))
    assert sources["restore_s"] == "option --restore-s" and sources["plain_recovery_s"].startswith("default")
    assert f"from run {run_dir}" in result.stdout and "1 of 1 handoffs at a notice committed" in result.stdout


def test_a_plain_ray_train_run_measures_the_plain_row(tmp_path):
    run_dir = _measured_run(tmp_path, strategy="plain-ray-train")  # no ledger.json: it is built from the event log
    measured = measure_run(str(run_dir))
    assert measured.plain and "kill_recovery_s" not in measured.figures
    assert measured.figures["plain_recovery_s"].value == pytest.approx(11.4)
    assert measured.figures["checkpoint_s"].how.startswith("the ledger of events.jsonl")


def test_from_run_needs_a_run_directory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "raytrain_spot.cost.plan", "--steps", "10", "--from-run",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no ledger.json or events.jsonl" in result.stderr


def test_a_trace_of_more_nodes_keeps_its_per_node_rate_on_fewer_spot_nodes():
    counts = [4, 4, 3, 4, 2, 2, 4, 1, 4, 4, 3, 3, 4, 0, 0, 4] * 20
    per_node = sum(max(0, a - b) for a, b in zip(counts, counts[1:])) / sum(counts)
    rates = []
    for seed in range(20):
        replay = TraceReplay(counts, tick_s=1.0, spot_nodes=3, offset_s=0.0, rng=random.Random(seed))
        assert max(replay.targets) == 3
        rates.append(sum(max(0, a - b) for a, b in zip(replay.targets, replay.targets[1:])) / sum(replay.targets))
    assert statistics.fmean(rates) == pytest.approx(per_node, rel=0.1)
