"""Alerts: thresholds, hysteresis, and the runner's actions against a real webhook on 127.0.0.1 and a
real event log."""

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raytrain_spot.config.monitoring import (DURABLE_UPLOAD_FAILED, HIGH_PREEMPTION_RATE, LOW_GOODPUT, NO_CAPACITY,
                                             NOTIFY, SWITCH_TO_ON_DEMAND, AlertConfig, AlertRule)
from raytrain_spot.monitor.alerts import AlertPolicy, AlertRunner, Observation
from raytrain_spot.observe.events import EventWriter, read_events
from raytrain_spot.observe.records import to_line
from raytrain_spot.cost.pricing import PriceCatalog
from tests.test_ledger import T0, RunLog

HOUR = 3600.0


def observation(goodput=0.9, wall_s=10 * HOUR, preemptions=0, node_hours=10.0):
    return Observation(now=T0 + wall_s, wall_s=wall_s, goodput=goodput, preemptions_in_window=preemptions,
                       spot_node_hours_in_window=node_hours)


def fired(policy, obs):
    return [(d.rule.type, d.rule.action) for d in policy.decide(obs)]


# The policy -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("goodput, fires", [(0.69, True), (0.6999, True), (0.70, False), (0.71, False)])
def test_low_goodput_fires_below_its_threshold_only(goodput, fires):
    assert fired(AlertPolicy(AlertConfig()), observation(goodput=goodput)) == (
        [(LOW_GOODPUT, NOTIFY)] if fires else [])


@pytest.mark.parametrize("preemptions, node_hours, fires", [(41, 100.0, True), (40, 100.0, False), (2, 5.0, False),
                                                            (39, 100.0, False), (3, 5.0, True)])
def test_preemption_rate_fires_above_its_threshold_only(preemptions, node_hours, fires):
    decisions = fired(AlertPolicy(AlertConfig()), observation(preemptions=preemptions, node_hours=node_hours))
    assert decisions == ([(HIGH_PREEMPTION_RATE, SWITCH_TO_ON_DEMAND)] if fires else [])


def test_an_alert_fires_once_until_the_metric_recovers_past_the_margin():
    policy = AlertPolicy(AlertConfig(rules=[AlertRule(LOW_GOODPUT, 0.70, NOTIFY, rearm_margin=0.05)]))
    sequence = [0.65, 0.60, 0.69, 0.72, 0.68, 0.75, 0.74, 0.66, 0.66]
    fired_at = [i for i, g in enumerate(sequence) if policy.decide(observation(goodput=g))]
    # Fires at 0.65; 0.72 is not back past 0.75, so 0.68 stays quiet; 0.75 re-arms; 0.66 fires again.
    assert fired_at == [0, 7]


def test_nothing_is_judged_on_too_little_evidence():
    policy = AlertPolicy(AlertConfig(min_wall_s=1800.0, min_spot_node_hours=1.0))
    assert policy.decide(observation(goodput=0.1, wall_s=1799.0, preemptions=5, node_hours=0.99)) == []
    assert len(policy.decide(observation(goodput=0.1, wall_s=1800.0, preemptions=5, node_hours=1.0))) == 2


def test_decisions_carry_the_numbers():
    decision = AlertPolicy(AlertConfig()).decide(observation(preemptions=3, node_hours=5.0))[0]
    assert decision.value == pytest.approx(0.6)
    assert "0.600 above 0.4" in decision.reason and "3 preemptions in 5.00 Spot node-hours" in decision.reason


def test_bad_rules_are_rejected():
    with pytest.raises(ValueError, match="alert type"):
        AlertRule("high_cost", 1.0, NOTIFY)
    with pytest.raises(ValueError, match=r"alerts.rules\[\].action: 'page_everyone' is not an action"):
        AlertRule(LOW_GOODPUT, 0.7, "page_everyone")


# The runner -------------------------------------------------------------------------------------------------

class Webhook:
    """A real HTTP server on 127.0.0.1 that keeps what is POSTed to it."""

    def __init__(self):
        self.received = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.headers["Content-Type"], json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    server = Webhook()
    yield server
    server.close()


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def event_log(tmp_path):
    writer = EventWriter(str(tmp_path / "events.jsonl"))
    return writer, lambda record: writer.write(to_line(record, time.time()))


