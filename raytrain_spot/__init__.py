"""raytrain-spot: elastic PyTorch training on Spot VMs with Ray.

What a user imports is here; every other module is the framework's own.

* ``train(overrides)``, ``start(overrides)``: the main command from Python (``RunResult``, ``Run``).
* ``TrainingTask``, ``MapDataset``: the extension point, a model of your own (docs/extending.md).
* ``ConfigError``, ``TaskContractError``: what a bad setting or a task that breaks its contract raises.
"""

from importlib.metadata import version

__version__ = version("raytrain-spot")  # pyproject.toml's, the one place it is written

_PUBLIC = {
    "train": "raytrain_spot.api",
    "start": "raytrain_spot.api",
    "Run": "raytrain_spot.api",
    "RunResult": "raytrain_spot.api",
    "TrainingTask": "raytrain_spot.loop.task",
    "MapDataset": "raytrain_spot.loop.task",
    "ConfigError": "raytrain_spot.config.errors",
    "TaskContractError": "raytrain_spot.config.errors",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    # Imported on first use: a Ray worker, or a config check, that imports the package pays nothing for
    # the API or torch.
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'raytrain_spot' has no attribute {name!r}")
