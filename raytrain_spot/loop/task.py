"""The training task: the user's extension point, everything that is specific to one model.

A task builds the model, the dataset and the batches, and computes one loss per sample. The
framework owns the rest and does it the same way for every task: elastic DDP, handoffs on
preemption notices and regrows, checkpoints on every tier, the exactly-once global sample
order, the ledger, alerts and monitoring. ``docs/extending.md`` walks through a complete task.

Contract (checked at the start of every worker group; a breach stops the run with the fix):

* ``build_dataset`` returns a map-style dataset: ``len(dataset)`` and a deterministic
  ``dataset[i]``. The framework picks indices from one global, world-size-independent order,
  so a resume at any world size continues at the exact next sample. A dataset may also have
  ``row_group_spans()``, index ranges ``[(start, stop), ...]`` that the order shuffles within
  (rows of one Parquet row group or shard), so a step's reads stay local.
* ``build_model`` builds the same parameters on every rank (the framework seeds torch with
  ``run.seed`` first).
* ``loss`` returns one loss per sample, shape ``[batch]``. The framework sums them with the
  scale that makes DDP's average the mean over the global batch, however the batch is split
  over ranks and micro-batches.

A task is chosen with Hydra's ``_target_`` (``task=custom task._target_=my_pkg.MyTask``) and
built from the other keys of ``task``: a dataclass task gets them type-checked and validated
by its ``__post_init__``. Building a task must be cheap (the driver builds one to validate the
settings): do the work in the ``build_*`` methods.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import (TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Protocol, Sequence, Tuple,
                    runtime_checkable)

import numpy as np
import torch

from raytrain_spot.checkpoint.state import Stateful
from raytrain_spot.config.errors import ConfigError, TaskContractError
from raytrain_spot.loop import optim as default_optim

if TYPE_CHECKING:
    from raytrain_spot.config.schema import OptimConfig  # schema.py imports this module


@runtime_checkable
class MapDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class TrainingTask(abc.ABC):
    """What a model brings to the framework. Subclass it (a dataclass subclass gets typed settings)."""

    unused_parameters: ClassVar[bool] = False
    """Some parameters get no gradient in a step (a vision tower's final norm that the model never
    reads, say): DDP then looks for them every step (``find_unused_parameters``), a little slower.
    Without it such a model fails at its second step."""

    preload_modules: ClassVar[Tuple[str, ...]] = ()
    """Modules the task's methods import (its own module always counts): a standby kept ahead of a
    restart imports them before it takes a rank, so the restarted group does not (elastic/preload.py):
    the Hugging Face task's ``transformers.modeling_utils`` and ``peft``, say."""

    resumable_settings: ClassVar[Tuple[str, ...]] = ()
    """Settings of this task (dotted, under ``task.``) that a resume may change: they do not shape
    the model, the optimizer state or the sample order (a cache size, a download directory).
    Every other ``task.*`` setting must match the checkpoint's."""

    def prepare(self, seed: int) -> Optional[str]:
        """Runs once on the driver before any worker starts: generate or download the data.
        Returns a description of the data for the run's ``start`` event (a path), or None."""
        return None

    def localize(self, seed: int) -> None:
        """Runs on every worker before its group's first collective: copy to the node what
        ``build_model`` and ``build_dataset`` read from remote storage (raytrain_spot/storage/node_cache.py).
        The group waits up to ``trainer.startup_timeout_s`` for its slowest rank here; a copy made
        later, between collectives, would time its peers out after ``trainer.collective_timeout_s``."""

    def resolved_settings(self) -> Dict[str, Any]:
        """Settings (dotted, under ``task.``) that ``prepare`` resolved on the driver, which every
        worker gets in place of the user's: a model hub id's commit, say, so that every node loads
        the same files however the hub moves on. Each must be one of ``resumable_settings`` (a
        resumed run resolves it again)."""
        return {}

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The model, on the CPU; the framework moves it to the training device, wraps it in DDP and
        trains it in train mode (``model.train()`` every step; a submodule that must stay in eval
        mode, a frozen batch norm say, overrides its own ``train``)."""

    def param_groups(self, model: torch.nn.Module) -> List[Dict[str, Any]]:
        """Optimizer parameter groups (each a dict with ``params``; ``lr`` is set by the framework
        every step). Default: weight decay on matrices, none on biases, norms and positions."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in trainable if p.dim() >= 2]},
                {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]

    def build_optimizer(self, model: torch.nn.Module, optim: "OptimConfig") -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters of ``model`` (unwrapped, on the training device),
        with the ``optim.*`` settings. Any ``torch.optim.Optimizer``: the framework sets each group's
        ``lr`` every step (``learning_rate``) and checkpoints ``state_dict()`` with the model, so a resume
        continues its state (moments, momentum buffers) at any world size. Default: AdamW over
        ``param_groups`` with ``optim.lr``, ``beta1``, ``beta2`` and ``weight_decay``."""
        return default_optim.build_optimizer(self.param_groups(model), optim)

    def learning_rate(self, samples_seen: int, total_samples: int, optim: "OptimConfig") -> float:
        """The learning rate of the step that starts after ``samples_seen`` samples, of a run of
        ``total_samples``. A function of samples, never of steps or workers, so a resize does not shift
        it, and of its arguments alone, so a resume needs no state for it. Default: linear warmup over
        ``optim.warmup_samples``, then cosine decay to ``optim.min_lr_ratio * optim.lr``."""
        return default_optim.learning_rate(samples_seen, total_samples, optim)

    @abc.abstractmethod
    def build_dataset(self, seed: int) -> MapDataset:
        """The training set: ``len`` and a deterministic ``dataset[i]`` (see the module contract)."""

    @abc.abstractmethod
    def collate(self, samples: Sequence[Any]) -> Any:
        """One micro-batch from its samples: tensors (or dicts, lists, tuples of them) with the
        batch first. The framework moves every tensor to the training device."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The loss of each sample of ``batch``, shape ``[batch]``. Call ``model(...)`` (it is the
        DDP-wrapped model: calling its submodules directly would skip the gradient sync)."""

    def build_eval_dataset(self, seed: int) -> Optional[MapDataset]:
        """Samples to evaluate on, apart from the training set, in the form ``collate`` takes: the
        framework evaluates them every ``eval.every_steps`` and at the run's end, each sample once
        over all ranks (loop/evaluate.py). Default: None, no evaluation."""
        return None

    def eval_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The loss of each sample of an evaluation batch, shape ``[batch]``, under ``torch.no_grad()``
        with the model in eval mode. Default: ``loss``."""
        return self.loss(model, batch)

    def eval_examples(self, model: torch.nn.Module, dataset: MapDataset,
                      device: torch.device) -> List[Dict[str, str]]:
        """A few examples of what the model does now, as text (each a dict of columns: an image's
        reference caption and the one the model writes, say), logged beside the evaluation loss.
        Called on rank 0 alone after each evaluation, with the model unwrapped (not DDP), on
        ``device``, in eval mode under ``torch.no_grad()``: keep it to a few samples of ``dataset``
        (the evaluation set), since the other ranks wait. Default: none."""
        return []

    def save_pretrained(self, model: torch.nn.Module, out_dir: str, adapter_only: bool) -> None:
        """Write ``model`` (from ``build_model``, the trained weights loaded) into the existing
        directory ``out_dir`` in its library's own format: what ``python -m
        raytrain_spot.export --format pretrained`` writes. ``adapter_only``: the
        trained adapters alone, for a task that trains adapters on a frozen base."""
        raise ConfigError(f"--format pretrained: {type(self).__name__} has no format of its own (it does not define "
                          "save_pretrained). Fix: export with --format torch")

    def extra_state(self) -> Dict[str, Stateful]:
        """Further state a resume needs (say, an EMA of the weights), saved in every checkpoint
        beside the model, the optimizer and the loop state, and restored into these objects."""
        return {}


