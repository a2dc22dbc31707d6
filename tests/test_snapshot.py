import torch

from raytrain_spot.checkpoint.snapshot import HostSnapshot


def test_snapshot_copies_into_reused_buffers_and_keeps_the_structure():
    model = torch.nn.Linear(4, 3)
    state = {"model": model.state_dict(), "groups": [{"lr": 0.1, "params": [0, 1]}], "step": (7, torch.tensor(2))}
    snapshots = HostSnapshot()
    first, _ = snapshots.take(state)
    assert first["groups"] == [{"lr": 0.1, "params": [0, 1]}] and first["step"][0] == 7
    assert isinstance(first["step"], tuple) and torch.equal(first["step"][1], torch.tensor(2))
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on: the snapshot must not change
    assert not torch.equal(first["model"]["weight"], model.weight)

    second, _ = snapshots.take({"model": model.state_dict(), "groups": [], "step": (8, torch.tensor(3))})
    assert second["model"]["weight"].data_ptr() == first["model"]["weight"].data_ptr(), "buffers are reused"
    assert torch.equal(second["model"]["weight"], model.weight) and second["step"][1].item() == 3
    assert snapshots.nbytes == sum(t.numel() * t.element_size() for t in (*model.state_dict().values(), torch.tensor(3)))


def test_a_tensor_of_another_shape_gets_a_new_buffer():
    snapshots = HostSnapshot()
    small, _ = snapshots.take([torch.ones(2)])
    large, _ = snapshots.take([torch.arange(5.0)])
    assert large[0].shape == (5,) and torch.equal(large[0], torch.arange(5.0))
    assert small[0].data_ptr() != large[0].data_ptr()


def test_reserved_buffers_are_the_ones_the_first_save_copies_into():
    state = {"model": torch.nn.Linear(64, 64).state_dict(), "step": torch.tensor(1)}
    snapshots = HostSnapshot()
    snapshots.reserve(state)
    reserved = snapshots.nbytes
    assert reserved == sum(t.numel() * t.element_size() for t in (*state["model"].values(), state["step"]))
    copy, _ = snapshots.take(state)
    assert snapshots.nbytes == reserved, "the save allocated nothing more"
    assert torch.equal(copy["model"]["weight"], state["model"]["weight"]) and copy["step"].item() == 1
