"""Secrets in settings (a webhook URL that carries its token) never reach a file or a log line.

A setting is secret when its dataclass field says so (``field(metadata=SECRET)``). Whatever is
persisted or shipped (checkpoint manifests, the workers' copy of the config, the run's ``.hydra/``
record) holds ``REDACTED`` in its place, and error text that may echo it goes through ``scrub``.
The command line refuses a literal secret (config/overrides.py): it would stay in shell histories,
the process list and Ray's job entrypoint; ``${oc.env:VAR}`` reads it from the environment.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Iterable, List

SECRET = {"secret": True}
REDACTED = "<redacted>"


def secret_keys(schema: type) -> List[str]:
    """Dotted keys of every secret field of a nest of config dataclass types (``alerts.webhook_url``)."""
    keys: List[str] = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind) \
            if typing.get_origin(kind) is typing.Union else kind
        if f.metadata.get("secret"):
            keys.append(f.name)
        elif dataclasses.is_dataclass(kind):
            keys += [f"{f.name}.{key}" for key in secret_keys(kind)]
    return keys


def redacted_dict(config: Any) -> dict:
    """``dataclasses.asdict(config)`` with every secret field that is set replaced by REDACTED."""
    values = dataclasses.asdict(config)
    _redact(config, values)
    return values


def _redact(config: Any, values: dict) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("secret"):
            if value:
                values[f.name] = REDACTED
        elif dataclasses.is_dataclass(value):
            _redact(value, values[f.name])


def save_redacted_composition(cfg: Any, hydra_cfg: Any, keys: Iterable[str], directory: str) -> None:
    """Write Hydra's record of a run (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``, as Hydra
    would) with every literal secret at ``keys`` replaced, readable by this user only. Hydra itself
    writes none (``hydra.output_subdir: null``), so no secret reaches the disk on any exit path.
    An interpolation (``${oc.env:VAR}``) is kept: it names where the secret comes from, not the secret."""
    from omegaconf import OmegaConf, open_dict

    keys = list(keys)
    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(config):
        for key in keys:
            parent_key, _, name = key.rpartition(".")
            parent = OmegaConf.select(config, parent_key) if parent_key else config
            if parent is not None and name in parent and not OmegaConf.is_interpolation(parent, name) \
                    and parent[name]:
                parent[name] = REDACTED
    overrides = OmegaConf.create([_redacted_override(o, keys) for o in hydra_cfg.overrides.task])
    hydra = OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg, resolve=False)})
    hydra.hydra.overrides.task = overrides
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for name, node in (("config.yaml", config), ("hydra.yaml", hydra), ("overrides.yaml", overrides)):
        descriptor = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(node))


def _redacted_override(override: str, keys: List[str]) -> str:
    key, _, value = override.partition("=")
    if key.lstrip("+~") in keys and value and "${" not in value:
        return f"{key}={REDACTED}"
    return override


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text
