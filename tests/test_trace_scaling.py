"""Replaying a trace of N nodes on k slots (``raytrain_spot.simulator.chaos.scale_trace``): each slot
follows one of the trace's node streams, so the preemption rate per node and the share of capacity a
drop takes are the trace's. Checked on synthetic traces whose true rates are known."""

import random
import statistics

import pytest
import yaml

from raytrain_spot.simulator.chaos import scale_trace, trace_actions, trace_node_streams, trace_targets


def synthetic_trace(fleet, ticks, p_loss, p_back, mass_every, mass_share, seed=0):
    """Nodes alive per tick: each alive node is lost with p_loss per tick, each lost one back with p_back;
    every ``mass_every`` ticks a correlated event takes ``mass_share`` of the alive nodes at once
    (a whole-fleet outage when it is 1)."""
    rng = random.Random(seed)
    alive = [True] * fleet
    counts = []
    for tick in range(ticks):
        up = [i for i in range(fleet) if alive[i]]
        if mass_every and tick % mass_every == mass_every // 2:
            for i in rng.sample(up, round(mass_share * len(up))):
                alive[i] = False
        else:
            for i in range(fleet):
                if alive[i] and rng.random() < p_loss:
                    alive[i] = False
                elif not alive[i] and rng.random() < p_back:
                    alive[i] = True
        counts.append(sum(alive))
    return counts


def losses(counts):
    return sum(max(0, a - b) for a, b in zip(counts, counts[1:]))


def rate_per_node(counts):
    """Node losses per alive node-tick: the per-node preemption rate (1 / MTBI in ticks)."""
    return losses(counts) / sum(counts)


def share_lost(trace, scaled):
    """Sum over the trace's drops of the share of alive capacity lost, in the trace and on the slots
    (ticks where the slots had capacity to lose)."""
    in_trace = on_slots = 0.0
    for t in range(1, len(trace)):
        if trace[t] < trace[t - 1] and scaled[t - 1] > 0:
            in_trace += (trace[t - 1] - trace[t]) / trace[t - 1]
            on_slots += max(0, scaled[t - 1] - scaled[t]) / scaled[t - 1]
    return in_trace, on_slots


@pytest.mark.parametrize("fleet", [12, 32])
def test_three_slots_keep_the_per_node_rate_and_the_share_lost_at_once(fleet):
    trace = synthetic_trace(fleet, ticks=20_000, p_loss=0.002, p_back=0.02, mass_every=800, mass_share=0.5)
    full_outages = synthetic_trace(fleet, ticks=20_000, p_loss=0.002, p_back=0.02, mass_every=1500, mass_share=1.0,
                                   seed=1)
    for counts in (trace, full_outages):
        scaled = [scale_trace(counts, 3, random.Random(seed)) for seed in range(12)]
        assert all(max(s) <= 3 for s in scaled)
        rates = [rate_per_node(s) for s in scaled]
        assert statistics.fmean(rates) == pytest.approx(rate_per_node(counts), rel=0.08)
        shares = [share_lost(counts, s) for s in scaled]
        in_trace, on_slots = sum(a for a, _ in shares), sum(b for _, b in shares)
        assert on_slots == pytest.approx(in_trace, rel=0.08)
        # When the whole fleet goes, every slot goes with it, on the same tick.
        for s in scaled:
            assert all(s[t] == 0 for t, c in enumerate(counts) if c == 0)
    # The old rule, round(count * k / N), rounds small drops away and makes losses up where the count
    # wanders across a rounding boundary: here 17% (N=32) and 41% (N=12) more losses per node.
    rounded = [round(c * 3 / fleet) for c in trace]
    assert abs(rate_per_node(rounded) / rate_per_node(trace) - 1) > 0.15


def test_node_streams_add_up_to_the_counts():
    counts = synthetic_trace(16, ticks=3000, p_loss=0.01, p_back=0.05, mass_every=300, mass_share=0.75)
    streams = trace_node_streams(counts, 16, random.Random(3))
    assert [sum(s[t] for s in streams) for t in range(len(counts))] == counts


def test_more_slots_than_trace_nodes_repeat_the_streams():
    counts = [4, 4, 3, 3, 1, 4, 4, 2, 2, 4, 0, 0, 4]
    assert scale_trace(counts, 8, random.Random(0)) == [2 * c for c in counts]  # a multiple: exact
    assert scale_trace(counts, 4, random.Random(0)) == counts  # the same size: the counts themselves
    assert scale_trace([1, 1, 0, 1], 3, random.Random(0)) == [3, 3, 0, 3]  # a 1-node trace: all slots together
    long = synthetic_trace(4, ticks=20_000, p_loss=0.002, p_back=0.02, mass_every=0, mass_share=0)
    six = [scale_trace(long, 6, random.Random(seed)) for seed in range(8)]
    assert statistics.fmean(rate_per_node(s) for s in six) == pytest.approx(rate_per_node(long), rel=0.08)


def test_a_window_uses_the_whole_trace_fleet():
    # A window in which only 3 of a 4-node trace's nodes were up is 3/4 of the capacity, not all of it.
    window = [3, 3, 2, 3]
    assert max(trace_targets(window, 4, random.Random(0), fleet=4)) == 3
    assert max(trace_targets(window, 4, random.Random(0))) == 4  # the window's own max taken as the fleet


def test_the_simulator_preempts_the_scaled_drops():
    counts = synthetic_trace(32, ticks=2000, p_loss=0.003, p_back=0.03, mass_every=400, mass_share=0.5, seed=2)
    targets = trace_targets(counts, 3, random.Random(7))
    rng = random.Random(7)
    actions = trace_actions(targets, tick_s=3.0, notice_s=1.0, provisioning_s=2.0, pick=lambda a, k: rng.sample(a, k))
    assert sum(a.kind == "kill" for a in actions) == losses(targets)
    assert sum(a.kind == "notice" for a in actions) == losses(targets)


class _Node:
    def __init__(self, i):
        self.node_id = f"{i:056x}"


class _Cluster:
    def __init__(self, n):
        self.workers = [_Node(i) for i in range(n)]
        self.address = "127.0.0.1:1"


class _Events:
    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_the_spot_simulator_replays_a_32_node_trace_on_3_slots(tmp_path):
    import json

    from raytrain_spot.config.schema import ChaosConfig
    from raytrain_spot.simulator.chaos import SpotSimulator

    counts = synthetic_trace(32, ticks=600, p_loss=0.004, p_back=0.05, mass_every=200, mass_share=0.5, seed=4)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": 300}, "data": counts}))
    # Nodes started over SSH: the stand-in nodes here have no processes for a `ray start --block` service to hold.
    cluster_yaml = tmp_path / "ssh-started.yaml"
    cluster_yaml.write_text(yaml.safe_dump({"worker_start_ray_commands": ["ray start --address=$RAY_HEAD_IP:6379"]}))
    cfg = ChaosConfig(mode="trace", trace=str(path), tick_s=1.0, start_tick=100, max_ticks=300, notice_s=2.0,
                      watchers=False, seed=5, node_start=str(cluster_yaml))
    simulator = SpotSimulator(cfg, _Cluster(3), _Events(), current_step=lambda: None, on_kill=lambda *a: None,
                              log_dir=str(tmp_path / "logs"))
    try:
        window = counts[100:400]
        expected = trace_targets(window, 3, random.Random(5), fleet=32)  # the whole trace's fleet, not the window's
        kills = [a for a in simulator._pending if a.kind == "kill"]
        assert len(kills) == losses(expected) > 0
        assert sum(a.kind == "notice" for a in simulator._pending) == len(kills)
    finally:
        simulator.close()