def with_resolved_settings(config: Dict[str, Any], task: TrainingTask) -> Dict[str, Any]:
    """``config`` (``Config.to_dict()``) with the task's resolved settings in place of the user's."""
    for key, value in task.resolved_settings().items():
        *parents, name = key.split(".")
        settings = config["task"]
        for parent in parents:
            settings = settings.setdefault(parent, {})
        settings[name] = value
    return config


def build_task(settings: Dict[str, Any]) -> TrainingTask:
    """The task named by ``settings['_target_']``, built from the other settings."""
    settings = dict(settings)
    target = settings.pop("_target_", None)
    return _instantiate(task_class(target), target, settings)


def task_class(target: Any) -> type:
    """The TrainingTask subclass ``target`` names (``package.module.ClassName``)."""
    if not target or not isinstance(target, str) or "." not in target:
        raise ConfigError(f"task._target_: {target!r} names no task class. Fix: set task._target_=my_pkg.module."
                          "MyTask (the module importable on PYTHONPATH), or use the built-in +experiment=vlm")
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"task._target_: cannot import {target} ({type(error).__name__}: {error}). Fix: put "
                          "the task's package on PYTHONPATH (every node needs it) and check the spelling") from None
    if not (isinstance(cls, type) and issubclass(cls, TrainingTask)):
        raise ConfigError(f"task._target_: {target} is not a TrainingTask. Fix: subclass "
                          "raytrain_spot.TrainingTask (docs/extending.md)")
    return cls


