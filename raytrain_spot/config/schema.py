"""Typed configuration: one dataclass per config group, registered in Hydra's ConfigStore.

YAML files under ``conf/`` only compose values; every field is declared here with its
meaning, and ``__post_init__`` rejects bad values with a message that names the key and
the fix. ``load_config`` turns a composed ``DictConfig`` into these objects, so a wrong
setting stops the run before Ray starts.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from raytrain_spot.config.errors import ConfigError, require, require_non_negative, require_positive
from raytrain_spot.config.monitoring import AlertConfig, MonitoringConfig
from raytrain_spot.config.redaction import redacted_dict


DEFAULT_TASK = "raytrain_spot.tasks.vlm.task.VisionLanguageTask"


def _namespace(storage_uri: str) -> str:
    return hashlib.sha256(storage_uri.encode()).hexdigest()[:12]


@dataclass
class TrainingRunConfig:
    """Identity of a run. Re-running with the same name resumes it."""

    name: str = "run"
    """Run name: the Hydra output directory, the checkpoint prefix and Ray Train's run name."""
    seed: int = 0
    """Seed for model initialisation, data order and every other random choice."""
    log_sample_ids: bool = False
    """Log the sample ids every rank trains on (``samples`` events), to audit exactly-once data."""
    show_ray_logs: bool = False
    """Also print Ray's own lines on the console (workers' and the Train controller's output, Ray
    Train's reports, errors relayed from the GCS, C++ log lines). Off, they go to the run's
    ``run.log`` and Ray's session logs, which the run's first line names."""

    def __post_init__(self):
        require(
            bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.name)),
            "run.name",
            f"{self.name!r} is not a valid run name (letters, digits, '.', '_', '-'; at most 128)",
            "pick a name such as run.name=vlm-exp1",
        )


@dataclass
class OptimConfig:
    """The optimizer's settings: AdamW with a learning rate that depends only on samples seen (so a
    resize never shifts it), unless the task brings its own (``TrainingTask.build_optimizer`` and
    ``learning_rate``, which get these settings)."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    warmup_samples: int = 1024
    """Linear warmup length in samples."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self):
        require_positive("optim", self, "lr")
        require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}",
                "set optim.min_lr_ratio=0.1")
        require(self.warmup_samples >= 0, "optim.warmup_samples", f"must be >= 0, got {self.warmup_samples}",
                "set optim.warmup_samples=0 to disable warmup")
        require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}",
                "set optim.grad_clip=0 to disable clipping")


REGROW_MODES = ("when_it_pays", "after_settle")
GPU_DATA_WORKERS = 2
"""Loader processes per GPU worker when trainer.data_workers is unset."""


