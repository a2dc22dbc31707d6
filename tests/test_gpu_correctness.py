"""What changes between a CPU here and GPUs there: DDP's gradient memory, the start-up parameter digest."""

import pytest
import torch

from raytrain_spot.loop.worker import parameter_digest, wrap_ddp

pytestmark = pytest.mark.usefixtures("single_rank_group")


def test_ddp_keeps_gradients_as_views_of_its_buckets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    ddp = wrap_ddp(model, torch.device("cpu"), unused_parameters=False)
    for _ in range(2):  # the second step is after zero_grad(set_to_none=True), as the train step does
        model.zero_grad(set_to_none=True)
        ddp(torch.randn(8, 16)).square().mean().backward()
        assert all(p.grad._is_view() for p in model.parameters())


def test_the_digest_is_the_same_for_the_same_bits_in_another_memory_layout():
    # A float sum's last bits follow the reduction order, which a layout (or another GPU model's
    # kernel) changes: equal parameters must not look different.
    torch.manual_seed(0)
    weights = torch.randn(1024, 4097)
    one, other = torch.nn.Linear(4097, 1024, bias=False), torch.nn.Linear(4097, 1024, bias=False)
    one.weight = torch.nn.Parameter(weights.clone())
    other.weight = torch.nn.Parameter(weights.t().contiguous().t())
    assert torch.equal(one.weight, other.weight) and one.weight.stride() != other.weight.stride()
    assert parameter_digest(one) == parameter_digest(other)


def test_the_digest_sees_one_ulp_in_one_parameter_of_any_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64).to(dtype)
        before = parameter_digest(model)
        with torch.no_grad():
            model.weight[3, 5] = torch.nextafter(model.weight[3, 5], torch.tensor(float("inf"), dtype=dtype))
        assert parameter_digest(model) != before
