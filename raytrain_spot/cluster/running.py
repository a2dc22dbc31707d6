"""Whether this machine is on a running Ray cluster (a head node of ``ray up``, a ``ray start``
node), for code that chooses between joining it and starting the embedded one (notebooks).

Ray's own rule for ``address="auto"``: ``$RAY_ADDRESS``, else the address the last ``ray start``
on this machine recorded (``ray stop`` removes the record). A record left by a node that died
without ``ray stop`` names a port nothing answers on: that is no cluster.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from raytrain_spot.cluster.embedded import PROBE_TIMEOUT_S, ray_address_file


def running_cluster_address() -> Optional[str]:
    """``host:port`` of the Ray cluster this machine is on, or None: there is none."""
    if address := os.environ.get("RAY_ADDRESS"):
        return address
    try:
        with open(ray_address_file()) as f:
            address = f.read().strip()
    except FileNotFoundError:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return None
    return address
