"""A stop asked of a run (Ctrl-C, SIGTERM or ``Run.stop()`` to its driver) reaching its workers.

The driver puts the request in the GCS key-value store under the run's name; rank 0 reads it
between steps and puts it in the step's agreement (loop/agreement.py), so every rank stops after
the same step, with the run's final checkpoint. Rank 0 reads the store at most every ``poll_s``:
one GCS read per second costs a step nothing, and a stop waits at most a step and a second.
"""

from __future__ import annotations

import time
from typing import Callable

STOP_NAMESPACE = "raytrain_spot_stop"


def _key(run_name: str) -> str:
    return f"stop/{run_name}"


def request_stop(run_name: str) -> None:
    """Driver: ask the workers of ``run_name`` to checkpoint and end after their current step."""
    from raytrain_spot._ray import internal_kv_put

    internal_kv_put(_key(run_name), "1", namespace=STOP_NAMESPACE)


def clear_stop(run_name: str) -> None:
    """Driver, as it starts: a request left by an earlier driver of the same run on a lasting
    cluster (``cluster=existing``) would stop this one at its first step."""
    from raytrain_spot._ray import internal_kv_del

    internal_kv_del(_key(run_name), namespace=STOP_NAMESPACE)


class StopPoll:
    """Rank 0's view of the request, read from the GCS at most every ``poll_s`` seconds."""

    def __init__(self, run_name: str, poll_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._run_name = run_name
        self._poll_s = poll_s
        self._clock = clock
        self._read_at = float("-inf")
        self._requested = False

    def __call__(self) -> bool:
        if not self._requested and self._clock() - self._read_at >= self._poll_s:
            from raytrain_spot._ray import internal_kv_get

            self._read_at = self._clock()
            self._requested = internal_kv_get(_key(self._run_name), namespace=STOP_NAMESPACE) is not None
        return self._requested
