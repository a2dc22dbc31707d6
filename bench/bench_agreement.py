"""What the step agreement's all-reduce costs a DDP step, alone: torch and gloo, no Ray.

The framework's loop makes one collective per step beside DDP's gradient all-reduce: the step
agreement (loop/agreement.py), started after the step and waited for after the next batch
has loaded. This benchmark runs the same DDP step on ``--ranks`` gloo processes on this machine
(one torch thread each, like the Train workers) in blocks of ``--steps`` steps, alternating
two loops in the same process group:

* **ddp**: load a batch (CPU work standing in for the collate), then the framework's
  ``train_step`` on a DDP-wrapped MLP;
* **ddp+agreement**: the same, plus ``start_agreement`` after the step and ``result()`` after
  the next batch has loaded, as the framework's loop does;
* **ddp+agreement-sync**: ``start_agreement(...).result()`` before the next batch loads;
* **ddp+agreement-in-bucket**: a design measured to decide it (docs/benchmarks.md: it costs more
  than it saves here, so the framework does not use it): the agreement's slots ride in DDP's last
  gradient bucket (a comm hook appends them, each float64 as two float32 parts, and splits them
  off after the one all-reduce), so a step makes one collective.

Every loop runs under the same comm hook (gradient averaging, as DDP's own), so the figures
differ only by what each loop adds.

It prints the median step time of each over all blocks and the ratio, so the second
collective's cost is measured apart from Ray, standbys and the rest of the framework.

    python bench/bench_agreement.py                       # ~1 minute on 2 cores
    python bench/bench_agreement.py --blocks 10 --steps 200 --hidden 1024
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from raytrain_spot.loop.agreement import RankView, start_agreement  # noqa: E402
from raytrain_spot.distributed.collectives import RankGroup  # noqa: E402
from raytrain_spot.loop.step import train_step  # noqa: E402

LOOPS = ("ddp", "ddp+agreement", "ddp+agreement-sync", "ddp+agreement-in-bucket")


def load(batch: int, hidden: int, generator: torch.Generator):
    """A batch built with CPU work, as a collate builds one."""
    inputs = torch.randn(batch, hidden, generator=generator)
    return [((inputs.tanh(), inputs.sum(dim=1, keepdim=True)), batch)]


def loss(model, batch):
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).squeeze(1)


class BucketCarrier:
    """Comm hook state: the slots to append to the last bucket's all-reduce (None: none this step)."""

    def __init__(self, world_size: int):
        self.world_size, self.slots, self.summed = world_size, None, None

    def stage(self, values) -> None:
        wide = torch.tensor(values, dtype=torch.float64)
        high = wide.float()
        self.slots = torch.cat([high, (wide - high.double()).float()])

    def result(self) -> list:
        half = len(self.summed) // 2
        return (self.summed[:half].double() + self.summed[half:].double()).tolist()


def averaging_hook(carrier: BucketCarrier, bucket):
    gradients = bucket.buffer().div_(carrier.world_size)
    if carrier.slots is None or not bucket.is_last():
        return dist.all_reduce(gradients, async_op=True).get_future().then(lambda fut: fut.value()[0])
    joined = torch.cat([gradients, carrier.slots])
    carrier.slots = None

    def split(fut):
        summed = fut.value()[0]
        carrier.summed = summed[len(gradients):]
        gradients.copy_(summed[:len(gradients)])
        return gradients
    return dist.all_reduce(joined, async_op=True).get_future().then(split)


def worker(rank: int, args, port: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[layer for _ in range(args.layers)
                                  for layer in (torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU())],
                                torch.nn.Linear(args.hidden, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    carrier = BucketCarrier(args.ranks)
    ddp.register_comm_hook(carrier, averaging_hook)
    slots = [0.0] * (9 + args.ranks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    group = RankGroup(torch.device("cpu"))
    generator = torch.Generator().manual_seed(rank)
    times = {name: [] for name in LOOPS}
    for block in range(len(LOOPS) * args.blocks):
        name = LOOPS[block % len(LOOPS)]
        batch = load(args.batch, args.hidden, generator)
        for _ in range(args.steps):
            started = time.perf_counter()
            if name == "ddp+agreement-in-bucket":
                carrier.stage(slots)  # the last step's values: the cost, not the semantics, is measured
            loss_sum = train_step(ddp, optimizer, batch, loss, 1.0 / (args.batch * args.ranks), 1.0)
            if name == "ddp+agreement":
                pending = start_agreement(RankView(loss_sum), group)
                batch = load(args.batch, args.hidden, generator)
                pending.result()
            elif name == "ddp+agreement-sync":
                start_agreement(RankView(loss_sum), group).result()
                batch = load(args.batch, args.hidden, generator)
            else:
                if name == "ddp+agreement-in-bucket":  # decode the agreement, as the loop would act on it
                    slots[0] = carrier.result()[0] + loss_sum
                batch = load(args.batch, args.hidden, generator)
            times[name].append(time.perf_counter() - started)
    if rank == 0:
        results.update({name: statistics.median(seconds) for name, seconds in times.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6, help="blocks of each loop, alternating")
    parser.add_argument("--steps", type=int, default=150, help="steps per block")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=12, help="samples per rank and step")
    args = parser.parse_args()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, port, results), nprocs=args.ranks)
        medians = dict(results)
    print(f"{args.ranks} gloo ranks, {os.cpu_count()} CPUs, MLP {args.layers}x{args.hidden}, batch {args.batch} per rank, "
          f"{args.blocks} alternating blocks of {args.steps} steps each")
    for name in LOOPS:
        print(f"{name:24} median step {medians[name] * 1000:.2f} ms")
    for name in LOOPS[1:]:
        print(f"{name} / ddp step time: {medians[name] / medians['ddp']:.3f}")


if __name__ == "__main__":
    main()
