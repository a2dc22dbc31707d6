"""What a checkpoint holds: named stateful parts and the loop state.

The training loop hands the checkpoint manager a dict of ``Stateful`` parts (the model, the
optimizer, and whatever extra state the task declares), the way torchtitan's checkpointer takes
``Stateful`` objects, and a ``LoopState``. The learning-rate schedule and the random streams
need no state of their own: the learning rate is a function of ``samples_seen`` and every step
reseeds from (seed, step, rank), so the loop state determines both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Protocol, runtime_checkable

LOOP_STATE = "loop"
"""Key of the loop state in a checkpoint's state; the parts use their own names."""


@runtime_checkable
class Stateful(Protocol):
    """Anything a checkpoint can hold: torch modules and optimizers are Stateful already."""

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> Any: ...


@dataclass
class LoopState:
    """Where training is. ``samples_seen`` is also the data cursor: the next step starts at that
    position of the global sample order."""

    step: int = 0
    samples_seen: int = 0
    interruptions: int = 0
    """Notices and failures so far: the checkpoint advisor's evidence."""
    train_time_s: float = 0.0
    """Wall time spent in steps so far."""


class StateMismatch(ValueError):
    """A checkpoint does not hold the parts this run needs: it was saved by another task."""


def training_state(parts: Mapping[str, Stateful], loop: LoopState) -> Dict[str, Any]:
    """The state nest a checkpoint saves: every part's state dict and the loop state."""
    if LOOP_STATE in parts:
        raise ValueError(f"a stateful part may not be called {LOOP_STATE!r}: the loop state has that name")
    return {**{name: part.state_dict() for name, part in parts.items()}, LOOP_STATE: asdict(loop)}


def load_training_state(parts: Mapping[str, Stateful], state: Mapping[str, Any]) -> LoopState:
    """Load every part from ``state``; return its loop state."""
    missing = sorted(set(parts) - set(state))
    if missing:
        raise StateMismatch(f"the checkpoint holds {sorted(k for k in state if k != LOOP_STATE)}, not "
                            f"{missing} that this run's task needs")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    return LoopState(**state[LOOP_STATE])
