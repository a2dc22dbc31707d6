"""Training from Python (notebooks, scripts): the main command, started and followed from code.

    import raytrain_spot

    result = raytrain_spot.train(["+experiment=hf_vlm", "trainer.max_steps=100"])
    print(result.status, result.summary["final_loss"], result.checkpoints)

    run = raytrain_spot.start(["+experiment=vlm", "+chaos=events", ...])   # returns at once
    for record in run.follow():      # the run's events as it writes them, until it ends
        ...
    result = run.wait()

A run is ``python -m raytrain_spot.run`` with the same overrides, in a process of its own: the
same code path as the command line, and a Ray driver that a notebook kernel's interrupts and
restarts cannot leave half torn down. The settings are checked here first, so a bad override
raises ``ConfigError`` in the caller, naming the setting and the fix, before anything starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence

from raytrain_spot.config.errors import CONFIG_ERROR_EXIT, ConfigError
from raytrain_spot.cost.ledger import LEDGER_FILE
from raytrain_spot.observe.events import EVENTS_FILE, read_events
from raytrain_spot.observe.progress import SUMMARY_FILE
from raytrain_spot.observe.records import Step


@dataclass
class RunResult:
    """What a finished run left in its directory (``hydra.run.dir``, default ``outputs/<run.name>/``)."""

    run_name: str
    run_dir: str
    status: str
    """``finished``, ``stopped`` (``Run.stop()``, Ctrl-C or SIGTERM: it ended at its final checkpoint),
    ``failed`` or ``finished without its final durable checkpoint``."""
    summary: Dict[str, Any]
    """summary.json: steps, losses, world sizes, checkpoints written, where they are."""
    ledger: Dict[str, Any]
    """ledger.json: goodput and badput by category, cost (see docs/goodput-and-cost.md)."""

    @classmethod
    def load(cls, run_dir: str) -> "RunResult":
        """The result of the run that wrote ``run_dir`` (FileNotFoundError: it has not ended there)."""
        with open(os.path.join(run_dir, SUMMARY_FILE)) as f:
            summary = json.load(f)
        ledger = {}
        if os.path.exists(ledger_path := os.path.join(run_dir, LEDGER_FILE)):
            with open(ledger_path) as f:
                ledger = json.load(f)
        run_name = summary["checkpoints_at"].rsplit("/", 2)[-2]  # <storage.uri>/<run.name>/checkpoints
        return cls(run_name, run_dir, summary["status"], summary, ledger)

    @property
    def events_path(self) -> str:
        return os.path.join(self.run_dir, EVENTS_FILE)

    @property
    def checkpoints(self) -> str:
        """Where the run's checkpoints are in durable storage (a ``file://`` or ``gs://`` URI)."""
        return self.summary["checkpoints_at"]

    def events(self) -> List[Dict[str, Any]]:
        return read_events(self.events_path)

    def trained_model(self, step: Optional[int] = None):
        """(task, model): the model as the run built it with the weights of checkpoint ``step``
        (default: the newest), on the CPU, in eval mode. The task is the one of the run's own
        settings (``.hydra/config.yaml`` in its directory), never one named by storage; a
        checkpoint saved with other settings is refused (ConfigError)."""
        from raytrain_spot.export import rebuilt_model, run_config
        from raytrain_spot.checkpoint.format import checkpoint_key, fetch_verified, listed_steps
        from raytrain_spot.checkpoint.manager import load_checkpoint_state
        from raytrain_spot.storage import open_store

        store = open_store(self.checkpoints[:-len(f"/{self.run_name}/checkpoints")])
        steps = listed_steps(store, self.run_name)
        if not steps:
            raise FileNotFoundError(f"{self.checkpoints} holds no checkpoint")
        with tempfile.TemporaryDirectory(prefix="trained-model-") as scratch:
            manifest, paths = fetch_verified(store, checkpoint_key(self.run_name, step or steps[0]), scratch)
            config = run_config(os.path.join(self.run_dir, ".hydra", "config.yaml"))
            task, model = rebuilt_model(manifest, load_checkpoint_state(manifest, paths)["model"], config)
        return task, model.eval()


