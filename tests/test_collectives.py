"""The loop's collectives run on the device their process group needs.

NCCL (the training group on GPUs) takes CUDA tensors only. There is no GPU here, so the tests
make the *default* device a fake one (``meta``) while the training device is the CPU: any
tensor the loop creates without placing it on the training device lands on ``meta``, and
``RankGroup`` refuses it, as NCCL would refuse a CPU tensor.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_spot.loop.agreement import Proposal, RankView, StepAgreement, agree
from raytrain_spot.distributed.collectives import CollectiveDeviceError, RankGroup

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store", rank=0, world_size=1)
    yield RankGroup.for_training(CPU)
    dist.destroy_process_group()


def test_a_tensor_off_the_training_device_is_refused_with_the_fix(one_rank):
    with pytest.raises(CollectiveDeviceError, match=r"on meta.*training device cpu.*device=cpu"):
        one_rank.all_reduce_sum(torch.zeros(3, device="meta"))


def test_the_step_agreement_creates_its_tensor_on_the_training_device(one_rank):
    with torch.device("meta"):  # whatever is not placed explicitly lands here
        agreement = agree(RankView(loss_sum=2.5, leaving_ranks=[0], proposal=Proposal(grow_to=3), save_due=True,
                                   committed_step=40, step_s=0.25), one_rank)
    assert agreement == StepAgreement(loss_sum=2.5, leaving_ranks=[0], grow_to=3, save_due=True, committed_step=40,
                                      step_s=0.25)


def test_object_collectives_stay_off_the_training_device(one_rank):
    with torch.device("meta"):
        assert one_rank.all_gather_object(("node", 1.5)) == [("node", 1.5)]
        assert one_rank.broadcast_object({"step": 7}, src=0) == {"step": 7}


def _two_ranks(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    group = RankGroup.for_training(CPU)
    # Rank 1 alone knows rank 1 is leaving; only rank 0's decisions count.
    view = RankView(loss_sum=1.0 + rank, leaving_ranks=[1] if rank == 1 else [],
                    proposal=Proposal(grow_to=4 + rank, holding_for=1 + 2 * rank), save_due=rank == 1, committed_step=10 * (rank + 1), commit_s=0.25 + rank,
                    step_s=0.5 + 8 * rank, at=1_790_000_000.123456 + 5 * rank)
    agreement = agree(view, group)
    placements = group.all_gather_object(f"node-{rank}")
    shipped = group.broadcast_object("state" if rank == 1 else None, src=1)
    # A checkpoint for a rank without a copy: the nest, its plain values, each tensor (a strided one too).
    weights = torch.arange(12.0).reshape(3, 4)
    state = {"model": {"w": weights.t(), "n": torch.tensor(7)}, "loop": {"step": 3}, "groups": [(1, torch.ones(2))]}
    received = group.broadcast_state(state if rank == 1 else None, src=1)
    torch.save((agreement, placements, shipped, received), f"{results}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_agree_on_the_sum_any_notice_and_rank_zeros_decisions(tmp_path):
    results = str(tmp_path / "result")
    mp.start_processes(_two_ranks, args=(str(tmp_path / "store"), results), nprocs=2, start_method="spawn")
    outcomes = [torch.load(f"{results}.{rank}", weights_only=False) for rank in (0, 1)]
    assert outcomes[0][:3] == outcomes[1][:3]
    agreement, placements, shipped, received = outcomes[0]
    weights = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(received["model"]["w"], weights.t()) and received["model"]["n"].item() == 7
    assert received["loop"] == {"step": 3} and isinstance(received["groups"][0], tuple)
    assert received["groups"][0][0] == 1 and torch.equal(received["groups"][0][1], torch.ones(2))
    assert agreement == StepAgreement(loss_sum=3.0, leaving_ranks=[1], grow_to=4, save_due=False, committed_step=10,
                                      step_s=0.5, at=1_790_000_000.123456, holding_for=1, commit_s=0.25), \
        "rank 0's clock, to the microsecond"
    assert placements == ["node-0", "node-1"] and shipped == "state"
