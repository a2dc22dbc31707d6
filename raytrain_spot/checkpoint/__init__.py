"""Checkpoints: what they hold, the per-worker manager, tiers, format and validation, resume checks, audit."""