def _instantiate(cls: type, target: str, settings: Dict[str, Any]) -> TrainingTask:
    if dataclasses.is_dataclass(cls):
        from omegaconf import OmegaConf
        from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

        names = [f.name for f in dataclasses.fields(cls)]
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), settings))
        except ConfigError as error:
            raise _in_task(error) from None
        except ConfigKeyError as error:
            raise ConfigError(f"task.{error.full_key}: no such setting of {target}. Fix: use one of "
                              f"{', '.join(names) or '(none)'}; to train another task than the default, select "
                              f"it with task=custom task._target_={target}") from None
        except OmegaConfBaseException as error:
            if isinstance(error.__cause__, ConfigError):
                raise _in_task(error.__cause__) from None
            raise ConfigError(f"task.{getattr(error, 'full_key', '') or ''}: {str(error).splitlines()[0]}. "
                              "Fix: check the value's type") from None
    try:
        return cls(**settings)
    except TypeError as error:
        raise ConfigError(f"task: {target} rejects the settings {sorted(settings)} ({error}). Fix: pass only "
                          "the arguments its constructor takes, as task.NAME=VALUE") from None


def _in_task(error: ConfigError) -> ConfigError:
    """A task's own validation names its keys relative to the task; the user types them under ``task.``."""
    message = str(error)
    return ConfigError(message if message.startswith("task.") else f"task.{message}")


def task_contract_problem(dataset: MapDataset, probe_indices: Sequence[int]) -> Optional[str]:
    """Why the dataset breaks the contract (an item that changes between two reads), or None."""
    if not isinstance(dataset, MapDataset):
        return (f"build_dataset returned a {type(dataset).__name__}, which has no len() and dataset[i]. "
                "Fix: return a map-style dataset (torch.utils.data.Dataset with __len__ and __getitem__)")
    if len(dataset) == 0:
        return "build_dataset returned an empty dataset. Fix: check the task's data path"
    for index in probe_indices:
        if not same_item(dataset[index], dataset[index]):
            return (f"dataset[{index}] returned different items on two reads, so a resumed run would not see "
                    "the samples the interrupted one would have. Fix: make __getitem__ a function of the index "
                    "(draw augmentations from a generator seeded with the index)")
    return None


def same_item(first: Any, second: Any) -> bool:
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
                and first.shape == second.shape and first.dtype == second.dtype and torch.equal(first, second))
    if isinstance(first, dict):
        return (isinstance(second, dict) and first.keys() == second.keys()
                and all(same_item(first[k], second[k]) for k in first))
    if isinstance(first, (list, tuple)):
        return (type(first) is type(second) and len(first) == len(second)
                and all(same_item(a, b) for a, b in zip(first, second)))
    if isinstance(first, np.ndarray):
        return isinstance(second, np.ndarray) and np.array_equal(first, second)
    return bool(first == second)


def per_sample_loss(losses: Any, batch_size: int) -> torch.Tensor:
    """``losses`` if it is one loss per sample of a batch of ``batch_size``; else the contract error."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.shape[0] != batch_size:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise TaskContractError(
            f"TrainingTask.loss returned {shape} for a micro-batch of {batch_size} samples; it must return one loss "
            "per sample, shape [batch], so the global batch means the same at every world size. Fix: compute the "
            "loss with reduction='none' and reduce every dimension but the batch (e.g. a mean over tokens)")
    return losses


def move_to(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) batch on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    if callable(getattr(batch, "to", None)):  # e.g. a Hugging Face BatchEncoding
        return batch.to(device)
    return batch
