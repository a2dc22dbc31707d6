"""What a run reports while it runs: the monitoring sinks it writes to and the alerts it judges
(raytrain_spot/monitor/ acts on them)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from raytrain_spot.config.errors import ConfigError, require, require_non_negative, require_positive
from raytrain_spot.config.redaction import REDACTED, SECRET


@dataclass
class MonitoringConfig:
    """Which monitoring backends a run writes to."""

    tensorboard: bool = True
    """Write TensorBoard event files under ``<run dir>/tensorboard``."""
    wandb_project: Optional[str] = None
    """Also log to this Weights & Biases project when ``wandb`` is importable (the ``trackers``
    extra); unset: no W&B."""
    wandb_mode: str = "offline"
    """W&B mode: ``offline`` (sync later with ``wandb sync``) or ``online``."""
    ray_metrics: bool = True
    """Export step, loss, goodput, world size, cost, preemptions and the last durable checkpoint as
    Ray metrics (scraped by Prometheus from every node's metrics agent)."""

    def __post_init__(self):
        require(self.wandb_mode in ("offline", "online"), "monitoring.wandb_mode", f"{self.wandb_mode!r} is not a mode",
                "use monitoring.wandb_mode=offline or online")



LOW_GOODPUT = "low_goodput"
HIGH_PREEMPTION_RATE = "high_preemption_rate"
NO_CAPACITY = "no_capacity"
DURABLE_UPLOAD_FAILED = "durable_upload_failed"
"""Not a rule: every failed upload to storage.uri is told at once (the run's safety net is missing)."""
NOTIFY = "notify"
SWITCH_TO_ON_DEMAND = "switch_to_on_demand"


@dataclass
class AlertRule:
    """One alert: a metric, a threshold and what to do when it is crossed."""

    type: str
    """``low_goodput`` (fires below the threshold), ``high_preemption_rate`` or ``no_capacity`` (fire above it)."""
    threshold: float
    """Goodput as a fraction, preemptions per Spot node-hour, or seconds without room for
    trainer.min_workers workers (all Spot capacity gone)."""
    action: str
    """``notify`` or ``switch_to_on_demand``."""
    rearm_margin: float = 0.05
    """How far back past the threshold the metric must come before the alert can fire again."""

    def __post_init__(self):
        require(self.type in (LOW_GOODPUT, HIGH_PREEMPTION_RATE, NO_CAPACITY), "alerts.rules[].type",
                f"{self.type!r} is not an alert type", f"use {LOW_GOODPUT}, {HIGH_PREEMPTION_RATE} or {NO_CAPACITY}")
        require(self.action in (NOTIFY, SWITCH_TO_ON_DEMAND), "alerts.rules[].action",
                f"{self.action!r} is not an action", f"use {NOTIFY} or {SWITCH_TO_ON_DEMAND}")
        require_non_negative("alerts.rules[]", self, "rearm_margin")


def seed_rules() -> List[AlertRule]:
    """The seed guide's alerts (goodput < 0.70 -> notify; preemption rate > 0.40 -> switch to
    on-demand), and a run that has had no room for its minimum workers for 5 minutes -> notify."""
    return [AlertRule(LOW_GOODPUT, 0.70, NOTIFY), AlertRule(HIGH_PREEMPTION_RATE, 0.40, SWITCH_TO_ON_DEMAND),
            AlertRule(NO_CAPACITY, 300.0, NOTIFY)]


@dataclass
class AlertConfig:
    """How alerts are judged and delivered."""

    rules: List[AlertRule] = field(default_factory=seed_rules)
    """The alerts to evaluate."""
    window_s: float = 3600.0
    """Trailing window of the preemption rate."""
    min_wall_s: float = 1800.0
    """Wall time before goodput is judged (startup alone is badput)."""
    min_spot_node_hours: float = 1.0
    """Spot exposure in the window before the rate is judged (one loss in a few node-minutes is noise)."""
    webhook_url: Optional[str] = field(default=None, metadata=SECRET)
    """POST every decision as JSON here (Slack-style ``text`` included); unset: no webhook. A secret
    (webhook URLs carry their token): never written to a file or a log, always ``https://``
    (``http://`` only to this machine, 127.0.0.1 or localhost)."""
    webhook_timeout_s: float = 5.0
    """Give up on the webhook after this long; the alert is still logged and recorded."""
    fallback_bundle: Dict[str, float] = field(default_factory=lambda: {"GPU": 1.0, "on_demand_fallback": 1.0})
    """Resources of one node of the on-demand fallback type. The custom resource makes the autoscaler
    pick that node type; declare it on the type in the cluster YAML."""
    fallback_nodes: int = 1
    """Fallback nodes to ask for on a switch."""

    def __post_init__(self):
        require_positive("alerts", self, "window_s", "webhook_timeout_s", "fallback_nodes")
        require_non_negative("alerts", self, "min_wall_s", "min_spot_node_hours")
        if self.webhook_url and self.webhook_url != REDACTED:
            parsed = urllib.parse.urlsplit(self.webhook_url)
            loopback = parsed.hostname in ("127.0.0.1", "localhost", "::1")
            if not (parsed.scheme == "https" or (parsed.scheme == "http" and loopback)) or not parsed.hostname:
                # The URL itself is not echoed: it is a secret.
                raise ConfigError(f"alerts.webhook_url: a {parsed.scheme or 'scheme-less'} URL is not allowed. Fix: "
                                  "give an https:// URL (http:// only to 127.0.0.1), e.g. "
                                  "alerts.webhook_url='${oc.env:ALERT_WEBHOOK}'")
