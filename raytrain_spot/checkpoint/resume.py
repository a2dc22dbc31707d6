"""Whether a checkpoint may resume this run: the settings that shape the state and the data order must match.

A resumed run may change how it trains (steps, workers, checkpoint cadence, cluster), not what
it trains: another model shape would fail to load, or load into the wrong parameters, and
another dataset or seed would break the exactly-once sample order.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from raytrain_spot.checkpoint.format import InvalidCheckpoint, Manifest, checkpoint_key, listed_steps, read_manifest
from raytrain_spot.storage.store import Store

STATE_SHAPING = ("task", "run.seed")
"""Settings a resume must keep (dotted prefixes of the config), but for the task's ``resumable_settings``."""


def _flat(values: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    flat: Dict[str, Any] = {}
    for key, value in values.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def differences(saved: Dict[str, Any], current: Dict[str, Any], resumable: Iterable[str] = ()) -> List[str]:
    """``key: saved -> current`` for every state-shaping setting that differs; ``resumable`` are
    task settings (relative to ``task``) that may change."""
    before, after = _flat(saved), _flat(current)
    exempt = [f"task.{name}" for name in resumable]
    keys = sorted(k for k in before.keys() | after.keys() if _under(k, STATE_SHAPING) and not _under(k, exempt))
    return [f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}" for k in keys
            if before.get(k) != after.get(k)]


def newest_commit(stores: Iterable[Tuple[str, Store]], run_name: str) -> Optional[Tuple[str, Manifest]]:
    """(tier, manifest) of the newest committed checkpoint over ``stores``; unreadable tiers are skipped."""
    best: Optional[Tuple[str, Manifest]] = None
    for tier, store in stores:
        try:
            steps = listed_steps(store, run_name)
        except Exception:  # noqa: BLE001 - an unreachable tier cannot veto a resume; restore skips it too
            continue
        for step in steps:
            if best is not None and step <= best[1].step:
                break
            try:
                best = (tier, read_manifest(store, checkpoint_key(run_name, step)))
                break
            except (InvalidCheckpoint, OSError):
                continue
    return best


def resume_problem(stores: Iterable[Tuple[str, Store]], run_name: str, current: Dict[str, Any],
                   resumable: Iterable[str] = ()) -> Optional[str]:
    """Why the newest checkpoint must not resume this run, or None when it may (or there is none)."""
    found = newest_commit(stores, run_name)
    if found is None:
        return None
    tier, manifest = found
    if not manifest.config:  # saved without its settings: nothing to compare
        return None
    changed = differences(manifest.config, current, resumable)
    if not changed:
        return None
    return (f"run {run_name!r} would resume from step {manifest.step} ({tier} tier), saved with other settings: "
            f"{'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}. Fix: resume with the checkpoint's "
            "settings, start a new run (run.name=...), or set checkpoint.allow_config_change=true")
