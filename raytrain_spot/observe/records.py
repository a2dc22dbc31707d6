"""The event log's schema: one record class per kind of line in ``events.jsonl``.

A line is ``{"t": unix seconds, "ev": KIND, ...fields}``: ``ev`` is the class's ``ev``, the fields
are the class's fields in declaration order. A field without a default is on every line (``null``
where None); a field that defaults to None is left off the line while None, as emitters that do
not know it leave it off. ``EventLog.emit`` (observe/events.py) takes a record and writes
``to_line``'s dict; readers stream the lines as dicts and compare ``line["ev"]`` with a class's
``ev`` (``Step.ev``): a long run's log is millions of lines, so nothing parses them back into records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type


@dataclass(frozen=True, kw_only=True)
class EventRecord:
    """One line of the event log."""

    ev: ClassVar[str]
    """The line's ``ev``: which kind of record it is."""


# -- the cluster and the Spot simulator ----------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Start(EventRecord):
    """The driver started."""

    ev: ClassVar[str] = "start"
    run: str
    """The run's name (``run.name``)."""
    strategy: str
    """The strategy the run meets Spot with (loop/strategy.py): ``raytrain-spot``, or a benchmark
    baseline's name (bench/baselines.py: ``plain-ray-train``, ``ray-preemption-api``)."""
    embedded: bool
    """Whether the run started its own local Ray cluster."""
    dataset: Any
    """What the task prepared (its dataset's description)."""
    min_workers: int
    """The smallest worker group the run trains with."""
    max_workers: int
    """The largest worker group the run trains with."""


@dataclass(frozen=True, kw_only=True)
class Add(EventRecord):
    """A node joined the cluster."""

    ev: ClassVar[str] = "add"
    node: str
    """Ray's node id."""
    node_type: str
    """The node's type (the cluster YAML's, or the embedded cluster's)."""
    pricing: str
    """``spot`` or ``on_demand``: how the ledger prices the node."""
    gpus: float
    """GPUs on the node."""


@dataclass(frozen=True, kw_only=True)
class Chaos(EventRecord):
    """The Spot simulator started its clock."""

    ev: ClassVar[str] = "chaos"
    mode: str
    """How it preempts (``chaos.mode``)."""
    trace: Optional[str]
    """The preemption trace it replays, if any."""
    tick_s: float
    """Seconds between its ticks."""
    ticks: int
    """Ticks it has scheduled."""
    notice_s: float
    """Seconds from a preemption notice to the kill."""
    watchers: bool
    """Whether each node runs a preemption watcher."""


@dataclass(frozen=True, kw_only=True)
class Notice(EventRecord):
    """The Spot simulator gave a node its preemption notice."""

    ev: ClassVar[str] = "notice"
    node: str
    """Ray's node id."""
    notice_s: float
    """Seconds until the node is killed."""


@dataclass(frozen=True, kw_only=True)
class SoftOff(EventRecord):
    """The Spot simulator's ACPI soft-off of a noticed node: its Ray processes got SIGTERM."""

    ev: ClassVar[str] = "soft_off"
    node: str
    """Ray's node id."""
    ray_unit: str
    """The systemd unit (or service) that runs Ray on the node."""
    sigterm: str
    """Which processes the SIGTERM reached."""


@dataclass(frozen=True, kw_only=True)
class Drain(EventRecord):
    """Ray drained a node: the preemption notice as Ray sees it."""

    ev: ClassVar[str] = "drain"
    node: str
    """Ray's node id."""
    deadline: Optional[float]
    """Unix seconds when the node goes; None for a drain without deadline."""


@dataclass(frozen=True, kw_only=True)
class Kill(EventRecord):
    """A node died."""

    ev: ClassVar[str] = "kill"
    node: str
    """Ray's node id."""
    with_notice: bool
    """Whether it had a preemption notice (a drain) before it died."""


@dataclass(frozen=True, kw_only=True)
class Remove(EventRecord):
    """A node left the cluster without dying."""

    ev: ClassVar[str] = "remove"
    node: str
    """Ray's node id."""