@dataclass
class TrainerConfig:
    """Elastic data-parallel training: the worker range, the batch and the step budget."""

    min_workers: int = 1
    """Fewest workers training may run with; below it the run waits for capacity."""
    max_workers: int = 3
    """Most workers; the run grows back to this when nodes return."""
    global_batch_size: int = 48
    """Samples per optimizer step, whatever the world size (gradient accumulation fills the gap)."""
    micro_batch_size: int = 16
    """Most samples one worker puts through forward/backward at once."""
    max_steps: int = 300
    """Optimizer steps in the whole run."""
    use_gpu: bool = False
    """One GPU per worker, NCCL and bf16 autocast; false trains on CPU with gloo."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker."""
    torch_threads: int = 1
    """torch intra-op threads per worker (keep small when several workers share a machine)."""
    data_workers: Optional[int] = None
    """Processes per worker that read, process and collate its batches ahead of the steps that train them
    (torch DataLoader workers, as HF Trainer's ``dataloader_num_workers``): an HF processor's image tiling
    then runs beside the training thread, not on it. 0: the training thread loads each step's batch
    while the previous step's all-reduce is in flight. None (the default): 2 for GPU training, where a
    GPU would wait for batches loaded on the training thread; 0 for CPU training, where loader
    processes take cores from the training (on 2 cores both loops train slower with one:
    docs/benchmarks.md). Loading ahead changes no sample (loop/batches.py)."""
    max_failures: int = -1
    """Non-preemption failures to recover from; -1 recovers forever. Ray's default 0 would end a Spot run."""
    max_identical_failures: int = 3
    """Stop when the worker group fails this many times in a row with the same error and no handoff
    between: a bug, not a lost node (0: never stop for it)."""
    collective_timeout_s: float = 120.0
    """Process-group timeout: a survivor stuck in a collective with a vanished peer gives up after this."""
    startup_timeout_s: float = 1800.0
    """How long a new group's ranks wait for each other's node-local copies of the model and data
    (``TrainingTask.localize``) before their first collective: a fresh node copies a model from
    ``gs://`` while the others find theirs cached, which can take longer than collective_timeout_s."""
    log_every_steps: int = 10
    """Print a progress line every this many steps."""

    def __post_init__(self):
        require_positive("trainer", self, "min_workers", "max_workers", "global_batch_size", "micro_batch_size",
                         "max_steps", "cpus_per_worker", "torch_threads", "log_every_steps")
        require(self.min_workers <= self.max_workers, "trainer.min_workers",
                f"{self.min_workers} is above trainer.max_workers={self.max_workers}",
                "set trainer.min_workers <= trainer.max_workers")
        require(self.global_batch_size >= self.max_workers, "trainer.global_batch_size",
                f"{self.global_batch_size} leaves some of trainer.max_workers={self.max_workers} workers without a sample",
                f"set trainer.global_batch_size >= {self.max_workers}")
        require(self.max_failures >= -1, "trainer.max_failures", f"must be -1 or >= 0, got {self.max_failures}",
                "set trainer.max_failures=-1 to recover from every failure")
        require_non_negative("trainer", self, "max_identical_failures", "data_workers")
        require_positive("trainer", self, "collective_timeout_s", "startup_timeout_s")

    @property
    def loader_processes(self) -> int:
        """``data_workers``, resolved."""
        if self.data_workers is not None:
            return self.data_workers
        return GPU_DATA_WORKERS if self.use_gpu else 0

    @property
    def resources_per_worker(self) -> dict:
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}


@dataclass
class ElasticConfig:
    """How the group follows capacity: growing back, warm standbys, the wait after a loss."""

    regrow: str = "when_it_pays"
    """``when_it_pays``: regrow once the extra capacity's expected gain covers the restarts it costs,
    from this run's measured samples/s per world size, restart cost and node lifetimes
    (raytrain_spot/elastic/regrow.py); ``after_settle``: whenever it has stayed ``tuning.regrow_settle_s``."""
    warm_standby: Optional[bool] = None
    """Keep on every node of the group, and on every node that joins, one idle worker process per rank
    it can hold, with torch and the training code imported, so a restarted group (after a notice or for
    a regrow) starts in them instead of in cold processes. See raytrain_spot/elastic/standby.py.
    None (the default): on for GPU training on nodes with a machine of their own (a GCP GPU cluster), off
    for CPU training, which keeps the cores a standby imports on busy, and where nodes share one
    machine's cores (the embedded cluster, the local autoscaler's nodes): there a standby's imports come
    out of training, and cost more steps than its faster restarts save (docs/benchmarks.md). true/false:
    always/never."""
    notice_standby_wait_s: float = 10.0
    """Longest a group trains on after a notice that leaves it somewhere to go, while the nodes that
    stay start one standby process per rank they keep and import the stack into them at normal
    priority, so the group restarts in warm processes: on the embedded cluster the time it trains
    nothing fell from 9.5 s (cold processes) to 4.0 s, medians (docs/benchmarks.md). Also covers
    the usable nodes outside the group the restarted group takes. Ends as soon as they are warm (at
    once where the group keeps standbys that are), and never past what the drain deadline allows (a
    step, the checkpoint's commit and ``tuning.hold_margin_s`` before it); the hold begins with a
    checkpoint. 0: hand off at the notice. Needs warm_standby not false; see
    raytrain_spot/elastic/standby.py."""
    warm_wait_limit_s: float = 60.0
    """Longest a node outside the group is kept out of a regrow while it is not warm (its standby has
    not imported the stack yet; a group restarted onto it would wait for the import). 0: regrow onto
    cold nodes at once. See raytrain_spot/elastic/capacity.py."""
    standby_delay_s: float = 5.0
    """Seconds a group trains before its nodes start their standbys. A standby imports torch and the
    training code at idle priority (raytrain_spot/elastic/preload.py), but starting its process (the
    interpreter and Ray's worker, at normal priority) and, to a lesser degree, the imports take CPU
    that comes out of the group's first steps where nodes share cores. A group that ends sooner
    restarts in cold processes."""
    failure_settle_s: float = 4.0
    """After a failure without notice, wait up to this long for the cluster to declare dead nodes
    dead before sizing the new group; one health-check period (1 s) once it has declared one of the
    failed group's nodes dead (raytrain_spot/elastic/policy.py, SpotScalingPolicy)."""
    survivor_commit_s: float = 30.0
    """After a loss without notice, the longest Ray Train's controller waits for the surviving ranks to
    commit the last step they completed before it tears the group down (raytrain_spot/loop/survivor_commit.py):
    the run then redoes no step. Past it, the run resumes from its last checkpoint. Covers snapshotting
    the state and committing it to the node-local disk and the head. 0: no survivor commit. Not with
    checkpoint.sharded (its saves are collectives)."""

    def __post_init__(self):
        require(self.regrow in REGROW_MODES, "elastic.regrow", f"{self.regrow!r} is not a mode",
                f"use one of {', '.join(REGROW_MODES)}")
        require_non_negative("elastic", self, "notice_standby_wait_s", "warm_wait_limit_s", "standby_delay_s",
                             "failure_settle_s", "survivor_commit_s")


