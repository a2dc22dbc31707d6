"""The main job: ``python -m raytrain_spot.run +experiment=vlm [overrides]``.

Validates the configuration, starts (or joins) the Ray cluster, trains with elastic DDP
and prints a summary. Everything the run writes is under ``outputs/<run.name>/``; running
again with the same ``run.name`` resumes from the newest valid checkpoint.

Exit status: 0 finished; 1 failed, or finished without its final durable checkpoint; 2 a
configuration error, before Ray starts; 128 + the signal's number (130 for Ctrl-C, 143 for
SIGTERM) stopped by that signal after a final checkpoint, with the summary and ledger written.
A second Ctrl-C or SIGTERM while stopping stops at once, without them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from raytrain_spot.settings import CONFIG_PATH, check_overrides, checked_task, composition_problem
from raytrain_spot.checkpoint.scratch import private_dir
from raytrain_spot.config.errors import CONFIG_ERROR_EXIT, ConfigError
from raytrain_spot.config.schema import Config, load_config, register_configs
from raytrain_spot.observe.console import console_for_run
from raytrain_spot.observe.events import EVENTS_FILE, EventFeed, EventLog, iter_events, start_event_log
from raytrain_spot.observe.records import End, Start, StopRequested, Stopped
from raytrain_spot.cost.ledger import LedgerOptions, format_table, write_ledger
from raytrain_spot.cost.pricing import PriceCatalog
from raytrain_spot.observe.progress import SUMMARY_FILE, ProgressPrinter, format_summary, summarize
from raytrain_spot.config.redaction import save_redacted_composition, secret_keys
from raytrain_spot.loop.strategy import SPOT, Strategy
from raytrain_spot.loop.task import TrainingTask, with_resolved_settings

logger = logging.getLogger("raytrain_spot")
register_configs()
NOT_DURABLE = "finished without its final durable checkpoint"
STOPPED = "stopped"
LISTING_DEADLINE_S = 20.0
"""How long the end-of-run check of durable storage may retry before it says the copy is missing."""
job_started = False
"""Whether Hydra got as far as calling ``main``: an error before it is about the command line."""
strategy: Strategy = SPOT
"""How the run meets Spot (loop/strategy.py); ``command`` sets it, since Hydra's ``main`` takes the config alone."""


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def main(dict_cfg: DictConfig) -> None:
    global job_started
    job_started = True
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notice is not the run's
    run_dir = HydraConfig.get().runtime.output_dir
    save_redacted_composition(dict_cfg, HydraConfig.get(), secret_keys(Config), os.path.join(run_dir, ".hydra"))
    try:
        cfg = load_config(dict_cfg)
        task = checked_task(cfg)
        storage_uri = cfg.storage.resolved_uri(os.getcwd())
        check_storage(storage_uri)
        if cfg.checkpoint.use_head:  # the head tier is this machine's: another user's directory stops the run here
            private_dir(cfg.checkpoint.head_root(storage_uri), "checkpoint.head_dir")
        check_resume(cfg, task, storage_uri)
    except ConfigError as error:
        print(f"Configuration error: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    warn_about_redirects()
    started = time.time()
    lease = None
    stop = StopOnSignal()
    try:
        lease = take_lease(cfg, storage_uri)
        status = run_training(cfg, task, run_dir, storage_uri, started, lease, stop)
    except ConfigError as error:  # the run name is taken, or the cluster to join is not there: nothing ran
        print(f"Configuration error: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    finally:
        if lease is not None:
            lease.release()

    summary = summarize(os.path.join(run_dir, EVENTS_FILE), started, f"{storage_uri}/{cfg.run.name}/checkpoints")
    summary["status"] = status
    with open(os.path.join(run_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_summary(summary, status), flush=True)
    ledger = write_ledger(run_dir, PriceCatalog.load(cfg.ledger.prices),
                          LedgerOptions(min_workers=cfg.trainer.min_workers, region=cfg.ledger.region))
    print(format_table(ledger), flush=True)
    if status == STOPPED:
        sys.exit(stop.exit_status)
    if status != "finished":
        sys.exit(1)


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM to the driver while it trains: the first asks the run to stop
    after its current step with a final checkpoint (loop/stop.py); a second stops at once.

    Entered once Ray is connected: ``ray.init`` sets a SIGTERM handler of its own that exits at once.
    Before that, either signal stops the driver at once: nothing has trained yet."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal's number: what a shell reports for a process that signal ended."""
        return 128 + self.signum

    def __enter__(self) -> "StopOnSignal":
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # unwinds through the cluster's shutdown
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after the current step with a final checkpoint; "
              "Ctrl-C again stops at once, without it", file=sys.stderr, flush=True)


# Variables that send checkpoints or preemption notices to another host than Google's.
REDIRECTS = {"STORAGE_EMULATOR_HOST": "checkpoints (gs://) go to",
             "GCE_METADATA_HOST": "preemption notices are read from"}


def warn_about_redirects() -> None:
    """Say loudly when the environment points Google's endpoints elsewhere (an emulator, a proxy)."""
    for variable, what in REDIRECTS.items():
        if os.environ.get(variable):
            print(f"WARNING: {variable} is set: {what} {os.environ[variable]}, not Google's servers. "
                  f"Unset it unless that is meant.", file=sys.stderr, flush=True)


def check_storage(storage_uri: str) -> None:
    """Fail in seconds, before Ray starts, when the bucket is unusable."""
    if storage_uri.startswith("gs://"):
        from raytrain_spot.storage.gcs import GcsAccessError, GcsStore

        try:
            GcsStore.from_uri(storage_uri, retry_deadline_s=20.0).check_access()
        except GcsAccessError as error:
            raise ConfigError(str(error)) from None


def check_resume(cfg: Config, task: TrainingTask, storage_uri: str) -> None:
    """Refuse, before Ray starts, to resume a checkpoint saved with other task settings or seed."""
    if cfg.checkpoint.allow_config_change:
        return
    from raytrain_spot.checkpoint.resume import resume_problem
    from raytrain_spot.storage import open_store
    from raytrain_spot.storage.store import LocalStore

    stores = [("durable", open_store(storage_uri))]
    if cfg.checkpoint.use_head:
        stores.insert(0, ("head", LocalStore(cfg.checkpoint.head_root(storage_uri))))
    if problem := resume_problem(stores, cfg.run.name, cfg.to_dict(), task.resumable_settings):
        raise ConfigError(problem)


def take_lease(cfg: Config, storage_uri: str):
    """This driver's claim on the run name (see checkpoint/lease.py), renewed in the background."""
    from raytrain_spot.checkpoint.lease import RunInUse, RunLease
    from raytrain_spot.storage import open_store

    # A renewal that waits out a long outage must not outlast the lease itself.
    lease = RunLease(open_store(storage_uri, retry_deadline_s=cfg.tuning.lease_ttl_s / 3), cfg.run.name,
                     cfg.tuning.lease_ttl_s)
    try:
        lease.acquire()
    except RunInUse as error:
        raise ConfigError(str(error)) from None
    return lease.start_renewing()


def run_training(cfg: Config, task: TrainingTask, run_dir: str, storage_uri: str, started: float, lease,
                 stop: StopOnSignal) -> str:
    """Run training on the configured cluster; return "finished", "failed", NOT_DURABLE or STOPPED.

    ``started`` is when this invocation began: progress lines show its records only.
    """
    from raytrain_spot.cluster.embedded import connect, ray_logs_dir

    dataset = task.prepare(cfg.run.seed)
    run_log = os.path.join(run_dir, f"{HydraConfig.get().job.name}.log")
    with console_for_run(run_log, quiet=not cfg.run.show_ray_logs) as (console, _), \
            connect(cfg.cluster, cfg.run.show_ray_logs) as cluster, stop:
        from raytrain_spot.monitor.alerts import AlertRunner
        from raytrain_spot.checkpoint.head import start_head_store
        from raytrain_spot.preemption.node_events import ClusterMonitor
        from raytrain_spot.preemption.replacements import ReplacementRequester
        from raytrain_spot.monitor.metrics import MonitoringSink, build_writers
        from raytrain_spot.loop.ray_trainer import build_trainer
        from raytrain_spot.loop.worker import LoopContext

        from raytrain_spot.loop.stop import clear_stop

        clear_stop(cfg.run.name)
        event_actor = start_event_log(run_dir)
        events = EventLog(event_actor)
        events.emit(Start(run=cfg.run.name, strategy=strategy.name, embedded=cluster is not None, dataset=dataset,
                          min_workers=cfg.trainer.min_workers, max_workers=cfg.trainer.max_workers))
        head_store = None
        if cfg.checkpoint.use_head:
            head_store = start_head_store(cfg.checkpoint.head_root(storage_uri), cfg.run.name,
                                          storage_uri, cfg.checkpoint.keep_latest_k,
                                          cfg.checkpoint.milestone_every_steps, cfg.checkpoint.durable_interval_s,
                                          events, lease.owner)
        events_path = os.path.join(run_dir, EVENTS_FILE)
        print(f"run {cfg.run.name}: {cfg.trainer.min_workers}-{cfg.trainer.max_workers} workers, "
              f"global batch {cfg.trainer.global_batch_size}, {cfg.trainer.max_steps} steps, "
              f"checkpoints in {storage_uri}/{cfg.run.name}, logs in {run_dir} (Ray's: {ray_logs_dir()})",
              file=console, flush=True)
        context = LoopContext(config=with_resolved_settings(cfg.to_dict(), task), storage_uri=storage_uri,
                              events=event_actor, head_store=head_store, lease_owner=lease.owner,
                              strategy=strategy)
        catalog = PriceCatalog.load(cfg.ledger.prices)
        progress = ProgressPrinter(cfg.trainer.max_steps, cfg.trainer.log_every_steps, console, since=started)
        sinks = [progress,
                 MonitoringSink(build_writers(cfg.monitoring, run_dir, cfg.run.name, cfg.to_dict()), catalog,
                                cfg.ledger.region),
                 AlertRunner(cfg.alerts, catalog, emit=events.emit, region=cfg.ledger.region)]
        # At a preemption notice, ask the autoscaler for the replacement at once (preemption/replacements.py).
        replacements = ReplacementRequester(cfg.trainer.resources_per_worker, cfg.trainer.max_workers,
                                            events.emit) if strategy.spot_aware else None
        with ClusterMonitor(events, replacements=replacements) as monitor, EventFeed(events_path, sinks, poll_s=0.5):
            fit = FitThread(build_trainer(cfg, context))
            drive(fit, cfg, cluster, events, progress, monitor, run_dir, lease, stop)
            if lease.lost.is_set():
                fit.error = RuntimeError(f"this driver lost the lease of run.name={cfg.run.name} (another driver "
                                         "took over, or storage did not answer its renewals); it stopped")
                if head_store is not None:
                    import ray

                    ray.get(head_store.stop_uploads.remote())
            elif head_store is not None:
                import ray

                ray.get(head_store.wait_for_uploads.remote(cfg.checkpoint.final_upload_wait_s))
            events.flush()  # the workers' "stopped" record is in the file
            stopped_at = stopped_step(events_path, started) if stop.requested else None
            last_step = cfg.trainer.max_steps if stopped_at is None else stopped_at
            status = "finished" if fit.error is None else "failed"
            error_text = None if fit.error is None else f"{type(fit.error).__name__}: {fit.error}"
            durable = newest_durable_step(storage_uri, cfg.run.name) if fit.error is None else None
            if fit.error is None and stopped_at is not None and durable == last_step:
                status = STOPPED
            if fit.error is None and durable != last_step:
                status = NOT_DURABLE
                error_text = (f"the final checkpoint (step {last_step}) is not in {storage_uri} "
                              f"(newest there: {durable})" + ("; it is on the head. Run the same command again "
                              "when the storage is back: the head uploads its newest checkpoint first"
                                                              if head_store is not None else ""))
            if error_text is not None:
                logger.error("Training %s: %s", status, error_text)
            events.emit(End(status=status, error=error_text))
            events.flush()
    return status


def stopped_step(events_path: str, since: float):
    """The step the workers stopped at on the driver's request (loop/stop.py), or None: they did not."""
    return next((e["step"] for e in iter_events(events_path) if e["ev"] == Stopped.ev and e["t"] >= since), None)


def newest_durable_step(storage_uri: str, run_name: str):
    """Newest step committed in durable storage, or None (none, or storage unreachable)."""
    from raytrain_spot.checkpoint.resume import newest_commit
    from raytrain_spot.storage import open_store

    try:
        found = newest_commit([("durable", open_store(storage_uri, retry_deadline_s=LISTING_DEADLINE_S))], run_name)
    except Exception as error:  # noqa: BLE001 - unreachable storage: the copy cannot be confirmed
        logger.warning("Cannot read %s: %s: %s", storage_uri, type(error).__name__, error)
        return None
    return found[1].step if found else None


def drive(fit: "FitThread", cfg: Config, cluster, events: EventLog, progress: ProgressPrinter, monitor,
          run_dir: str, lease, stop: StopOnSignal) -> None:
    """Wait for training, running the Spot simulator if one is configured; stop if the run's
    lease went to another driver (leaving the cluster context ends this driver's Ray job); pass
    a stop asked by a signal on to the workers.

    Ray wants node changes from the main thread, so training runs in a thread of its own.
    """
    simulator = None
    if cfg.chaos is not None:
        from raytrain_spot.simulator.chaos import SpotSimulator

        simulator = SpotSimulator(cfg.chaos, cluster, events, lambda: progress.latest_step,
                                  on_kill=monitor.reported_dead, log_dir=os.path.join(run_dir, "chaos"),
                                  rank_nodes=lambda: progress.rank_nodes,
                                  node_local_root=os.path.expanduser(cfg.checkpoint.local_dir))
    from raytrain_spot.loop.stop import request_stop

    stop_sent = False
    try:
        while fit.is_alive() and not lease.lost.is_set():
            if stop.requested and not stop_sent:
                request_stop(cfg.run.name)
                events.emit(StopRequested(signal=signal.Signals(stop.signum).name))
                stop_sent = True
            if simulator is not None:
                simulator.tick()
            fit.join(0.1)
    finally:
        if simulator is not None:
            simulator.close()


class FitThread(threading.Thread):
    """Runs ``trainer.fit()``; keeps the error it raised, if any."""

    def __init__(self, trainer):
        super().__init__(name="fit", daemon=True)
        self._trainer = trainer
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self._trainer.fit()
        except Exception as error:  # reported by the driver after the summary
            self.error = error


def command(with_strategy: Strategy = SPOT) -> None:
    """``main`` behind the checks of the command line: every bad input, the project's or Hydra's
    (a missing group option, a value of the wrong type), exits with CONFIG_ERROR_EXIT before Ray starts.
    ``with_strategy``: the product's, or a benchmark baseline's (bench/baselines.py)."""
    global strategy
    strategy = with_strategy
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as error:
        print(f"Configuration error: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them and exiting 1
    try:
        main()
    except Exception as error:
        if job_started or (problem := composition_problem(error)) is None:
            raise
        print(f"Configuration error: {problem}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)


if __name__ == "__main__":
    command()
