"""The ledger on hand-built event logs: the log's author says what every second was for; the ledger
must find the same from the records alone."""

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Dict, Tuple

import pytest

from raytrain_spot.cost.ledger import CATEGORIES, LedgerOptions, build_ledger, format_table, segments, write_ledger
from raytrain_spot.cost import ledger as ledger_module
from raytrain_spot.cost.pricing import PriceCatalog

T0 = 1_750_000_000.0
BATCH = 48
SPOT_USD_H, ON_DEMAND_USD_H = 0.9, 3.6


def simple_catalog() -> PriceCatalog:
    """One machine type, round prices: every cost below is checkable by hand."""
    figure = lambda usd: {"usd": usd, "date": "2025-01-01", "source": "test"}  # noqa: E731
    return PriceCatalog({
        "default_region": "r1",
        "regional_factors": {"r1": {"factor": 1.0}},
        "accelerators": {},
        "machines": {"m": {"prices": {"r1": {"spot": figure(SPOT_USD_H), "on_demand": figure(ON_DEMAND_USD_H)}}}},
        "node_types": {"local-cpu-spot": {"machine": "m"}, "local-head": {"machine": "m"}},
    })


class RunLog:
    """Writes an event log by a clock and tallies, independently of the ledger, what each second was for."""

    def __init__(self):
        self.t = T0
        self.records = []
        self.truth: Counter = Counter()
        self.node_s: Counter = Counter()  # (node_type, pricing) -> seconds alive within sessions
        self._alive: Dict[str, Tuple[str, str, float]] = {}

    def emit(self, ev, **fields):
        self.records.append({"t": self.t, "ev": ev, **fields})

    def spend(self, seconds, category):
        self.t += seconds
        self.truth[category] += seconds

    def pause(self, seconds):
        """Time outside any session: not wall time, nobody billed."""
        self.t += seconds

    def start(self, **fields):
        self.emit("start", run="hand-built", **fields)

    def add(self, node, pricing="spot", node_type="local-cpu-spot", gpus=0):
        self.emit("add", node=node, node_type=node_type, pricing=pricing, gpus=gpus)
        self._alive[node] = (node_type, pricing, self.t)

    def _gone(self, node):
        node_type, pricing, since = self._alive.pop(node)
        self.node_s[(node_type, pricing)] += self.t - since

    def kill(self, node, with_notice=False):
        self.emit("kill", node=node, with_notice=with_notice)
        self._gone(node)

    def end(self, status="finished"):
        self.emit("end", status=status, error=None)
        self.session_over()

    def session_over(self):
        for node in list(self._alive):
            self._gone(node)

    def step(self, step, duration=1.0, category="productive", world_size=3, data_s=0.0):
        self.spend(duration - data_s, category)
        if data_s:
            self.truth["data_loading"] += data_s
            self.t += data_s
        self.emit("step", step=step, world_size=world_size, samples=[(step - 1) * BATCH, step * BATCH],
                  loss=3.0 / step, lr=1e-3, duration_s=duration, **({"data_s": data_s} if data_s else {}))

    def steps(self, first, last, gap=0.25, **kwargs):
        """Steps first..last, each followed by ``gap`` seconds of loop overhead ("other")."""
        for step in range(first, last + 1):
            self.step(step, **kwargs)
            self.spend(gap, "other")

    def checkpoint(self, step, stall, kind="periodic"):
        self.spend(stall, "checkpoint_save")
        self.emit("checkpoint", step=step, tier="durable", kind=kind, stall_s=stall, duration_s=stall, bytes=1000)

    def restore(self, step, duration):
        self.spend(duration, "checkpoint_restore")
        self.emit("restore", step=step, tier="durable", duration_s=duration)

    def write(self, directory) -> str:
        with open(os.path.join(directory, "events.jsonl"), "w") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")
        return str(directory)


