"""raytrain-spot: elastic PyTorch training on Spot VMs with Ray."""

__version__ = "0.1.0"