@dataclass(frozen=True, kw_only=True)
class ReplacementRequested(EventRecord):
    """The driver asked the autoscaler for a noticed node's replacement while its VM runs out an
    advance notice (preemption/replacements.py)."""

    ev: ClassVar[str] = "replacement_requested"
    node: str
    """The noticed node's Ray id."""
    workers: int
    """Workers on it."""
    bundles: int
    """Worker bundles requested in all."""
    bundle: Dict[str, float]
    """One worker's resources."""
    until: float
    """Unix seconds when GCE's shutdown of the node starts."""


# -- the worker group ------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Handoff(EventRecord):
    """The group checkpoints and restarts on purpose (loop/handoff.py)."""

    ev: ClassVar[str] = "handoff"
    reason: str
    """``preemption`` or ``regrow``."""
    step: int
    """The step the group ends at, checkpointed just in time."""
    world_size: int
    """The ending group's size."""
    preempted_ranks: Optional[List[int]] = None
    """Preemption: the ranks on the noticed nodes."""
    nodes: Optional[List[str]] = None
    """Preemption: the noticed nodes' ids."""
    grow_to: Optional[int] = None
    """Regrow: the size the group restarts at."""


@dataclass(frozen=True, kw_only=True)
class Group(EventRecord):
    """A worker group started training."""

    ev: ClassVar[str] = "group"
    world_size: int
    """Ranks in the group."""
    step: int
    """The step it starts after."""
    restored_step: Optional[int]
    """The checkpoint step it restored; None for a fresh start."""
    startup_s: Dict[str, float]
    """Seconds of each startup phase."""
    nodes: List[str]
    """The node id of each rank."""
    process_age_s: Optional[List[float]] = None
    """Age of each rank's process: older than the restart where it started in a warm standby."""
    warm_standby: Optional[bool] = None
    """Whether this group keeps warm standbys."""
    capacity_wait_s: Optional[float] = None
    """Seconds the scaling policy waited for capacity before it started this group (too few workers fit)."""


@dataclass(frozen=True, kw_only=True)
class Restore(EventRecord):
    """The group loaded a checkpoint."""

    ev: ClassVar[str] = "restore"
    step: int
    """The checkpoint's step."""
    tier: str
    """Where it came from: ``local``, ``head``, ``durable`` or ``peer``."""
    duration_s: float
    """Seconds the load took."""
    read_s: Optional[float] = None
    """Of ``duration_s``, rank 0's own work: reading, verifying and applying its copy. The rest is
    waiting at the restore's collectives (for the slowest rank to arrive, or for a peer's copy)."""


@dataclass(frozen=True, kw_only=True)
class RestoreMismatch(EventRecord):
    """Ranks loaded copies of one step that verified yet differ; every rank took rank 0's."""

    ev: ClassVar[str] = "restore_mismatch"
    step: int
    """The step loaded."""
    digests: List[str]
    """Each rank's content digest, by rank."""


@dataclass(frozen=True, kw_only=True)
class Resize(EventRecord):
    """The world size changed across a restart."""

    ev: ClassVar[str] = "resize"
    old_world_size: int
    """The size the restored checkpoint was saved at."""
    world_size: int
    """The new group's size."""
    step: int
    """The step the new group starts after."""


@dataclass(frozen=True, kw_only=True)
class NoticeHold(EventRecord):
    """Rank 0 changed its mind about holding a preemption notice (preemption/hold.py)."""

    ev: ClassVar[str] = "notice_hold"
    step: int
    """The step it decided at."""
    hold: bool
    """Whether the group trains on instead of handing off at once."""
    reason: str
    """Why, in words."""
    usable_workers: Optional[int]
    """Workers the group could restart with."""
    deadline_in_s: Optional[float]
    """Seconds left until the noticed nodes' drain deadline."""
    needed_s: Optional[float]
    """A step, the checkpoint's commit and the margin: what the handoff needs before the deadline."""
    standbys_missing: Optional[int]
    """Warm standbys still importing where the group would restart."""


