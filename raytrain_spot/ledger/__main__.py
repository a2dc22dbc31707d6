"""``python -m raytrain_spot.ledger RUN_DIR``: rebuild ledger.json and ledger.png, print the table."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from raytrain_spot.events import EVENTS_FILE
from raytrain_spot.ledger.ledger import LedgerOptions, format_table, write_ledger
from raytrain_spot.pricing import PriceCatalog, PriceNotFound


def _configured_min_workers(run_dir: str) -> Optional[int]:
    """``trainer.min_workers`` from the Hydra config saved in the run directory, if there is one."""
    path = os.path.join(run_dir, ".hydra", "config.yaml")
    if not os.path.exists(path):
        return None
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    value = (config.get("trainer") or {}).get("min_workers")
    return int(value) if value is not None else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.ledger", description=__doc__)
    parser.add_argument("run_dir", help="a run directory holding events.jsonl")
    parser.add_argument("--prices", default=None, help="user price file (JSON or YAML) merged over the catalog")
    parser.add_argument("--region", default=None, help="region to price in (default: the catalog's)")
    parser.add_argument("--min-workers", type=int, default=None,
                        help="trainer.min_workers (default: the run's saved Hydra config, else 1)")
    parser.add_argument("--no-plot", action="store_true", help="skip ledger.png")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.run_dir, EVENTS_FILE)):
        print(f"{args.run_dir}: no {EVENTS_FILE} here; pass the run directory (outputs/<run.name>)", file=sys.stderr)
        return 2
    try:
        catalog = PriceCatalog.load(args.prices)
    except (OSError, ValueError, PriceNotFound) as error:
        print(f"price file {args.prices}: {error}", file=sys.stderr)
        return 2
    min_workers = args.min_workers if args.min_workers is not None else _configured_min_workers(args.run_dir)
    summary = write_ledger(args.run_dir, catalog, LedgerOptions(min_workers=min_workers, region=args.region),
                           plot=not args.no_plot)
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