@dataclass
class EvalConfig:
    """Evaluation of the task's evaluation set (``TrainingTask.build_eval_dataset``; none: nothing to do)."""

    every_steps: int = 100
    """Evaluate every this many steps and at the run's end; 0: never."""

    def __post_init__(self):
        require_non_negative("eval", self, "every_steps")


@dataclass
class TuningConfig:
    """Expert timings, each defaulted from what was measured (docs/preemption.md, docs/benchmarks.md);
    change them to experiment, not to run."""

    resize_check_interval_s: float = 1.0
    """How often rank 0 checks whether more workers would fit (regrow)."""
    regrow_settle_s: float = 2.0
    """Extra capacity must stay at least this long before the group restarts to use it."""
    restart_prior_s: float = 10.0
    """What a group restart is taken to cost until this run has measured one (at a handoff)."""
    hold_on_notice: bool = True
    """When a notice leaves fewer than ``min_workers`` workers on nodes without one (the whole group
    noticed, nowhere to go), train on the noticed nodes and hand off just before their drain deadline
    (a step, the checkpoint's measured commit time and ``tuning.hold_margin_s`` before it), or at once when
    capacity appears elsewhere; handing off at the notice would only wait for capacity."""
    hold_margin_s: float = 1.0
    """Seconds of slack a notice hold leaves between the just-in-time checkpoint's expected commit and
    the drain deadline (which itself comes before the VM's hard stop: the watcher's ``--margin-s``)."""
    lease_ttl_s: float = 60.0
    """One driver owns a run name at a time (a lease in storage.uri, renewed every third of this).
    A second driver with the same name stops at start, once it sees the lease renewed; a dead
    driver's lease is free after it stood still this long on the next driver's clock, at once when
    it died on the same machine. A driver that cannot renew for this less a sixth stops itself."""

    def __post_init__(self):
        require_positive("tuning", self, "resize_check_interval_s")
        require_non_negative("tuning", self, "regrow_settle_s", "restart_prior_s", "hold_margin_s")
        require(self.lease_ttl_s >= 3, "tuning.lease_ttl_s", f"{self.lease_ttl_s} s leaves no time to renew",
                "set tuning.lease_ttl_s=60 (or at least 3)")


