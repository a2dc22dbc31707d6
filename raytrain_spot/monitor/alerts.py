"""Alerts evaluated during a run (the seed design): low goodput -> notify, high preemption rate ->
switch to on-demand capacity.

``AlertPolicy`` is pure: it judges an ``Observation`` and returns ``AlertDecision``s. ``AlertRunner``
is the one place that acts: a log line, an ``alert`` record in the event log, an optional
webhook POST for ``notify``, and a request for on-demand fallback capacity for
``switch_to_on_demand``. The clock, the webhook transport and the capacity request are
injected; the defaults are ``time.time``, urllib and ``ray.autoscaler.sdk.request_resources``.

Definitions (``docs/goodput-and-cost.md``):

- goodput: productive seconds over wall seconds so far (see ``raytrain_spot.cost.live``);
  judged once the run has ``min_wall_s`` of wall time, so startup alone cannot fire it.
- preemption rate: Spot preemptions in the trailing ``window_s`` divided by the Spot
  node-hours in that window - preemptions per Spot node-hour, the hazard rate 1/MTBI of one
  Spot VM. 0.40 means a Spot VM lasts 2.5 h on average. Judged once the window holds
  ``min_spot_node_hours`` of exposure.

An alert fires when its metric crosses the threshold (goodput strictly below, rate strictly
above) and stays quiet until the metric has come back past the threshold by ``rearm_margin``.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from raytrain_spot.cost.live import RunningTotals
from raytrain_spot.cost.pricing import PriceCatalog
from raytrain_spot.config.monitoring import (DURABLE_UPLOAD_FAILED, LOW_GOODPUT, NO_CAPACITY, NOTIFY,
                                             SWITCH_TO_ON_DEMAND, AlertConfig, AlertRule)
from raytrain_spot.config.redaction import scrub
from raytrain_spot.observe.records import Alert, CheckpointFailed, EventRecord

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Observation:
    """The figures the policy judges, at one instant."""

    now: float
    wall_s: float
    goodput: Optional[float]
    preemptions_in_window: int
    spot_node_hours_in_window: float
    short_of_capacity_s: float = 0.0
    """How long the alive nodes have been unable to hold trainer.min_workers workers."""

    @property
    def preemption_rate(self) -> Optional[float]:
        if self.spot_node_hours_in_window <= 0:
            return None
        return self.preemptions_in_window / self.spot_node_hours_in_window


def observe(totals: RunningTotals, now: float, window_s: float) -> Observation:
    count, node_hours = totals.preemption_rate(now, window_s)
    return Observation(now, totals.wall_s(now), totals.goodput(now), count, node_hours,
                       totals.short_of_capacity_s(now))


@dataclass(frozen=True)
class AlertDecision:
    """An alert that fired, with the numbers behind it."""

    rule: AlertRule
    value: float
    reason: str


class AlertPolicy:
    """Judges observations against the rules; remembers only which alerts are armed."""

    def __init__(self, config: AlertConfig):
        self.config = config
        self._armed = [True] * len(config.rules)

    def decide(self, observation: Observation) -> List[AlertDecision]:
        decisions = []
        for index, rule in enumerate(self.config.rules):
            value, context = self._metric(rule, observation)
            if value is None:
                continue
            crossed = value < rule.threshold if rule.type == LOW_GOODPUT else value > rule.threshold
            recovered = (value >= rule.threshold + rule.rearm_margin if rule.type == LOW_GOODPUT
                         else value <= rule.threshold - rule.rearm_margin)
            if crossed and self._armed[index]:
                self._armed[index] = False
                side = "below" if rule.type == LOW_GOODPUT else "above"
                decisions.append(AlertDecision(rule, value, f"{rule.type}: {value:.3f} {side} {rule.threshold:g} "
                                                            f"({context}) -> {rule.action}"))
            elif recovered:
                self._armed[index] = True
        return decisions

    def _metric(self, rule: AlertRule, observation: Observation):
        if rule.type == LOW_GOODPUT:
            if observation.goodput is None or observation.wall_s < self.config.min_wall_s:
                return None, ""
            return observation.goodput, f"over {observation.wall_s:.0f} s of wall time"
        if rule.type == NO_CAPACITY:
            return observation.short_of_capacity_s, "seconds the alive nodes could not hold trainer.min_workers"
        if observation.spot_node_hours_in_window < self.config.min_spot_node_hours:
            return None, ""
        return observation.preemption_rate, (f"{observation.preemptions_in_window} preemptions in "
                                             f"{observation.spot_node_hours_in_window:.2f} Spot node-hours, "
                                             f"last {self.config.window_s:.0f} s")


def post_json(url: str, payload: Dict[str, Any], timeout_s: float) -> int:
    """POST ``payload`` as JSON; return the HTTP status."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.status