def preempted_run() -> RunLog:
    """3 Spot workers + an on-demand head: a hard kill, a kill after a notice, a regrow, a clean end."""
    log = RunLog()
    log.start(min_workers=1)
    log.add("head", pricing="on_demand", node_type="local-head")
    for node in ("w1", "w2", "w3"):
        log.add(node)
    log.spend(20.0, "program_startup")
    log.emit("group", world_size=3, step=0, restored_step=None)
    log.spend(0.5, "program_startup")
    log.steps(1, 10, data_s=0.2)
    log.checkpoint(10, 0.5)
    log.spend(0.25, "other")
    for step in (11, 12, 13):  # done again after the kill below: wasted
        log.step(step, category="wasted_progress")
        log.spend(0.25, "infrastructure_recovery" if step == 13 else "other")
    log.spend(2.0, "infrastructure_recovery")
    log.kill("w3")  # no notice: everything since the checkpoint at step 10 is lost
    log.spend(25.0, "infrastructure_recovery")
    log.restore(10, 3.0)
    log.emit("group", world_size=2, step=10, restored_step=10)
    log.spend(1.0, "infrastructure_recovery")
    log.steps(11, 19, duration=1.5, world_size=2)
    log.step(20, duration=1.5, world_size=2)
    log.spend(0.1, "other")
    log.emit("notice", node="w2", notice_s=30)
    log.spend(0.15, "other")
    log.checkpoint(20, 0.4, kind="jit")
    log.spend(0.25, "other")
    log.step(21, duration=1.5, world_size=2, category="wasted_progress")
    log.spend(5.0, "infrastructure_recovery")
    log.kill("w2", with_notice=True)
    log.spend(20.0, "infrastructure_recovery")
    log.restore(20, 1.0)
    log.emit("group", world_size=1, step=20, restored_step=20)
    log.spend(0.5, "infrastructure_recovery")
    log.steps(21, 24, duration=3.0, world_size=1)
    log.add("w4")  # replacement capacity: the group regrows
    log.spend(0.5, "other")
    log.step(25, duration=3.0, world_size=1)
    # The whole gap around a group restart is recovery: the log cannot tell when the restart began.
    log.spend(0.2, "infrastructure_recovery")
    log.checkpoint(25, 0.5)
    log.spend(8.0, "infrastructure_recovery")
    log.restore(25, 1.0)
    log.emit("group", world_size=2, step=25, restored_step=25)
    log.spend(0.3, "infrastructure_recovery")
    log.steps(26, 29, duration=1.5, world_size=2)
    log.step(30, duration=1.5, world_size=2)
    log.spend(0.2, "other")
    log.checkpoint(30, 0.5, kind="final")
    log.spend(3.0, "other")
    log.end()
    return log


def build(log: RunLog, **options):
    return build_ledger(log.records, simple_catalog(), LedgerOptions(**options))


def assert_categories_match(summary, truth):
    for category in CATEGORIES:
        assert summary["time_s"][category] == pytest.approx(truth[category], abs=1e-6), category


def test_every_second_of_a_preempted_run_lands_in_its_category():
    log = preempted_run()
    ledger = build(log)
    summary = ledger.summary
    assert_categories_match(summary, log.truth)
    wall = log.t - T0
    assert summary["wall_time_s"] == pytest.approx(wall)
    assert sum(summary["time_s"].values()) == pytest.approx(wall)
    assert sum(summary["badput_s"].values()) + summary["time_s"]["productive"] == pytest.approx(wall)
    assert summary["goodput"] == pytest.approx(log.truth["productive"] / wall)
    # The segments tile the run: contiguous, no overlap, nothing left out.
    tiles = list(segments(log.records))
    assert tiles[0].start == T0 and tiles[-1].end == log.t
    assert all(a.end == b.start for a, b in zip(tiles, tiles[1:]))


def test_steps_redone_after_a_restore_count_once():
    summary = build(preempted_run()).summary
    assert summary["steps"] == {"completed": 30, "executions": 34, "redone": 4}
    assert summary["samples"] == 30 * BATCH


def test_steps_redone_in_any_order_are_wasted_up_to_their_last_execution():
    """Restores back to different steps, one inside an earlier redo: each execution that a later one repeats is waste."""
    log = RunLog()
    log.start(min_workers=1)
    log.emit("group", world_size=3, step=0, restored_step=None)
    runs = ((1, 10, 5), (5, 12, 3), (3, 4, None), (5, 15, None))
    for at, (first, last, redone_from) in enumerate(runs):
        for step in range(first, last + 1):
            redone = any(later_first <= step <= later_last for later_first, later_last, _ in runs[at + 1:])
            log.step(step, category="wasted_progress" if redone else "productive")
            log.spend(0.25, "infrastructure_recovery" if step == last and redone_from is not None else "other")
        if redone_from is not None:
            log.restore(redone_from - 1, 1.0)
            log.emit("group", world_size=3, step=redone_from - 1, restored_step=redone_from - 1)
            log.spend(0.5, "infrastructure_recovery")
    log.end()
    summary = build(log).summary
    assert_categories_match(summary, log.truth)
    assert summary["steps"]["completed"] == 15 and summary["samples"] == 15 * BATCH