@dataclass(frozen=True, kw_only=True)
class RegrowDecision(EventRecord):
    """The regrow rule decided to grow, or held by another rule than the last (elastic/regrow.py)."""

    ev: ClassVar[str] = "regrow_decision"
    step: int
    """The step it decided at."""
    world_size: int
    """The group's size."""
    target: int
    """Workers the extra capacity adds."""
    grow: bool
    """Whether the group restarts larger."""
    reason: str
    """Why, in words."""
    gain: float
    """Samples/s more at the target size."""
    cost: float
    """Samples the regrow is expected to cost."""
    break_even_s: float
    """Seconds at the target size that pay the cost back."""
    wait_s: float
    """Age the capacity must reach before the regrow."""


# -- training ----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Step(EventRecord):
    """An optimizer step finished (rank 0's record)."""

    ev: ClassVar[str] = "step"
    step: int
    """The step's number, from 1."""
    world_size: int
    """Ranks that trained it."""
    samples: List[int]
    """[first, end) positions in the run's sample order."""
    loss: float
    """Mean loss over the global batch."""
    lr: float
    """The learning rate it used."""
    grad_norm: float
    """The gradients' total norm before clipping."""
    duration_s: float
    """Seconds of rank 0's step: loading, training and the agreement."""
    data_s: float
    """The loading part of ``duration_s``."""


@dataclass(frozen=True, kw_only=True)
class Samples(EventRecord):
    """Sample ids one rank trained on in a step, when ``run.log_sample_ids`` is on. In the file the ids
    are ``ids_packed`` (observe/events.py's ``pack_ids``)."""

    ev: ClassVar[str] = "samples"
    step: int
    """The step."""
    rank: int
    """The rank that trained them."""
    ids: List[int]
    """Dataset row numbers, ascending."""


@dataclass(frozen=True, kw_only=True)
class Eval(EventRecord):
    """The task's evaluation set, evaluated after a step (loop/evaluate.py): every ``eval.every_steps``
    and at the run's end."""

    ev: ClassVar[str] = "eval"
    step: int
    """The step whose weights were evaluated."""
    loss: float
    """Mean per-sample loss over the set, each sample counted once."""
    samples: int
    """Samples in the set."""
    duration_s: float
    """Seconds the evaluation took (no step trains meanwhile)."""
    examples: Optional[List[Dict[str, str]]] = None
    """What the model does now, as text (``TrainingTask.eval_examples``: an HF VLM's captions of a few
    fixed images beside their references); left off where the task gives none."""


@dataclass(frozen=True, kw_only=True)
class Stopped(EventRecord):
    """Rank 0 stopped the loop because the driver asked (loop/stop.py)."""

    ev: ClassVar[str] = "stopped"
    step: int
    """The last step trained; the final checkpoint holds it."""


@dataclass(frozen=True, kw_only=True)
class Advice(EventRecord):
    """The checkpoint interval advisor changed its mind (checkpoint/advisor.py's ``IntervalDecision``)."""

    ev: ClassVar[str] = "advice"
    interval_steps: int
    """Steps between periodic checkpoints."""
    interval_s: float
    """The same in seconds."""
    young_daly_s: float
    """Young/Daly's optimal interval from the stall and the job's MTBI."""
    stall_s: float
    """Seconds a checkpoint blocks training."""
    commit_s: float
    """Seconds from snapshot to commit: the interval's floor."""
    mtbi_s: float
    """The job's mean time between interruptions."""
    interruptions: int
    """Interruptions observed."""
    observed_s: float
    """Training seconds observed."""
    step_time_s: float
    """Seconds per step."""


# -- checkpoints -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Checkpoint(EventRecord):
    """A checkpoint committed on a tier."""

    ev: ClassVar[str] = "checkpoint"
    step: int
    """The checkpoint's step."""
    tier: str
    """``head`` or ``durable``; ``local``: a handoff's copies on the nodes that stay, which the next
    group copies on to the shared tiers (its ``head`` or ``durable`` record follows then)."""
    kind: str
    """``periodic``, ``jit``, ``final`` or ``survivor``."""
    stall_s: float
    """Seconds training blocked for it."""
    duration_s: float
    """Seconds from snapshot to commit."""
    bytes: int
    """Its size."""


