"""How long Ray 2.60 takes to declare a powered-off node dead: the project's health-check
settings against Ray's defaults for the timeout, in one run.

A fresh embedded cluster (a head and two worker nodes) per setting; one worker node's processes
are frozen the way the Spot simulator powers a VM off (SIGSTOP: its sockets stay open and silent),
and the driver polls Ray's node table until the node is listed dead.

    python bench/bench_node_death.py            # ~2 minutes
"""

from __future__ import annotations

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from raytrain_spot.cluster import embedded  # noqa: E402

RAY_DEFAULT_TIMEOUT_MS = 10_000
"""Ray 2.60's ``health_check_timeout_ms``."""


def declared_dead_after_s(timeout_ms: int) -> float:
    from raytrain_spot.config.schema import ClusterConfig
    from raytrain_spot.simulator.chaos import freeze

    project = embedded.FAST_DEATH_DETECTION
    embedded.FAST_DEATH_DETECTION = {**project, "health_check_timeout_ms": timeout_ms}
    cluster = embedded.EmbeddedCluster(ClusterConfig(num_worker_nodes=2))
    embedded.FAST_DEATH_DETECTION = project
    import ray

    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        time.sleep(3)  # past the nodes' first health checks
        node = cluster.workers[0]
        freeze(node)
        frozen = time.time()
        while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            time.sleep(0.1)
        seconds = time.time() - frozen
        cluster.remove_worker_node(node)
        return seconds
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    embedded.force_loopback()  # before Ray is imported
    settings = embedded.FAST_DEATH_DETECTION
    results = {}
    for label, timeout_ms in (("this project", settings["health_check_timeout_ms"]),
                              ("Ray's default timeout", RAY_DEFAULT_TIMEOUT_MS)):
        results[label] = {"health_check_timeout_ms": timeout_ms,
                          "declared_dead_after_s": round(declared_dead_after_s(timeout_ms), 2)}
        print(f"{label}: {json.dumps(results[label])}", flush=True)
    print(f"health checks every {settings['health_check_period_ms']} ms, "
          f"{settings['health_check_failure_threshold']} misses; one powered-off node of 2")


if __name__ == "__main__":
    main()
