"""The watcher's side of Ray: finding this machine's node in Ray's Global Control Store (GCS) and
asking the GCS to drain it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence

from raytrain_spot.preemption.drain_decision import DrainDecision

@dataclass(frozen=True)
class AliveNode:
    node_id: str
    ip: str
    is_head: bool = False


class NodeLookupError(RuntimeError):
    """This machine's Ray node cannot be identified; the message says what to pass."""


class NodeNotRegistered(NodeLookupError):
    """No alive node matches (yet): it may still be registering."""


def pick_node_id(alive: Sequence[AliveNode], ip: str, gcs_address: str) -> str:
    """The id of the one alive node with this IP; raise NodeLookupError otherwise.

    A head node on the same machine does not count: the watcher runs on worker VMs, and the
    head (on-demand, never preempted) is never the node to drain."""
    matches = [node for node in alive if node.ip == ip]
    if len(matches) > 1:
        matches = [node for node in matches if not node.is_head]
    if len(matches) == 1:
        return matches[0].node_id
    if not matches:
        raise NodeNotRegistered(f"no alive Ray node has IP {ip} in the cluster at {gcs_address} "
                              f"(alive: {sorted({node.ip for node in alive})}); start the watcher after "
                              "`ray start` on this node, or pass --node-id")
    raise NodeLookupError(f"{len(matches)} alive Ray nodes share IP {ip} in the cluster at {gcs_address} "
                          f"({', '.join(node.node_id for node in matches)}); pass --node-id")


def check_node_alive(alive: Sequence[AliveNode], node_id: str, gcs_address: str) -> None:
    """Raise NodeLookupError unless node_id is alive. Needed because the GCS accepts a drain
    of any id, even one that never existed, so a typo would go unnoticed until the VM dies."""
    if not any(node.node_id == node_id for node in alive):
        raise NodeNotRegistered(f"node {node_id} is not an alive node of the cluster at {gcs_address}; "
                              "check --node-id (hex, as `ray list nodes` shows it)")


class DrainUnavailable(Exception):
    """The drain request did not reach the GCS or got no answer; retrying may work."""


@dataclass(frozen=True)
class DrainReply:
    accepted: bool
    rejection: str


class Drainer(Protocol):
    def drain(self, decision: DrainDecision) -> DrainReply:
        """Ask Ray to drain the node; raise DrainUnavailable when the request may not have landed."""


class RayControlStore:
    """Ray's Global Control Store (GCS) of this cluster, not Google Cloud Storage: looks up nodes and drains them."""

    def __init__(self, address: str, *, rpc_timeout_s: float = 5.0):
        from raytrain_spot._ray import GcsClient

        self.address = address
        self._rpc_timeout_s = rpc_timeout_s
        # Connecting waits for the GCS (about 40 s when it is down), then raises.
        self._client = GcsClient(address=address)

    def alive_nodes(self) -> List[AliveNode]:
        from raytrain_spot._ray import GcsNodeInfo

        infos = self._client.get_all_node_info(timeout=self._rpc_timeout_s,
                                               state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
        return [AliveNode(node_id=node_id.hex(), ip=info.node_manager_address, is_head=info.is_head_node)
                for node_id, info in infos.items()]

    def drain(self, decision: DrainDecision) -> DrainReply:
        from raytrain_spot._ray import DrainNodeReason

        try:
            accepted, rejection = self._client.drain_node(
                decision.node_id, DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), decision.message,
                decision.deadline_ms, timeout=self._rpc_timeout_s)
        # Ray's client raises several unrelated types (RpcError, RaySystemError, timeouts); each
        # means "not drained yet", and retrying until the hard stop is the only useful answer.
        except Exception as error:  # noqa: BLE001
            raise DrainUnavailable(f"{type(error).__name__}: {error}") from error
        return DrainReply(accepted=bool(accepted), rejection=str(rejection))


def discover_gcs_address() -> str:
    """The GCS address the way ``ray.init()`` finds it: ``RAY_ADDRESS``, else the address the
    last ``ray start`` on this machine wrote (head and worker nodes both write it).

    Like ``ray.init()``, a cluster found on this machine (not named by ``RAY_ADDRESS``) also turns
    token authentication on when this machine has a token: ``ray start`` enables it by default,
    and the GCS then refuses clients without the token. An explicit address never does, so
    with one the caller sets ``RAY_AUTH_MODE=token`` itself, as for ``ray.init(address)``.
    """
    from raytrain_spot._ray import canonicalize_bootstrap_address_or_die, maybe_enable_token_auth_if_token_available

    address = canonicalize_bootstrap_address_or_die("auto")
    if not os.environ.get("RAY_ADDRESS"):
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return address


def resolve_node_id(gcs: RayControlStore, node_id: Optional[str], *, wait_s: float = 30.0) -> str:
    """Check ``node_id``, or find this machine's node by its IP. Waits up to ``wait_s`` for the
    node to register (the watcher may start right after ``ray start``)."""
    from raytrain_spot._ray import get_node_ip_address

    give_up_at = time.monotonic() + wait_s
    while True:
        alive = gcs.alive_nodes()
        try:
            if node_id is not None:
                check_node_alive(alive, node_id, gcs.address)
                return node_id
            # The address this machine uses towards the GCS is the one its raylet registered with.
            return pick_node_id(alive, get_node_ip_address(gcs.address), gcs.address)
        except NodeNotRegistered:
            if time.monotonic() >= give_up_at:
                raise
        time.sleep(1.0)
