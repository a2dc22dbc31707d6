"""What a checkpoint holds: named stateful parts and the loop state.

The training loop hands the checkpoint manager a dict of ``Stateful`` parts (the model, the
optimizer, and whatever extra state the task declares), the way torchtitan's checkpointer takes
``Stateful`` objects, and a ``LoopState``. The optimizer part is whatever optimizer the task
builds (``TrainingTask.build_optimizer``): its ``state_dict()`` holds its state (AdamW's moments,
SGD's momentum buffers). The learning-rate schedule and the random streams need no state of their
own: the learning rate is the task's function of ``samples_seen`` (``TrainingTask.learning_rate``)
and every step reseeds from (seed, step, rank), so the loop state determines both.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Protocol, Set, runtime_checkable

import torch

LOOP_STATE = "loop"
"""Key of the loop state in a checkpoint's state; the parts use their own names."""
FROZEN_FINGERPRINT = "_frozen_fingerprint"
"""Key, in the model's saved state, of the fingerprint of the parameters it leaves out."""
FINGERPRINT_STRIDE = 61
"""The fingerprint reads every 61st element of each frozen tensor (a prime: no alignment with a layout)."""


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
    samples_per_s: Dict[int, float] = field(default_factory=dict)
    """Throughput by world size in this run (samples over step seconds after each group's first
    steps): the regrow rule's evidence."""
    measured_s: Dict[int, float] = field(default_factory=dict)
    """Step seconds behind each of those rates."""
    restart_s: float = 0.0
    """Mean cost of this run's measured restarts (handoff to the next group's first step); 0: none yet."""
    restarts_measured: int = 0
    handed_off_at: float = 0.0
    """Unix time of the last handoff: the next group measures its restart from it."""
    commit_s: float = 0.0
    """What a checkpoint's commit to the shared tiers took lately (rank 0's longest of its last three;
    0: none yet): a notice hold's estimate, kept so a group that has not saved yet can hold too."""


class StateMismatch(ValueError):
    """A checkpoint does not hold the parts this run needs: it was saved by another task."""


class ModelWeights:
    """The model's part of a checkpoint: its buffers and the parameters it trains.

    Parameters that are frozen when the task has built the model (a LoRA base, a frozen vision
    tower) are not saved: every start rebuilds them the same way (from the model directory or the
    seeded init), and with a frozen base they are nearly all the bytes. In their place the state
    holds a fingerprint of them (element count, sum and sum of squares of a strided sample),
    checked at load, so a checkpoint never resumes on top of a different base. It is taken when
    the part is made, before training, so that no save stalls for it.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.frozen: Set[str] = {name for name, value in module.state_dict(keep_vars=True).items()
                                 if isinstance(value, torch.nn.Parameter) and not value.requires_grad}
        if self.frozen:
            self.fingerprint  # noqa: B018 - computed now, not inside the first save's stall

    def state_dict(self) -> Dict[str, Any]:
        return self.saved(self.module.state_dict())

    def load_state_dict(self, state: Dict[str, Any]) -> Any:
        return self.module.load_state_dict(self.completed(state))

    def saved(self, full_state: Dict[str, Any]) -> Dict[str, Any]:
        """What a checkpoint keeps of ``full_state`` (the module's state dict, FQN-keyed)."""
        kept = {name: value for name, value in full_state.items() if name not in self.frozen}
        if self.frozen:
            kept[FROZEN_FINGERPRINT] = self.fingerprint
        return kept

    def completed(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """A saved state with the frozen parameters filled in from the module, once their fingerprint matches."""
        state = dict(state)
        saved_fingerprint = state.pop(FROZEN_FINGERPRINT, None)
        if not self.frozen:
            if saved_fingerprint is not None:
                raise StateMismatch("the checkpoint was saved with frozen parameters (not saved) that this run "
                                    "trains: resume with the same freezing settings")
            return state
        if saved_fingerprint is None:
            raise StateMismatch(f"this run freezes {len(self.frozen)} parameters the checkpoint trained: resume "
                                "with the same freezing settings")
        ours = self.fingerprint
        if saved_fingerprint.shape != ours.shape or not torch.allclose(saved_fingerprint.double(), ours,
                                                                        rtol=1e-6, atol=1e-6):
            raise StateMismatch(f"the frozen parameters this run built (count, sum, sum of squares {ours.tolist()}) "
                                f"are not those the checkpoint was trained on ({saved_fingerprint.tolist()}): the "
                                "model directory changed. Resume with the base model the run started from")
        module_state = self.module.state_dict()
        return {**state, **{name: module_state[name] for name in self.frozen}}

    @functools.cached_property
    def fingerprint(self) -> torch.Tensor:
        """Computed once (frozen parameters do not change) over every ``FINGERPRINT_STRIDE``-th
        element: another base (another init, another pretrained file) differs everywhere, and a
        pass over a billion frozen weights would add seconds to every restart on a CPU. Reduced
        in float64 without float64 copies of the weights."""
        parameters = self.module.state_dict()
        with torch.no_grad():
            sampled = [parameters[name].reshape(-1)[::FINGERPRINT_STRIDE] for name in sorted(self.frozen)]
            count = sum(parameters[name].numel() for name in self.frozen)
            total = sum(float(s.sum(dtype=torch.float64)) for s in sampled)
            squares = sum(float(torch.linalg.vector_norm(s, dtype=torch.float64)) ** 2 for s in sampled)
        return torch.tensor([count, total, squares], dtype=torch.float64)


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
