"""Checkpoints: format and validation, tiers, and the per-worker manager."""