def slow_run() -> RunLog:
    """An hour in which the group trains only a third of the time: goodput well under 0.70."""
    log = RunLog()
    log.start()
    log.add("head", pricing="on_demand", node_type="local-head")
    for node in ("w1", "w2"):
        log.add(node)
    log.spend(1800.0, "program_startup")
    for step in range(1, 601):
        log.step(step, duration=2.0)
        log.spend(1.0, "other")
    return log


def test_low_goodput_notifies_by_log_event_and_webhook(tmp_path, webhook, caplog):
    log = slow_run()
    writer, emit = event_log(tmp_path)
    clock = Clock(log.t)
    requests = []
    runner = AlertRunner(AlertConfig(webhook_url=webhook.url), PriceCatalog.load(), emit, clock=clock,
                         request_capacity=requests.append)
    for record in log.records:
        runner.write(record)
    with caplog.at_level(logging.WARNING, logger="raytrain_spot.monitor.alerts"):
        decisions = runner.tick()
        assert runner.tick() == []  # no re-firing on the next evaluation
    expected_goodput = 1200.0 / 3600.0
    assert [(d.rule.type, d.value) for d in decisions] == [(LOW_GOODPUT, pytest.approx(expected_goodput))]
    assert requests == []
    writer.flush()
    alerts = [r for r in read_events(str(tmp_path / "events.jsonl")) if r["ev"] == "alert"]
    assert len(alerts) == 1
    assert alerts[0]["alert"] == LOW_GOODPUT and alerts[0]["action"] == NOTIFY
    assert alerts[0]["value"] == pytest.approx(expected_goodput) and alerts[0]["threshold"] == 0.70
    assert alerts[0]["webhook_status"] == 204 and alerts[0]["t"] == clock.now
    content_type, payload = webhook.received[0]
    assert len(webhook.received) == 1 and content_type == "application/json"
    assert payload["alert"] == LOW_GOODPUT and "0.333 below 0.7" in payload["text"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "low_goodput" in lines[0] and "value=0.333" in lines[0]


def test_a_failed_durable_upload_is_told_at_once_and_a_dead_webhook_never_leaks_its_token(tmp_path, webhook):
    writer, emit = event_log(tmp_path)
    runner = AlertRunner(AlertConfig(webhook_url=webhook.url), PriceCatalog.load(), emit, clock=Clock(100.0),
                         request_capacity=lambda bundles: None)
    runner.write({"ev": "checkpoint_failed", "t": 99.0, "step": 40, "kind": "periodic", "tier": "durable",
                  "error": "RetryError: deadline exceeded", "retry_in_s": 2.0})
    runner.write({"ev": "checkpoint_failed", "t": 99.5, "step": 41, "kind": "periodic", "tier": "local",
                  "error": "OSError: no space"})  # the node's own copy: not worth a page
    assert [p["alert"] for _, p in webhook.received] == [DURABLE_UPLOAD_FAILED]
    assert "step 40 did not reach durable storage" in webhook.received[0][1]["text"]

    dead = "http://127.0.0.1:1/hooks/T0KEN-dead"
    runner = AlertRunner(AlertConfig(webhook_url=dead), PriceCatalog.load(), emit, clock=Clock(100.0),
                         request_capacity=lambda bundles: None)
    runner.write({"ev": "checkpoint_failed", "t": 99.0, "step": 42, "kind": "final", "tier": "durable",
                  "error": "RetryError", "retry_in_s": 4.0})
    writer.flush()
    alerts = [r for r in read_events(str(tmp_path / "events.jsonl")) if r["ev"] == "alert"]
    assert len(alerts) == 2 and "webhook_error" in alerts[1] and "T0KEN" not in json.dumps(alerts[1])


def test_no_room_for_the_minimum_workers_for_long_asks_for_on_demand_and_rearms_when_capacity_returns(tmp_path):
    log = RunLog()
    log.start(min_workers=1)
    log.add("head", pricing="on_demand", node_type="local-head")
    for node in ("w1", "w2"):
        log.add(node)
    log.spend(60.0, "productive")
    log.kill("w1", with_notice=True)
    log.kill("w2", with_notice=True)  # every Spot node gone: the head alone holds no worker
    writer, emit = event_log(tmp_path)
    clock = Clock(log.t + 100.0)
    requests = []
    runner = AlertRunner(AlertConfig(rules=[AlertRule(NO_CAPACITY, 300.0, SWITCH_TO_ON_DEMAND)]), PriceCatalog.load(),
                         emit, clock=clock, request_capacity=requests.append)
    for record in log.records:
        runner.write(record)
    assert runner.tick() == [], "100 s without capacity is below the threshold"
    clock.now += 250.0
    decisions = runner.tick()
    assert [(d.rule.type, round(d.value)) for d in decisions] == [(NO_CAPACITY, 350)]
    assert requests == [[{"GPU": 1.0, "on_demand_fallback": 1.0}]]
    assert runner.tick() == [], "fires once"
    log.t = clock.now
    log.add("w3")
    runner.write(log.records[-1])
    assert runner.tick() == [] and runner.policy._armed == [True], "capacity is back: armed again"


def test_high_preemption_rate_asks_for_on_demand_capacity(tmp_path):
    log = RunLog()
    log.start()
    for node in ("w1", "w2", "w3", "w4"):
        log.add(node)
    log.spend(1800.0, "program_startup")
    log.emit("notice", node="w1", notice_s=30)
    log.kill("w1", with_notice=True)
    log.kill("w2")
    log.spend(1800.0, "infrastructure_recovery")
    writer, emit = event_log(tmp_path)
    requests = []
    config = AlertConfig(rules=[AlertRule(HIGH_PREEMPTION_RATE, 0.40, SWITCH_TO_ON_DEMAND)],
                         fallback_bundle={"GPU": 1.0, "on_demand_fallback": 1.0}, fallback_nodes=2)
    runner = AlertRunner(config, PriceCatalog.load(), emit, clock=Clock(log.t), request_capacity=requests.append)
    for record in log.records:
        runner.write(record)
    decisions = runner.tick()
    # Two preemptions in 4 x 0.5 h + 2 x 0.5 h = 3 Spot node-hours.
    assert [(d.rule.type, d.value) for d in decisions] == [(HIGH_PREEMPTION_RATE, pytest.approx(2 / 3))]
    assert requests == [[{"GPU": 1.0, "on_demand_fallback": 1.0}] * 2]
    writer.flush()
    alert = next(r for r in read_events(str(tmp_path / "events.jsonl")) if r["ev"] == "alert")
    assert alert["requested_bundles"] == requests[0] and alert["action"] == SWITCH_TO_ON_DEMAND


def test_old_preemptions_leave_the_window(tmp_path):
    log = RunLog()
    log.start()
    for node in ("w1", "w2", "w3"):
        log.add(node)
    log.spend(600.0, "program_startup")
    log.kill("w1")
    log.add("w4")
    log.spend(2 * HOUR, "other")
    clock = Clock(log.t)
    runner = AlertRunner(AlertConfig(rules=[AlertRule(HIGH_PREEMPTION_RATE, 0.1, NOTIFY)], min_spot_node_hours=0.5),
                         PriceCatalog.load(), lambda record: None, clock=clock, request_capacity=lambda b: None)
    for record in log.records:
        runner.write(record)
    assert runner.tick() == []  # the loss is 2 h old: outside the 1 h window
    clock.now = T0 + 900.0
    assert len(runner.tick()) == 1  # at that time the loss was 5 minutes old


def test_a_dead_webhook_or_autoscaler_does_not_stop_the_alert(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there

    def refuse(bundles):
        raise RuntimeError("autoscaler unreachable")

    writer, emit = event_log(tmp_path)
    config = AlertConfig(rules=[AlertRule(LOW_GOODPUT, 0.7, NOTIFY), AlertRule(LOW_GOODPUT, 0.7, SWITCH_TO_ON_DEMAND)],
                         webhook_url=f"http://127.0.0.1:{dead_port}/", webhook_timeout_s=2.0)
    log = slow_run()
    runner = AlertRunner(config, PriceCatalog.load(), emit, clock=Clock(log.t), request_capacity=refuse)
    for record in log.records:
        runner.write(record)
    assert len(runner.tick()) == 2
    writer.flush()
    alerts = [r for r in read_events(str(tmp_path / "events.jsonl")) if r["ev"] == "alert"]
    assert len(alerts) == 2 and all("webhook_error" in a for a in alerts)
    assert "autoscaler unreachable" in alerts[1]["request_error"]
