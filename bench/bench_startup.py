"""What a new worker process pays in imports before it trains: the floor under a restart.

Ray Train starts new worker processes for every new worker group, so each restart pays these
imports again. Each repeat runs a fresh interpreter that imports, in the order a Ray Train
worker meets them, Ray's worker, torch, Ray Train and ``torch._dynamo`` (which a torch
optimizer pulls in on first use), and times each increment; medians are printed.

    python bench/bench_startup.py --repeats 5      # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

STAGES = [("ray_worker", "import ray"), ("torch", "import torch"), ("ray_train", "import ray.train.torch"),
          ("torch_dynamo", "import torch._dynamo")]

PROBE = """
import json, time
times = {}
for name, statement in %r:
    started = time.perf_counter()
    exec(statement)
    times[name] = time.perf_counter() - started
print(json.dumps(times))
"""


def measure_once() -> dict:
    output = subprocess.run([sys.executable, "-c", PROBE % (STAGES,)], capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = [measure_once() for _ in range(args.repeats)]
    medians = {name: statistics.median(run[name] for run in runs) for name, _ in STAGES}
    for name, seconds in medians.items():
        print(f"{name}_import_s={seconds:.2f}")
    print(f"total_import_s={sum(medians.values()):.2f} (median of {args.repeats} fresh interpreters, in order)")


if __name__ == "__main__":
    main()