@dataclass(frozen=True, kw_only=True)
class CheckpointCancelled(EventRecord):
    """A periodic save gave way to a just-in-time one before it committed."""

    ev: ClassVar[str] = "checkpoint_cancelled"
    step: int
    """The cancelled save's step."""
    kind: str
    """Its kind (``periodic``)."""
    tier: Optional[str] = None
    """The tier it was committing on; None: it was still being written."""
    reason: str
    """Why, in words."""


@dataclass(frozen=True, kw_only=True)
class JitLate(EventRecord):
    """A just-in-time checkpoint at a notice committed after the node's drain deadline."""

    ev: ClassVar[str] = "jit_late"
    step: int
    """The checkpoint's step."""
    late_by_s: float
    """Seconds after the deadline it committed."""
    deadline: float
    """The drain deadline, unix seconds."""


@dataclass(frozen=True, kw_only=True)
class CheckpointFailed(EventRecord):
    """A save failed; the previous checkpoint stays the latest."""

    ev: ClassVar[str] = "checkpoint_failed"
    step: int
    """The failed save's step."""
    kind: str
    """``periodic``, ``jit`` or ``final``."""
    tier: Optional[str] = None
    """The tier that failed, when one tier failed."""
    error: str
    """The error, in words."""
    retry_in_s: Optional[float] = None
    """Seconds until the head retries a durable upload."""


# -- the driver --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Alert(EventRecord):
    """An alert fired (monitor/alerts.py)."""

    ev: ClassVar[str] = "alert"
    t: float
    """The line's ``t``: when the alert fired, by the alert runner's clock."""
    alert: str
    """The alert's type."""
    action: str
    """What it does (``notify``, ``switch_to_on_demand``)."""
    value: Optional[float] = None
    """The metric's value (a rule's alert)."""
    threshold: Optional[float] = None
    """The rule's threshold (a rule's alert)."""
    step: Optional[int] = None
    """The checkpoint step that did not reach durable storage (a failed upload's alert)."""
    reason: str
    """Why, in words."""
    requested_bundles: Optional[List[Dict[str, float]]] = None
    """On-demand bundles requested from the autoscaler."""
    request_error: Optional[str] = None
    """Why that request failed."""
    webhook_status: Optional[int] = None
    """The webhook's HTTP status."""
    webhook_error: Optional[str] = None
    """Why the webhook failed."""


@dataclass(frozen=True, kw_only=True)
class StopRequested(EventRecord):
    """The driver got a signal and asked the run to stop (loop/stop.py)."""

    ev: ClassVar[str] = "stop_requested"
    signal: str
    """The signal's name (``SIGINT``, ``SIGTERM``)."""


@dataclass(frozen=True, kw_only=True)
class End(EventRecord):
    """The driver finished."""

    ev: ClassVar[str] = "end"
    status: str
    """``finished`` or ``failed``."""
    error: Optional[str]
    """Why it failed; None when it finished."""


RECORDS: Dict[str, Type[EventRecord]] = {cls.ev: cls for cls in (
    Start, Add, Chaos, Notice, SoftOff, Drain, Kill, Remove, ReplacementRequested,
    Handoff, Group, Restore, RestoreMismatch, Resize, NoticeHold, RegrowDecision,
    Step, Samples, Eval, Stopped, Advice,
    Checkpoint, CheckpointCancelled, JitLate, CheckpointFailed,
    Alert, StopRequested, End,
)}
"""Every record class by its ``ev``."""

_LINE_FIELDS: Dict[Type[EventRecord], Tuple[Tuple[str, bool], ...]] = {
    cls: tuple((f.name, f.default is None) for f in dataclasses.fields(cls)) for cls in RECORDS.values()}
"""Per class, its fields in order, each with whether it is left off the line while None."""


def to_line(record: EventRecord, t: float) -> Dict[str, Any]:
    """The record as its line's dict: ``t``, ``ev``, then the fields (an ``Alert`` sets its own ``t``).

    Not ``dataclasses.asdict``: that deep-copies every value, and a step's record is made every step."""
    line: Dict[str, Any] = {"t": t, "ev": record.ev}
    for name, optional in _LINE_FIELDS[type(record)]:
        value = getattr(record, name)
        if value is not None or not optional:
            line[name] = value
    return line