def test_the_partition_settled_block_by_block_is_the_one_sweep_over_each_session(monkeypatch):
    """The ledger settles the time before each block's earliest instant and forgets it; the segments
    must come out as one sweep over the whole session makes them."""
    log = preempted_run()
    log.pause(60.0)
    log.start(min_workers=2)
    log.add("w9")
    log.spend(5.0, "waiting_for_capacity")
    log.emit("group", world_size=1, step=30, restored_step=30)
    log.steps(31, 60, data_s=0.1, world_size=1)
    log.checkpoint(60, 0.5)
    whole = list(segments(log.records))
    assert len(log.records) < ledger_module.BLOCK
    monkeypatch.setattr(ledger_module, "BLOCK", 1)
    assert list(segments(log.records)) == whole
    monkeypatch.setattr(ledger_module, "BLOCK", 7)
    assert list(segments(log.records)) == whole


def test_failed_saves_are_counted_per_tier_and_shown():
    log = preempted_run()
    log.emit("checkpoint_failed", step=20, kind="periodic", tier="durable", error="RetryError", retry_in_s=1.0)
    log.emit("checkpoint_failed", step=21, kind="periodic", tier="durable", error="RetryError", retry_in_s=2.0)
    log.emit("checkpoint_failed", step=22, kind="periodic", error="OSError")
    summary = build(log).summary
    assert summary["checkpoints"]["failed_saves"] == {"all": 1, "durable": 2}
    assert "failed saves {'all': 1, 'durable': 2}" in format_table(summary)


def test_preemptions_are_counted_per_node_with_and_without_notice():
    disruptions = build(preempted_run()).summary["disruptions"]
    assert disruptions == {"preemptions": 2, "with_notice": 1, "without_notice": 1, "on_demand_losses": 0}


def test_cost_is_node_hours_times_catalog_prices():
    log = preempted_run()
    summary = build(log).summary
    spot_h = log.node_s[("local-cpu-spot", "spot")] / 3600
    head_h = log.node_s[("local-head", "on_demand")] / 3600
    expected_cost = spot_h * SPOT_USD_H + head_h * ON_DEMAND_USD_H
    expected_on_demand = (spot_h + head_h) * ON_DEMAND_USD_H
    cost = summary["cost"]
    assert cost["total_usd"] == pytest.approx(expected_cost)
    assert cost["on_demand_equivalent_usd"] == pytest.approx(expected_on_demand)
    assert cost["savings_usd"] == pytest.approx(expected_on_demand - expected_cost)
    assert cost["savings_fraction"] == pytest.approx(1 - expected_cost / expected_on_demand)
    assert cost["per_step_usd"] == pytest.approx(expected_cost / 30)
    assert cost["per_1k_samples_usd"] == pytest.approx(1000 * expected_cost / (30 * BATCH))
    usage = {(row["node_type"], row["pricing"]): row for row in summary["node_usage"]}
    assert usage[("local-cpu-spot", "spot")]["nodes"] == 4
    assert usage[("local-cpu-spot", "spot")]["node_hours"] == pytest.approx(spot_h)
    assert usage[("local-head", "on_demand")]["node_hours"] == pytest.approx(head_h)


def test_waiting_for_capacity_below_min_workers():
    log = RunLog()
    log.start()
    log.add("head", pricing="on_demand", node_type="local-head")
    log.add("w1")
    log.spend(30.0, "waiting_for_capacity")  # min_workers=2 and only one worker node
    log.add("w2")
    log.spend(12.0, "program_startup")
    log.emit("group", world_size=2, step=0, restored_step=None)
    log.steps(1, 5)
    log.checkpoint(5, 0.3)
    log.spend(0.25, "other")
    log.step(6, category="wasted_progress")
    log.spend(1.0, "infrastructure_recovery")
    log.kill("w2")
    log.spend(40.0, "waiting_for_capacity")
    log.add("w3")
    log.spend(6.0, "infrastructure_recovery")
    log.restore(5, 2.0)
    log.emit("group", world_size=2, step=5, restored_step=5)
    log.spend(0.5, "infrastructure_recovery")
    log.steps(6, 8)
    log.end()
    summary = build(log, min_workers=2).summary
    assert_categories_match(summary, log.truth)
    # The same log read with min_workers=1 never waits: that time is startup and recovery.
    relaxed = build(log, min_workers=1).summary
    assert relaxed["time_s"]["waiting_for_capacity"] == 0
    assert relaxed["time_s"]["program_startup"] == pytest.approx(log.truth["program_startup"] + 30.0)
    assert relaxed["time_s"]["infrastructure_recovery"] == pytest.approx(
        log.truth["infrastructure_recovery"] + 40.0)


def test_min_workers_comes_from_the_start_record():
    log = RunLog()
    log.start(min_workers=2)
    log.add("w1")
    log.spend(10.0, "waiting_for_capacity")
    log.add("w2")
    log.spend(5.0, "program_startup")
    log.steps(1, 2)
    log.end()
    assert_categories_match(build(log).summary, log.truth)