@dataclass
class CheckpointingConfig:
    """When checkpoints are taken, which tiers they go to, and how many are kept."""

    interval_steps: Optional[int] = None
    """Periodic checkpoint every this many steps; unset: the Young/Daly advisor decides; 0: none."""
    mtbi_prior_s: float = 6 * 3600.0
    """Advisor: prior mean time between interruptions of one Spot node (seconds; the seed guide's A100: 4-8 h)."""
    min_interval_s: float = 10.0
    """Advisor: never checkpoint more often than this."""
    max_interval_s: float = 1800.0
    """Advisor: never checkpoint less often than this."""
    keep_latest_k: int = 3
    """Checkpoints kept per tier, newest first (never fewer than 2)."""
    milestone_every_steps: int = 0
    """Checkpoints at multiples of this step are kept forever (0: none)."""
    use_local: bool = True
    """Keep a copy on every node's local disk (fast restore after a worker-process restart)."""
    use_head: bool = True
    """Ship checkpoints to the on-demand head node (fast restore after a Spot node loss)."""
    local_dir: str = "~/.cache/raytrain_spot/node-local"
    """Node-local tier root on every node (one subdirectory per Ray node), in the home of the user
    the workers run as. Created private (0700); a directory another user owns is refused."""
    head_dir: str = "~/.cache/raytrain_spot/head"
    """Head tier root on the head node. Created private (0700); a directory another user owns is refused."""
    durable_interval_s: float = 600.0
    """The head forwards a checkpoint to storage.uri at most this often (always the final one)."""
    compression: str = "none"
    """Compress the state file: none, zstd or lz4 (single-file checkpoints)."""
    sharded: bool = False
    """Every rank saves a share of the tensors through torch.distributed.checkpoint, so each rank copies and
    writes about 1/world_size of the bytes. Sharded checkpoints skip the node-local tier."""
    max_transfer_mbps: Optional[float] = None
    """Cap each worker's checkpoint traffic to the head (MB/s) so it never starves gradient traffic; unset: no cap."""
    final_upload_wait_s: float = 300.0
    """At the end, wait this long for the head to upload the final checkpoint to storage.uri; a run
    whose final checkpoint is not there by then ends with exit status 1 and says so."""
    allow_config_change: bool = False
    """Resume from a checkpoint saved with other model or data settings (``model.*``, ``data.*``,
    ``run.seed``). Off: such a resume stops before training, naming the settings that differ."""

    def head_root(self, storage_uri: str) -> str:
        """Head tier root of the runs stored at ``storage_uri``: same-named runs elsewhere never mix."""
        return os.path.join(os.path.expanduser(self.head_dir), _namespace(storage_uri))

    def local_root(self, storage_uri: str, node_id: str) -> str:
        """Node-local tier root of one node for the runs stored at ``storage_uri``."""
        return os.path.join(os.path.expanduser(self.local_dir), node_id, _namespace(storage_uri))

    def __post_init__(self):
        require(self.interval_steps is None or self.interval_steps >= 0, "checkpoint.interval_steps",
                f"must be unset (advisor), 0 (off) or positive, got {self.interval_steps}",
                "set checkpoint.interval_steps=null to let the advisor choose")
        require(self.keep_latest_k >= 2, "checkpoint.keep_latest_k",
                f"{self.keep_latest_k} would leave no fallback when the newest checkpoint is damaged",
                "set checkpoint.keep_latest_k=2 or more")
        require_positive("checkpoint", self, "mtbi_prior_s", "min_interval_s", "max_interval_s")
        require(self.min_interval_s <= self.max_interval_s, "checkpoint.min_interval_s",
                f"{self.min_interval_s} is above checkpoint.max_interval_s={self.max_interval_s}",
                "lower checkpoint.min_interval_s")
        require_non_negative("checkpoint", self, "milestone_every_steps", "durable_interval_s", "final_upload_wait_s")
        require(self.max_transfer_mbps is None or self.max_transfer_mbps > 0, "checkpoint.max_transfer_mbps",
                f"must be positive or unset, got {self.max_transfer_mbps}", "unset it, or give MB/s such as 200")
        require(self.compression in ("none", "zstd", "lz4"), "checkpoint.compression",
                f"{self.compression!r} is not supported", "use none, zstd or lz4")
        require(not (self.sharded and self.compression != "none"), "checkpoint.compression",
                f"{self.compression} applies to single-file checkpoints, not to checkpoint.sharded=true",
                "set checkpoint.compression=none, or checkpoint.sharded=false")


@dataclass
class StorageConfig:
    """Durable storage for checkpoints and Ray Train's run state."""

    uri: str = "outputs/storage"
    """Root for checkpoints: file:///abs/path, a local path (made absolute), or gs://bucket/prefix."""

    def __post_init__(self):
        if "://" in self.uri:
            scheme = self.uri.split("://", 1)[0]
            require(scheme in ("file", "gs"), "storage.uri", f"scheme {scheme!r} is not supported",
                    "use gs://bucket/prefix, file:///absolute/path or a local path")
        if self.uri.startswith("gs://"):
            bucket = self.uri[len("gs://"):].split("/", 1)[0]
            require(bool(re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", bucket)), "storage.uri",
                    f"{bucket!r} is not a valid GCS bucket name",
                    "use gs://<bucket>/<prefix> with a lowercase bucket name")

    def resolved_uri(self, base_dir: str) -> str:
        """The URI with a relative local path made absolute against ``base_dir``."""
        if "://" in self.uri:
            return self.uri.rstrip("/")
        path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(self.uri)))
        return "file://" + path


