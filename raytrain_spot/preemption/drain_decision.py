"""What a preemption notice calls for, decided without touching the outside world: the notice
(metadata or SIGTERM), the watcher's settings, and the drain deadline GCE's timing implies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

GCE_SHUTDOWN_S = 30.0
"""Seconds GCE leaves between the ACPI soft-off (SIGTERM in the guest) and the hard stop."""
GCE_NOTICE_S = GCE_SHUTDOWN_S
"""Seconds between the metadata notice and the hard stop without an advance notice: the metadata
value turns TRUE at the soft-off. With ``scheduling.preemptionNoticeDuration`` it is that plus 30."""
NoticeSource = Literal["metadata", "sigterm"]


@dataclass(frozen=True)
class Backoff:
    """Capped exponential delays between retries."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 5.0
    """Low enough that a metadata server that comes back mid-notice is heard within seconds."""

    def __post_init__(self):
        if self.initial_s <= 0 or self.factor < 1 or self.max_s < self.initial_s:
            raise ValueError(f"backoff needs initial_s > 0, factor >= 1 and max_s >= initial_s, got {self}")

    def delay_s(self, failures: int) -> float:
        """Delay after the ``failures``-th consecutive failure (1-based)."""
        return min(self.max_s, self.initial_s * self.factor ** (failures - 1))


@dataclass(frozen=True)
class WatcherSettings:
    margin_s: float = 5.0
    """Drain deadline = notice + notice_s - margin_s: the node must count as preempted before
    it dies, or survivors' collective errors arrive first and Ray Train charges a plain failure."""
    notice_s: float = GCE_NOTICE_S
    """Seconds from the metadata notice to the hard stop: 30 on GCE, 30 + the VM's
    ``preemptionNoticeDuration`` with an advance notice (150 for 120 s); the simulator may compress it."""
    shutdown_s: float = GCE_SHUTDOWN_S
    """Seconds from SIGTERM (the ACPI soft-off) to the hard stop (or ``notice_s``, if shorter): an
    advance notice moves the metadata notice earlier, never the soft-off. A SIGTERM heard first (the
    metadata server was down, or the watcher started late) leaves only this long."""
    poll_timeout_s: float = 60.0
    """``timeout_sec`` of each metadata long-poll; bounds how long a hung server goes unnoticed."""
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self):
        if self.margin_s < 0:
            raise ValueError(f"--margin-s must be >= 0, got {self.margin_s}")
        if self.notice_s <= self.margin_s:
            raise ValueError(f"--margin-s ({self.margin_s}) must be below --notice-s ({self.notice_s}), "
                             "or the drain deadline would be at or before the notice")
        if self.shutdown_s <= 0:
            raise ValueError(f"shutdown_s must be > 0, got {self.shutdown_s}")
        if self.poll_timeout_s < 1:
            raise ValueError(f"--poll-timeout-s must be >= 1 (the metadata server counts whole seconds), "
                             f"got {self.poll_timeout_s}")


@dataclass(frozen=True)
class Notice:
    """A preemption notice as this node heard it."""

    source: NoticeSource
    at_s: float
    """Unix seconds when the watcher heard it."""


@dataclass(frozen=True)
class DrainDecision:
    node_id: str
    notice: Notice
    notice_s: float
    margin_s: float

    @property
    def hard_stop_s(self) -> float:
        """When GCE stops the VM (unix seconds)."""
        return self.notice.at_s + self.notice_s

    @property
    def deadline_s(self) -> float:
        """The drain deadline handed to Ray (unix seconds), margin_s before the hard stop; never
        before the notice (a SIGTERM leaves less time than the metadata notice the margin fits)."""
        return max(self.notice.at_s, self.hard_stop_s - self.margin_s)

    @property
    def deadline_ms(self) -> int:
        return round(self.deadline_s * 1000)

    @property
    def message(self) -> str:
        """The drain's reason message, visible in Ray's node state."""
        return (f"GCE preemption notice ({self.notice.source}) at {self.notice.at_s:.3f}; "
                f"VM stops at {self.hard_stop_s:.3f}")


def notice_window_s(source: NoticeSource, settings: WatcherSettings) -> float:
    """Seconds from a notice of this source to the hard stop. The metadata notice comes
    ``notice_s`` before it; SIGTERM comes at the soft-off, ``shutdown_s`` before it (or with the
    metadata notice, when there is no advance notice and ``notice_s`` is the shorter)."""
    return settings.notice_s if source == "metadata" else min(settings.notice_s, settings.shutdown_s)


def decide_drain(notice: Notice, node_id: str, settings: WatcherSettings) -> DrainDecision:
    """The drain a notice calls for."""
    return DrainDecision(node_id=node_id, notice=notice, notice_s=notice_window_s(notice.source, settings),
                         margin_s=settings.margin_s)
