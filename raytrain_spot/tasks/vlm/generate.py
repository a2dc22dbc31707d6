"""Write the generated shapes dataset: ``python -m raytrain_spot.tasks.vlm.generate OUT [--num-samples N]``."""

from __future__ import annotations

import argparse
import os

from raytrain_spot.tasks.vlm.config import CaptionDataConfig
from raytrain_spot.tasks.vlm.parquet import DATASET_MANIFEST, write_generated_dataset


def main(argv=None) -> None:
    defaults = CaptionDataConfig()
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.tasks.vlm.generate", description=__doc__)
    parser.add_argument("out", help="directory to create (must not exist)")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--max-shapes", type=int, default=defaults.max_shapes)
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size)
    parser.add_argument("--row-group-size", type=int, default=defaults.row_group_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"{args.out} exists; choose a new directory")
    cfg = CaptionDataConfig(num_samples=args.num_samples, image_size=args.image_size, max_shapes=args.max_shapes,
                     shard_size=args.shard_size, row_group_size=args.row_group_size)
    write_generated_dataset(args.out, cfg, args.seed)
    print(f"wrote {cfg.num_samples} samples to {args.out} ({DATASET_MANIFEST} last); "
          f"train on it with task.data.path={os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