@dataclass
class ClusterConfig:
    """Where training runs: an embedded local multi-node Ray cluster, or an existing one."""

    address: Optional[str] = None
    """Unset: start the embedded local cluster. ``auto`` or host:port: join an existing cluster."""
    num_worker_nodes: int = 3
    """Embedded cluster only: virtual worker nodes (raylets) next to a head with no training resources."""
    cpus_per_node: int = 1
    """Embedded cluster only: logical CPUs per virtual worker node."""
    object_store_mb_per_node: int = 80
    """Embedded cluster only: object store of each raylet; several share one machine's memory."""
    head_object_store_mb: int = 120
    """Embedded cluster only: object store of the head raylet."""

    def __post_init__(self):
        require_positive("cluster", self, "num_worker_nodes", "cpus_per_node")
        for name in ("object_store_mb_per_node", "head_object_store_mb"):
            require(getattr(self, name) >= 75, f"cluster.{name}", f"{getattr(self, name)} MB is below Ray's 75 MB minimum",
                    f"set cluster.{name}=80 or more")

    @property
    def embedded(self) -> bool:
        return self.address is None


@dataclass
class LedgerConfig:
    """Pricing of the run's goodput and cost ledger (ledger.json, ledger.png)."""

    prices: Optional[str] = None
    """A user price file (JSON or YAML, the catalog's layout) merged over the packaged catalog."""
    region: Optional[str] = None
    """Region to price in; unset: the catalog's default (us-central1)."""


@dataclass
class ChaosEvent:
    """One scripted fault, e.g. ``preempt(node=2, at_s=40, notice_s=30)`` (see raytrain_spot.simulator.chaos)."""

    action: str = "preempt"
    """``preempt`` a worker node, or ``restore`` capacity (a replacement node joins)."""
    node: int = 0
    """preempt: index of the worker node among those alive, in the order they joined."""
    rank: Optional[int] = None
    """preempt: instead of ``node``, the node that runs this training rank (e.g. 0, the writer)."""
    at_s: Optional[float] = None
    """When, in seconds after the first training step (or use at_step)."""
    at_step: Optional[int] = None
    """When, as the training step reached (or use at_s)."""
    notice_s: Optional[float] = None
    """preempt: seconds from the notice (metadata TRUE, drain) to the abrupt kill (unset: chaos.notice_s)."""
    no_notice: bool = False
    """preempt: kill at once, with no notice at all."""
    metadata_delay_s: float = 0.0
    """preempt: the node's metadata server answers nothing for this long from the notice on (a slow
    server at the worst moment); the watcher hears the notice that much late."""
    after_s: float = 20.0
    """restore: seconds after the previous preemption's kill until the replacement node joins."""

    def __post_init__(self):
        require(self.action in ("preempt", "restore"), "chaos.events[].action",
                f"{self.action!r} is not an action", "use preempt or restore")
        if self.action == "preempt":
            require((self.at_s is None) != (self.at_step is None), "chaos.events[].at_s",
                    "a preempt needs exactly one of at_s and at_step", "set at_s (seconds) or at_step (step)")
        require_non_negative("chaos.events[]", self, "node", "notice_s", "after_s", "metadata_delay_s")


