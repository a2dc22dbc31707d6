"""``raytrain-spot``: one entry point for every tool, each the same as its ``python -m`` form.

    raytrain-spot run +experiment=vlm ...     = python -m raytrain_spot.run +experiment=vlm ...
    raytrain-spot COMMAND --help              the command's own options
"""

from __future__ import annotations

import runpy
import sys
from typing import Dict, List, Optional, Tuple

COMMANDS: Dict[str, Tuple[str, str]] = {
    "run": ("raytrain_spot.run", "train (Hydra overrides: +experiment=vlm, trainer.max_steps=..., cluster=existing)"),
    "plan": ("raytrain_spot.cost.plan", "simulate on-demand / Spot / hybrid strategies: cost, goodput, deadline"),
    "ledger": ("raytrain_spot.cost.ledger", "rebuild a run's goodput and cost ledger from its event log"),
    "verify": ("raytrain_spot.checkpoint.verify", "check every checkpoint of a run on every tier (manifest, sizes, CRC32C)"),
    "cluster-check": ("raytrain_spot.cluster.check", "validate a cluster YAML before `ray up`"),
    "export": ("raytrain_spot.export", "model-only export of a checkpoint (torch, or the Hugging Face format)"),
    "generate-data": ("raytrain_spot.tasks.vlm.generate", "write the generated shapes dataset as Parquet shards"),
    "watcher": ("raytrain_spot.preemption.watcher", "the per-VM preemption watcher (the cluster YAMLs start it)"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: raytrain-spot COMMAND [ARGS...]   (raytrain-spot COMMAND --help for its options)", "",
             "Elastic PyTorch training on Spot VMs with Ray. Commands (each also runs as python -m MODULE):"]
    lines += [f"  {name:<{width}}  {summary}  [{module}]" for name, (module, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"raytrain-spot: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    # The module reads its own arguments and exits with its own status, exactly as under `python -m`.
    sys.argv = [f"raytrain-spot {name}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
