"""The checkpoint tiers a process on a node reaches, and the copy-on of a node's copy of a step to them.

A handoff's step held by node copies alone is copied on to the shared tiers by the controller where it
is at risk (elastic/stranded.py), in a Ray task on a holding node that runs ``commit_node_copy``.
Nothing here imports torch: that task's process starts while the next group starts on the same node,
and importing the training stack there would compete with that group's start for the node's cores.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from raytrain_spot.checkpoint.format import checkpoint_key
from raytrain_spot.checkpoint.lease import LeaseGuard
from raytrain_spot.checkpoint.scratch import scratch_prefix
from raytrain_spot.checkpoint.tiers import HeadTier, StoreTier, Tier
from raytrain_spot.config.schema import Config, config_from_dict
from raytrain_spot.observe.events import EventLog
from raytrain_spot.observe.records import Checkpoint
from raytrain_spot.storage import open_store
from raytrain_spot.storage.store import LocalStore

logger = logging.getLogger(__name__)


def node_tiers(cfg: Config, storage_uri: str, head_store: Any, lease_owner: Optional[str],
               node_id: str) -> Tuple[Optional[StoreTier], List[Tier]]:
    """The node's own tier (None without one) and the shared tiers every node reaches, fastest first: the
    head (``head_store``, its actor), then durable storage (``storage_uri``, written while the driver
    holds the run's lease, ``lease_owner``)."""
    local = None
    if cfg.checkpoint.use_local and not cfg.checkpoint.sharded:  # one node holds only its ranks' shares
        local = StoreTier("local", LocalStore(cfg.checkpoint.local_root(storage_uri, node_id), sync=False),
                          cfg.run.name, cfg.checkpoint.keep_latest_k)
    durable_store = open_store(storage_uri)
    lease_check = LeaseGuard(durable_store, cfg.run.name, lease_owner) if lease_owner else None
    durable = StoreTier("durable", durable_store, cfg.run.name, cfg.checkpoint.keep_latest_k,
                        cfg.checkpoint.milestone_every_steps, lease_check=lease_check)
    rate = cfg.checkpoint.max_transfer_mbps * 1e6 if cfg.checkpoint.max_transfer_mbps else None
    return local, ([HeadTier(head_store, rate), durable] if head_store is not None else [durable])


def commit_node_copy(config: Dict[str, Any], storage_uri: str, head_store: Any, lease_owner: Optional[str],
                     events: Any, node_id: str, step: int) -> bool:
    """Commit ``node_id``'s verified copy of ``step`` on the first shared tier that takes it (the head
    forwards to durable storage itself); whether one did."""
    cfg = config_from_dict(config)
    local, shared = node_tiers(cfg, storage_uri, head_store, lease_owner, node_id)
    key = checkpoint_key(cfg.run.name, step)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=scratch_prefix("copy-on"),
                                     dir=cfg.checkpoint.local_root(storage_uri, node_id)) as scratch:
        manifest, paths = local.fetch(key, scratch)  # verified again: never upload what rotted
        for tier in shared:
            try:
                committed = tier.commit(key, paths, manifest)
            except Exception as error:  # the next tier may take it
                logger.warning("Cannot copy step %d on to the %s tier: %s: %s", step, tier.name,
                               type(error).__name__, error)
                continue
            EventLog(events).emit(Checkpoint(step=step, tier=tier.name, kind=committed.kind, stall_s=0.0,
                                             duration_s=time.time() - started,
                                             bytes=sum(entry.size for entry in committed.files.values())))
            return True
    return False