@dataclass
class ChaosConfig:
    """The Spot simulator: preempts and restores embedded worker nodes from a script or a trace."""

    mode: str = "events"
    """``events`` replays ``chaos.events``; ``trace`` replays ``chaos.trace``."""
    events: List[ChaosEvent] = field(default_factory=list)
    """Scripted faults, in order."""
    trace: Optional[str] = None
    """A Spot trace file ({"metadata": {"gap_seconds": N}, "data": [nodes alive per tick]})."""
    tick_s: float = 3.0
    """trace: wall seconds per trace tick (compresses time: a 300 s tick in 3 s)."""
    start_tick: int = 0
    """trace: first tick to replay."""
    max_ticks: Optional[int] = None
    """trace: ticks to replay (unset: to the end of the trace or of training)."""
    notice_s: float = 30.0
    """Notice before each kill, in wall seconds (GCE gives 30); the node watchers assume it too."""
    no_notice: bool = False
    """trace: kill without notice."""
    provisioning_s: float = 5.0
    """trace: seconds a replacement node takes to join once capacity returns."""
    margin_s: float = 5.0
    """Drain deadline margin the node watchers use: they drain to end this long before the kill."""
    watchers: bool = True
    """Run a preemption watcher per node. False: Ray never hears of a notice, as with plain Ray on GCE."""
    node_start: Optional[str] = None
    """A cluster YAML whose ``worker_start_ray_commands`` start each virtual VM: at its soft-off the
    simulator signals the node's processes where those commands put them (an SSH session scope: all
    of them; a ``systemd-run`` service with ``KillMode=mixed``: its main process). Unset: the commands
    of the shipped cluster/gcp-spot*.yaml (raytrain_spot/simulator/shutdown.py)."""
    seed: int = 0
    """trace: which nodes a capacity drop takes."""

    def __post_init__(self):
        require(self.mode in ("events", "trace"), "chaos.mode", f"{self.mode!r} is not a mode", "use events or trace")
        if self.mode == "trace":
            require(self.trace is not None, "chaos.trace", "trace mode needs a trace file",
                    "set chaos.trace=PATH, e.g. a file from ../shared/traces/")
            require(os.path.isfile(os.path.expanduser(self.trace)), "chaos.trace",
                    f"{self.trace} does not exist", "point chaos.trace at a trace JSON file")
        require_positive("chaos", self, "tick_s")
        require_non_negative("chaos", self, "notice_s", "provisioning_s", "margin_s", "start_tick")
        if self.node_start is not None:
            require(os.path.isfile(os.path.expanduser(self.node_start)), "chaos.node_start",
                    f"{self.node_start} does not exist", "point chaos.node_start at a cluster YAML, or unset it")
        if self.watchers:
            require(self.margin_s < self.notice_s, "chaos.margin_s",
                    f"{self.margin_s} is not below chaos.notice_s={self.notice_s}: the drain deadline would be at "
                    "or before the notice", f"set chaos.margin_s below {self.notice_s}, e.g. chaos.margin_s=1")


@dataclass
class Config:
    """Everything a run needs. Saved, resolved, inside every checkpoint."""

    run: TrainingRunConfig = field(default_factory=TrainingRunConfig)
    task: Dict[str, Any] = field(default_factory=lambda: {"_target_": DEFAULT_TASK})
    """The training task (raytrain_spot/loop/task.py): ``_target_`` names its class, the other keys
    are its settings. ``conf/task/vlm.yaml`` is the built-in vision-language model; a task of your
    own: ``task=custom task._target_=my_pkg.MyTask +task.SETTING=VALUE`` (docs/extending.md)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    chaos: Optional[ChaosConfig] = None
    """The Spot simulator (``+chaos=events`` or ``+chaos=trace``); embedded cluster only."""
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)

    def __post_init__(self):
        if self.cluster.embedded:
            capacity = self.cluster.num_worker_nodes * self.cluster.cpus_per_node
            require(capacity >= self.trainer.min_workers * self.trainer.cpus_per_worker, "trainer.min_workers",
                    f"{self.trainer.min_workers} workers x {self.trainer.cpus_per_worker} CPUs do not fit the embedded "
                    f"cluster ({self.cluster.num_worker_nodes} nodes x {self.cluster.cpus_per_node} CPUs)",
                    "raise cluster.num_worker_nodes or lower trainer.min_workers")

        if self.chaos is not None:
            require(self.cluster.embedded, "chaos", "the Spot simulator drives the embedded cluster only",
                    "drop +chaos=..., or unset cluster.address")

    def to_dict(self) -> dict:
        """The settings as plain values, secrets redacted: this is what checkpoints keep and workers get."""
        return redacted_dict(self)


def register_configs() -> None:
    """Register the schemas so Hydra type-checks every YAML value and override."""
    from hydra.core.config_store import ConfigStore  # imported here: workers need no Hydra

    ConfigStore.instance().store(name="schema", node=Config)


def load_config(cfg: DictConfig) -> Config:
    """Build and validate the typed config; raise ConfigError naming the bad key."""
    try:
        config = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key}: no value given. Fix: set {error.full_key}=...") from None
    except OmegaConfBaseException as error:
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        key = getattr(error, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(error).splitlines()[0]}. Fix: check the value's type and spelling") from None
    assert isinstance(config, Config)
    return config


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. the copy inside a checkpoint)."""
    return load_config(OmegaConf.merge(OmegaConf.structured(Config), values))
