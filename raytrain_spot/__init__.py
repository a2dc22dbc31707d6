"""raytrain-spot: elastic PyTorch training on Spot VMs with Ray.

``raytrain_spot.train(overrides)`` and ``raytrain_spot.start(overrides)`` run the main command
from Python (raytrain_spot/api.py).
"""

from importlib.metadata import version

__version__ = version("raytrain-spot")  # pyproject.toml's, the one place it is written


def __getattr__(name: str):
    # Imported on first use: a Ray worker that imports the package pays nothing for the API.
    if name in ("train", "start"):
        from raytrain_spot import api

        return getattr(api, name)
    raise AttributeError(f"module 'raytrain_spot' has no attribute {name!r}")
