"""The store-first process group setup (raytrain_spot/distributed/process_group.py), through Ray Train itself."""

from datetime import timedelta

import pytest
import ray
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raytrain_spot.distributed import process_group
from raytrain_spot.distributed.process_group import StoreFirstTorchConfig, open_store


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_the_store_listens_when_rank_0_hands_out_its_address(local_ray):
    address, port = open_store(world_size=2, timeout_s=30)
    process_group._listening.set("from-rank-0", "here")
    # A client's first connection attempt succeeds: one that comes early backs off for most of a second.
    client = dist.TCPStore(address, port, 2, is_master=False, timeout=timedelta(seconds=2))
    assert client.get("from-rank-0") == b"here"


def test_every_rank_joins_through_rank_0s_store_with_the_launcher_environment(local_ray, tmp_path):
    def train_fn():
        import os

        import ray.train
        import torch

        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        assert total.item() == 3.0
        context = ray.train.get_context()
        assert dist.get_backend() == "gloo" and dist.get_world_size() == context.get_world_size() == 2
        assert os.environ["RANK"] == str(dist.get_rank()) and os.environ["WORLD_SIZE"] == "2"
        assert {"LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} <= set(os.environ)
        # Rank 0's store is the one this module opened: Ray Train ran our backend, not its own.
        if dist.get_rank() == 0:
            assert process_group._listening is not None
            assert int(os.environ["MASTER_PORT"]) == process_group._listening.port

    # A failed assertion in a worker fails the run: fit() raises it.
    result = TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=2),
                          torch_config=StoreFirstTorchConfig(backend="gloo", timeout_s=60),
                          run_config=RunConfig(name="store-first", storage_path=str(tmp_path))).fit()
    assert result.error is None


def test_only_the_backends_it_sets_up():
    with pytest.raises(ValueError, match="gloo or nccl"):
        StoreFirstTorchConfig(backend="hccl")
