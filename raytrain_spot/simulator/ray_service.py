"""The main process of Ray's service on a virtual VM: ``ray start --block`` under ``KillMode=mixed``.

The embedded cluster starts each virtual node's raylet from the driver, so no ``ray start --block``
process exists. Where the node's start commands put Ray in such a service
(raytrain_spot/simulator/shutdown.py), the Spot simulator starts this process beside the node, and
the soft-off sends it the SIGTERM systemd would send the service's main process. It then does what
Ray 2.60's SIGTERM handler for ``ray start --block`` does (ray/_private/node.py,
``_drain_node_before_shutdown`` then ``kill_all_processes``): drain the node (reason PREEMPTION,
deadline ``--drain-timeout-s`` ahead), wait for its raylet to exit for at most that long (the
RPC's time counts against it, as in Ray), then SIGTERM the node's processes and exit 1.

    python -m raytrain_spot.simulator.ray_service --address HOST:PORT --node-id HEX --drain-timeout-s S \\
        --raylet-pid PID [--pid PID ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

logger = logging.getLogger(__name__)

EXIT_STOPPED = 1
"""Ray's handler ends with ``sys.exit(1)``."""


def _descendants(pid: int) -> List[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [p for child in children for p in (int(child), *_descendants(int(child)))]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _drain(address: str, node_id: str, deadline_s: float) -> None:
    from raytrain_spot.preemption.drain_decision import DrainDecision, Notice
    from raytrain_spot.preemption.ray_drain import DrainUnavailable, RayControlStore

    now = time.time()
    decision = DrainDecision(node_id=node_id, notice=Notice("sigterm", now), notice_s=deadline_s - now, margin_s=0.0)
    try:
        reply = RayControlStore(address).drain(decision)
    except (DrainUnavailable, RuntimeError) as error:  # Ray's handler stops the node anyway
        logger.warning("drain of %s failed (%s); stopping the node at the timeout", node_id, error)
        return
    logger.info("drain of %s %s", node_id, "accepted" if reply.accepted else f"rejected: {reply.rejection}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.simulator.ray_service")
    parser.add_argument("--address", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--drain-timeout-s", type=float, required=True)
    parser.add_argument("--raylet-pid", type=int, required=True)
    parser.add_argument("--pid", type=int, action="append", default=[], help="another process Ray started for the node")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s raytrain_spot.simulator.ray_service: %(message)s")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the simulator starts it blocked already
    signal.sigwait({signal.SIGTERM})  # the soft-off
    deadline = time.time() + args.drain_timeout_s
    logger.info("SIGTERM: draining node %s for up to %.1f s before stopping its processes", args.node_id,
                args.drain_timeout_s)
    threading.Thread(target=_drain, args=(args.address, args.node_id, deadline), daemon=True).start()
    while _running(args.raylet_pid) and time.time() < deadline:
        time.sleep(0.1)
    for root in (args.raylet_pid, *args.pid):
        for pid in (root, *_descendants(root)):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    logger.info("stopped node %s's processes", args.node_id)
    sys.stderr.flush()
    os._exit(EXIT_STOPPED)  # not sys.exit: the drain thread's RPC client must not be torn down mid-call


if __name__ == "__main__":
    sys.exit(main())
