"""Prove that every GPU worker of a running cluster trains on its GPUs: one probe per GPU node.

    ray exec cluster/gcp-spot.yaml 'python -m raytrain_spot.cluster.gpu_report'

Connects to the cluster (``RAY_ADDRESS``, else ``auto``), runs ``gpu_setup_check``'s probe as a
Ray task pinned to each alive node that declares GPUs, holding all of that node's GPUs (so run it
before training starts, or it waits for them up to ``--timeout-s``), and prints one line per node:
torch, its CUDA, the driver and the GPUs torch sees there. Exit status 0 when every GPU node
passes; 1 when one fails, times out, or the cluster has no GPU node.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import List, Optional

from raytrain_spot.cluster.gpu_setup_check import GpuFacts, gather, problems


@dataclass(frozen=True)
class NodeReport:
    node_ip: str
    gpus: int
    """GPUs the node declares to Ray (its type's resources.GPU)."""
    facts: Optional[GpuFacts]
    problems: List[str]

    def __str__(self) -> str:
        if self.facts is None:
            seen = "no answer"
        else:
            seen = (f"torch {self.facts.torch_version} (CUDA {self.facts.torch_cuda}), driver "
                    f"{self.facts.driver_version}, sees {self.facts.device_count} of {self.gpus} GPU(s)")
        return f"{self.node_ip}: {'FAIL' if self.problems else 'ok'}: {seen}" + "".join(
            f"\n    {problem}" for problem in self.problems)


def _probe(expect_gpus: int):
    facts = gather()
    return facts, problems(facts, expect_gpus)


def report(timeout_s: float) -> List[NodeReport]:
    """One report per alive node that declares GPUs; needs ``ray.init`` done."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]
    pending = []
    for node in nodes:
        gpus = int(node["Resources"]["GPU"])
        probe = ray.remote(num_cpus=0, num_gpus=gpus, max_retries=0,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))(_probe)
        pending.append((node["NodeManagerAddress"], gpus, probe.remote(gpus)))
    ready, _ = ray.wait([ref for _, _, ref in pending], num_returns=len(pending), timeout=timeout_s)
    reports = []
    for ip, gpus, ref in pending:
        if ref in ready:
            facts, found = ray.get(ref)
            reports.append(NodeReport(ip, gpus, facts, found))
        else:
            ray.cancel(ref, force=True)
            reports.append(NodeReport(ip, gpus, None, [f"no answer within {timeout_s:g} s: its GPUs are busy "
                                                       "(training?) or the node is stuck; run it before training"]))
    return reports


def main(argv: Optional[List[str]] = None) -> int:
    import ray

    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.cluster.gpu_report", description=__doc__.split("\n")[0])
    parser.add_argument("--timeout-s", type=float, default=120.0, help="how long to wait for every node's answer")
    args = parser.parse_args(argv)
    ray.init(address="auto", logging_level="ERROR")
    reports = report(args.timeout_s)
    for node in reports:
        print(node)
    if not reports:
        print("no alive node declares GPUs: are the workers up (ray status)?", file=sys.stderr)
        return 1
    failed = sum(1 for node in reports if node.problems)
    print(f"{len(reports) - failed} of {len(reports)} GPU node(s) ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
