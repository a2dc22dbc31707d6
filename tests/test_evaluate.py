"""Evaluation: each sample of the task's evaluation set counts once at any world size, a notice
stops it, and the loop evaluates every eval.every_steps and at the end, logged beside the loss."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_spot.config.schema import EvalConfig
from raytrain_spot.distributed.collectives import RankGroup
from raytrain_spot.loop.evaluate import Evaluation
from tests.test_loop import NODES, FaultInjector, LinearTask, config, of, train_group

SET_SIZE = 23  # not a multiple of any world size or micro-batch: ranks get unequal shares


class Values:
    """Sample i is the number i + 1: its loss is itself, so the set's mean loss is known."""

    def __len__(self):
        return SET_SIZE

    def __getitem__(self, index):
        return torch.tensor([float(index + 1)])


class ValueTask(LinearTask):
    def collate(self, samples):
        return torch.stack(samples)

    def eval_loss(self, model, batch):
        return batch[:, 0] * 1.0


def _evaluate(rank, world_size, init_file, out, interrupt_after_calls):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        calls = []

        def leaving_ranks(step):
            calls.append(step)
            return [1] if interrupt_after_calls and len(calls) > interrupt_after_calls and rank == 1 else []

        evaluation = Evaluation(ValueTask(), Values(), every_steps=5, micro_batch_size=4,
                                group=RankGroup(torch.device("cpu")), leaving_ranks=leaving_ranks)
        model = torch.nn.Linear(1, 1)
        result = evaluation.run(model, step=10)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"result": None if result is None else [result.loss, result.samples],
                       "training_mode_kept": model.training, "due": [evaluation.due(s) for s in (5, 7, 10)]}, f)
    finally:
        dist.destroy_process_group()


def evaluate(tmp_path, world_size: int, interrupt_after_calls: int = 0) -> list:
    out = tmp_path / f"eval-{world_size}-{interrupt_after_calls}"
    mp.start_processes(_evaluate, args=(world_size, str(tmp_path / f"pg-{world_size}-{interrupt_after_calls}"),
                                        str(out), interrupt_after_calls), nprocs=world_size, start_method="spawn")
    return [json.loads(open(f"{out}.{r}").read()) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_counts_once_at_any_world_size(tmp_path, world_size):
    ranks = evaluate(tmp_path, world_size)
    assert [r["result"] for r in ranks] == [[np.mean(np.arange(1, SET_SIZE + 1)), SET_SIZE]] * world_size
    assert all(r["training_mode_kept"] for r in ranks), "the model goes back to train mode"
    assert ranks[0]["due"] == [True, False, True]


def test_a_notice_one_rank_hears_stops_the_evaluation_on_every_rank(tmp_path):
    assert [r["result"] for r in evaluate(tmp_path, 2, interrupt_after_calls=1)] == [None, None]


@dataclass
class EvaluatedTask(LinearTask):
    def build_eval_dataset(self, seed):
        rng = np.random.default_rng(seed + 1)
        return [(torch.from_numpy(x), torch.tensor([x @ np.arange(1, 9, dtype=np.float32)]))
                for x in rng.standard_normal((13, 8)).astype(np.float32)]

    def eval_examples(self, model, dataset, device):
        assert not isinstance(model, torch.nn.parallel.DistributedDataParallel) and not model.training
        x, y = dataset[0]
        return [{"target": f"{float(y):.3f}", "prediction": f"{float(model(x.to(device))):.3f}"}]


def test_the_loop_evaluates_every_n_steps_and_at_the_end_the_same_at_any_world_size(tmp_path):
    cfg = config(max_steps=10)
    cfg.eval = EvalConfig(every_steps=4)
    cfg.task = {"_target_": "tests.test_evaluate.EvaluatedTask"}
    runs = []
    for world_size in (1, 2):
        (tmp_path / f"ws{world_size}").mkdir()
        runs.append(train_group(tmp_path / f"ws{world_size}", world_size, FaultInjector(NODES), cfg,
                                task=EvaluatedTask()))
    one, two = runs
    evals = [[(e["step"], e["samples"]) for e in of(run[0], "eval")] for run in (one, two)]
    assert evals == [[(4, 13), (8, 13), (10, 13)]] * 2
    assert of(two[1], "eval") == [], "rank 0 logs it"
    assert [list(e["examples"][0]) for e in of(two[0], "eval")] == [["target", "prediction"]] * 3
    for a, b in zip(of(one[0], "eval"), of(two[0], "eval")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), "the same weights, each sample once"
    losses = [e["loss"] for e in of(one[0], "eval")]
    assert losses[-1] < losses[0], "it learns what it is evaluated on"


def test_an_evaluation_has_its_progress_line():
    from raytrain_spot.observe.progress import format_event

    line = format_event({"t": 0.0, "ev": "eval", "step": 100, "loss": 0.42129, "samples": 192, "duration_s": 0.3},
                        300, None)
    assert line == "[eval] step 100 | loss 0.4213 over 192 samples"