def request_on_demand_capacity(bundles: List[Dict[str, float]]) -> None:
    """Ask Ray's autoscaler to keep room for ``bundles`` (replaces any earlier request)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


class AlertRunner:
    """Feeds records into running totals, asks the policy on every ``tick`` and acts on its decisions."""

    def __init__(self, config: AlertConfig, catalog: PriceCatalog, emit: Callable[[EventRecord], None],
                 clock: Callable[[], float] = time.time,
                 post: Callable[[str, Dict[str, Any], float], int] = post_json,
                 request_capacity: Callable[[List[Dict[str, float]]], None] = request_on_demand_capacity,
                 region: Optional[str] = None):
        self.config = config
        self.policy = AlertPolicy(config)
        self.totals = RunningTotals(catalog, region)
        self._emit, self._clock, self._post, self._request_capacity = emit, clock, post, request_capacity

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("ev") != Alert.ev:
            self.totals.feed(record)
        if record.get("ev") == CheckpointFailed.ev and record.get("tier") == "durable":
            self._tell({"t": self._clock(), "alert": DURABLE_UPLOAD_FAILED, "action": NOTIFY, "step": record["step"],
                        "reason": f"checkpoint step {record['step']} did not reach durable storage "
                                  f"({record.get('error', 'unknown error')}); retrying in "
                                  f"{record.get('retry_in_s', '?')} s"})

    def tick(self) -> List[AlertDecision]:
        now = self._clock()
        decisions = self.policy.decide(observe(self.totals, now, self.config.window_s))
        for decision in decisions:
            self._act(decision, now)
        return decisions

    def close(self) -> None:
        """Nothing to release; here so the runner is a sink like the others."""

    def _act(self, decision: AlertDecision, now: float) -> None:
        rule = decision.rule
        fields: Dict[str, Any] = {"t": now, "alert": rule.type, "action": rule.action, "value": decision.value,
                                  "threshold": rule.threshold, "reason": decision.reason}
        if rule.action == SWITCH_TO_ON_DEMAND:
            bundles = [dict(self.config.fallback_bundle) for _ in range(self.config.fallback_nodes)]
            try:
                self._request_capacity(bundles)
                fields["requested_bundles"] = bundles
            except Exception as error:  # the alert must still be told
                fields["request_error"] = f"{type(error).__name__}: {error}"
        self._tell(fields)

    def _tell(self, fields: Dict[str, Any]) -> None:
        """Deliver an alert: the webhook (if any), the log and the event log."""
        if self.config.webhook_url:
            try:
                fields["webhook_status"] = self._post(self.config.webhook_url,
                                                      {"text": f"raytrain-spot alert: {fields['reason']}", **fields},
                                                      self.config.webhook_timeout_s)
            except Exception as error:  # a dead webhook must not stop training
                fields["webhook_error"] = scrub(f"{type(error).__name__}: {error}", [self.config.webhook_url])
        logger.warning("alert %s", " ".join(f"{k}={v}" for k, v in fields.items() if k != "t"))
        self._emit(Alert(**fields))
