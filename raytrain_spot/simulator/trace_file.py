"""A Spot trace file (``../shared/traces/`` format), read and checked once: the simulator replays
what this returns, and the config check calls it, so a malformed file stops the run before Ray."""

from __future__ import annotations

import json
import os
from typing import List, Tuple

from raytrain_spot.config.errors import ConfigError

FORMAT = '{"metadata": {"gap_seconds": SECONDS}, "data": [NODES_ALIVE, ...]}'


def read_trace(path: str) -> Tuple[List[int], float]:
    """Counts (nodes alive per tick) and tick seconds of a trace file; ConfigError naming
    ``chaos.trace``, what is wrong and the expected format when it is not one."""
    def bad(problem: str) -> ConfigError:
        return ConfigError(f"chaos.trace: {path} {problem}. Fix: point chaos.trace at a trace file of the form "
                           f"{FORMAT}")

    try:
        with open(os.path.expanduser(path)) as f:
            document = json.load(f)
    except OSError as error:
        raise bad(f"cannot be read ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad(f"is not JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("metadata"), dict):
        raise bad("has no \"metadata\" object")
    gap = document["metadata"].get("gap_seconds")
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or gap <= 0:
        raise bad(f"has metadata.gap_seconds={gap!r}, not a positive number of seconds")
    data = document.get("data")
    if not isinstance(data, list) or not data:
        raise bad("has no \"data\" list of node counts")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in data):
        raise bad("has a \"data\" entry that is not a node count (an integer >= 0)")
    return list(data), float(gap)