class Run:
    """A run in progress: follow its events, wait for its result, or stop it."""

    def __init__(self, process: subprocess.Popen, run_dir: str, log_path: str, max_steps: int):
        self.process = process
        self.run_dir = run_dir
        self.log_path = log_path
        self.max_steps = max_steps
        self._offset = 0

    @property
    def events_path(self) -> str:
        return os.path.join(self.run_dir, EVENTS_FILE)

    def running(self) -> bool:
        return self.process.poll() is None

    def follow(self, poll_s: float = 0.5) -> Iterator[Dict[str, Any]]:
        """The run's event records as they are written, from where the last call stopped, until
        the run ends."""
        while True:
            ended = not self.running()
            yield from self._new_records()
            if ended:
                return
            time.sleep(poll_s)

    def watch(self, every_steps: int = 50) -> "RunResult":
        """Print the progress lines the command prints (a step line every ``every_steps``) until
        the run ends; return its result."""
        from raytrain_spot.observe.progress import format_event

        for record in self.follow():
            if record["ev"] == Step.ev and record["step"] % every_steps:
                continue
            if text := format_event(record, self.max_steps, None):
                print(text, flush=True)
        return self.wait()

    def wait(self, timeout: Optional[float] = None) -> RunResult:
        """Block until the run ends; its result. Raises ConfigError when the settings were refused."""
        self.process.wait(timeout)
        if self.process.returncode == CONFIG_ERROR_EXIT:
            raise ConfigError(_config_error(self.log_path))
        try:
            return RunResult.load(self.run_dir)
        except FileNotFoundError:
            raise RuntimeError(f"the run ended (exit status {self.process.returncode}) without a summary; "
                               f"its output: {self.log_path}\n{_tail(self.log_path)}") from None

    def stop(self) -> None:
        """Stop the run as Ctrl-C would: every worker stops after the same step, the driver commits
        that step's checkpoint to durable storage, writes the summary and the ledger, and exits with
        status 130; ``wait()`` returns its result, status ``stopped``. The same ``run.name`` resumes it."""
        if self.running():
            self.process.send_signal(signal.SIGINT)

    def _new_records(self) -> Iterator[Dict[str, Any]]:
        if not os.path.exists(self.events_path):
            return
        with open(self.events_path) as f:
            f.seek(self._offset)
            while (line := f.readline()).endswith("\n"):
                self._offset = f.tell()
                yield json.loads(line)


def start(overrides: Sequence[str] = (), workdir: Optional[str] = None) -> Run:
    """Start the main command with ``overrides`` in ``workdir`` (default: the current directory,
    where ``outputs/`` goes); return at once with a handle on the run."""
    workdir = os.path.abspath(workdir or os.getcwd())
    overrides = list(overrides)
    run_name, run_dir, max_steps = checked_run(overrides, workdir)
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "console.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "raytrain_spot.run", *overrides, f"run.name={run_name}",
                                    f"hydra.run.dir={quoted(run_dir)}"],
                                   cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    return Run(process, run_dir, log_path, max_steps)


def train(overrides: Sequence[str] = (), workdir: Optional[str] = None, every_steps: int = 50) -> RunResult:
    """Run the main command to its end, printing its progress; return the result."""
    return start(overrides, workdir).watch(every_steps)


class CheckedRun(NamedTuple):
    name: str
    run_dir: str
    """``hydra.run.dir``, absolute."""
    max_steps: int


def checked_run(overrides: List[str], workdir: str) -> CheckedRun:
    """Validate the overrides as the command does; the run's name and its directory with their
    ``${now:...}`` resolved here, so this process and the run agree on both."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf, open_dict

    from raytrain_spot.settings import CONFIG_MODULE, check_overrides, checked_task, composition_problem
    from raytrain_spot.config.schema import load_config, register_configs

    check_overrides(overrides)
    register_configs()
    cwd = os.getcwd()
    os.chdir(workdir)  # storage and data paths resolve against the run's working directory
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            try:
                composed = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            except Exception as error:
                if (problem := composition_problem(error)) is None:
                    raise
                raise ConfigError(problem) from None
        run_name = str(OmegaConf.select(composed, "run.name"))
        run_dir = os.path.join(workdir, str(OmegaConf.select(composed, "hydra.run.dir")))
        with open_dict(composed):
            del composed["hydra"]  # the run's settings alone, as the command's ``main`` gets them
        cfg = load_config(composed)
        checked_task(cfg)
    finally:
        os.chdir(cwd)
    return CheckedRun(run_name, run_dir, cfg.trainer.max_steps)


def quoted(value: str) -> str:
    """A Hydra override value kept whole: a path's spaces and quotes stay in it."""
    escaped = value.replace("'", "\\'")
    return f"'{escaped}'"


def _config_error(log_path: str) -> str:
    lines = [line for line in _tail(log_path).splitlines() if line.startswith("Configuration error: ")]
    return lines[-1][len("Configuration error: "):] if lines else _tail(log_path)


def _tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]