def test_a_crashed_session_and_its_relaunch():
    log = RunLog()
    log.start()
    log.add("w1")
    log.spend(10.0, "program_startup")
    log.steps(1, 4)
    log.checkpoint(4, 0.5)
    log.spend(0.25, "other")
    log.step(5, category="wasted_progress")  # the driver dies here: no end record
    log.session_over()
    log.pause(600.0)
    log.start()
    log.add("w1")
    log.spend(8.0, "program_startup")
    log.restore(4, 1.5)
    log.emit("group", world_size=1, step=4, restored_step=4)
    log.spend(0.5, "program_startup")
    log.steps(5, 7)
    log.end()
    summary = build(log).summary
    assert_categories_match(summary, log.truth)
    assert summary["between_sessions_s"] == pytest.approx(600.0)
    assert summary["wall_time_s"] == pytest.approx(log.t - T0 - 600.0)
    assert [s["status"] for s in summary["sessions"]] == ["interrupted", "finished"]
    hours = log.node_s[("local-cpu-spot", "spot")] / 3600
    assert summary["cost"]["total_usd"] == pytest.approx(hours * SPOT_USD_H)


def test_a_log_without_node_records_has_no_waiting_and_no_cost():
    log = RunLog()
    log.start()
    log.spend(5.0, "program_startup")
    log.steps(1, 3)
    log.end()
    summary = build(log, min_workers=3).summary
    assert_categories_match(summary, log.truth)
    assert summary["cost"]["total_usd"] == 0 and summary["node_usage"] == []


def test_unpriced_node_types_are_listed_not_guessed():
    log = RunLog()
    log.start()
    log.add("g1", node_type="gpu-spot-mystery", gpus=1)
    log.spend(5.0, "program_startup")
    log.steps(1, 2)
    log.end()
    cost = build(log).summary["cost"]
    assert cost["unpriced_node_types"] == ["gpu-spot-mystery"]
    assert cost["total_usd"] == 0


def test_local_node_types_get_a_notional_price_from_the_packaged_catalog():
    log = preempted_run()
    summary = build_ledger(log.records, PriceCatalog.load()).summary
    assert summary["cost"]["notional"] is True
    assert summary["cost"]["total_usd"] > 0 and summary["cost"]["unpriced_node_types"] == []
    assert "notional" in format_table(summary)


def test_checkpoint_advice_uses_young_daly_on_observed_figures():
    summary = build(preempted_run()).summary
    advice = summary["checkpoints"]
    mtbi = summary["wall_time_s"] / 2
    stall = (0.5 + 0.4 + 0.5 + 0.5) / 4
    young = (2 * stall * mtbi) ** 0.5
    assert advice["observed_mtbi_s"] == pytest.approx(mtbi)
    assert advice["mean_stall_s"] == pytest.approx(stall)
    # Daly's correction is small for C << M and shortens the interval by about C.
    assert young - stall < advice["recommended_interval_s"] < young * 1.05


LEDGER_KEYS = {"format", "run", "sessions", "wall_time_s", "between_sessions_s", "goodput", "time_s", "badput_s",
               "steps", "samples", "disruptions", "node_usage", "cost", "checkpoints"}


def test_cli_rebuilds_json_and_png(tmp_path):
    run_dir = preempted_run().write(tmp_path)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(simple_catalog().document))
    result = subprocess.run([sys.executable, "-m", "raytrain_spot.cost.ledger", run_dir, "--prices", str(prices)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "goodput" in result.stdout and "infrastructure_recovery" in result.stdout
    written = json.loads((tmp_path / "ledger.json").read_text())
    assert set(written) == LEDGER_KEYS
    assert written["disruptions"]["preemptions"] == 2
    png = (tmp_path / "ledger.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_write_ledger_matches_build(tmp_path):
    log = preempted_run()
    summary = write_ledger(log.write(tmp_path), simple_catalog(), plot=False)
    assert summary["time_s"] == pytest.approx(build(log).summary["time_s"])
    assert not (tmp_path / "ledger.png").exists()


def test_cli_reads_min_workers_from_the_saved_hydra_config(tmp_path):
    log = RunLog()
    log.start()
    log.add("w1")
    log.spend(10.0, "waiting_for_capacity")
    log.add("w2")
    log.spend(5.0, "program_startup")
    log.steps(1, 2)
    log.end()
    run_dir = log.write(tmp_path)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("trainer:\n  min_workers: 2\n")
    result = subprocess.run([sys.executable, "-m", "raytrain_spot.cost.ledger", run_dir, "--no-plot"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "ledger.json").read_text())
    assert written["time_s"]["waiting_for_capacity"] == pytest.approx(10.0)
