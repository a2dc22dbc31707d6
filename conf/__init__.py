"""The Hydra config groups, installed as the package ``raytrain_spot.conf`` (pyproject.toml), so the
main command finds them through package resources wherever the package is installed."""
