"""A frozen base built once per node: later builds map the node's verified copy, and a copy that
is damaged, cut short, gone, of another model or not private is never mapped: the build falls back
to the model directory (and publishes a good copy again)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from raytrain_spot.loop.frozen_base import ENTRY, WEIGHTS, built_once_per_node, copy_dir

IDENTITY = {"model": "two-layer", "seed": 7}


class TiedModel(torch.nn.Module):
    """Tied input and output embeddings, a persistent and a non-persistent buffer, a frozen layer."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(32, width)
        self.hidden = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 32, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("scale", torch.rand(width))
        self.register_buffer("inv_freq", torch.rand(width), persistent=False)
        self.hidden.requires_grad_(False)

    def forward(self, tokens):
        return self.out(self.hidden(self.embed(tokens)) * self.scale + self.inv_freq)


class Builds:
    """A real build (seeded, so every build is the same model) that counts how often it runs."""

    def __init__(self, width: int = 16):
        self.width = width
        self.count = 0

    def build(self) -> torch.nn.Module:
        self.count += 1
        torch.manual_seed(7)
        return TiedModel(self.width)

    def skeleton(self) -> torch.nn.Module:
        with torch.device("meta"):
            return TiedModel(self.width)


def build(root, builds: Builds, identity=IDENTITY, **kwargs) -> torch.nn.Module:
    return built_once_per_node(identity, builds.build, builds.skeleton, root=str(root), keep_free=0.0, **kwargs)


def assert_same_model(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model.inv_freq, reference.inv_freq)
    tokens = torch.arange(8)
    assert torch.equal(model(tokens), reference(tokens))


def test_the_second_build_on_a_node_maps_the_first_ones_copy(tmp_path):
    builds = Builds()
    first = build(tmp_path, builds)
    assert builds.count == 1 and os.path.exists(os.path.join(copy_dir(str(tmp_path), IDENTITY), ENTRY))

    second = build(tmp_path, builds)
    assert builds.count == 1, "the second build loaded the model again"
    assert_same_model(second, first)
    assert second.out.weight is second.embed.weight, "the tied embeddings came back as two parameters"
    assert not any(p.requires_grad for p in second.hidden.parameters()) and second.embed.weight.requires_grad
    assert all(p.device.type == "cpu" for p in second.parameters())
    assert mapped_file(second.hidden.weight) == os.path.join(copy_dir(str(tmp_path), IDENTITY), WEIGHTS)
    assert mapped_file(first.hidden.weight) is None


def mapped_file(tensor: torch.Tensor):
    """The file whose mapping holds ``tensor``'s bytes (None: anonymous memory)."""
    address = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


def flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def cut_short(path):
    os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
    "a flipped byte": lambda d: flip_a_byte(os.path.join(d, WEIGHTS)),
    "a copy cut short": lambda d: cut_short(os.path.join(d, WEIGHTS)),
    "the weights gone": lambda d: os.remove(os.path.join(d, WEIGHTS)),
    "an unreadable entry": lambda d: open(os.path.join(d, ENTRY), "w").write("{not json"),
    "an entry without its checksum": lambda d: open(os.path.join(d, ENTRY), "w").write('{"size": 1}'),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_copy_is_never_mapped_the_build_falls_back_and_publishes_a_good_one(tmp_path, damage, caplog):
    builds = Builds()
    reference = build(tmp_path, builds)
    DAMAGE[damage](copy_dir(str(tmp_path), IDENTITY))

    with caplog.at_level(logging.WARNING, logger="raytrain_spot.loop.frozen_base"):
        rebuilt = build(tmp_path, builds)
    assert builds.count == 2, f"{damage}: the copy was used"
    assert "not usable" in caplog.text
    assert_same_model(rebuilt, reference)

    mapped = build(tmp_path, builds)
    assert builds.count == 2, "the rebuilt copy was not published again"
    assert_same_model(mapped, reference)


def test_a_copy_of_another_model_under_the_same_identity_is_refused(tmp_path, caplog):
    build(tmp_path, Builds(width=16))
    wider = Builds(width=24)
    with caplog.at_level(logging.WARNING, logger="raytrain_spot.loop.frozen_base"):
        model = build(tmp_path, wider)
    assert wider.count == 1 and "in the copy" in caplog.text
    assert model.hidden.weight.shape == (24, 24)


def test_a_new_identity_replaces_the_last_copy(tmp_path):
    builds = Builds()
    build(tmp_path, builds)
    build(tmp_path, builds, identity={**IDENTITY, "seed": 8})
    parent = os.path.dirname(copy_dir(str(tmp_path), IDENTITY))
    assert sorted(os.listdir(parent)) == [".lock", os.path.basename(copy_dir(str(tmp_path), {**IDENTITY, "seed": 8}))]


def test_no_copy_where_it_would_leave_less_than_the_share_kept_free(tmp_path, caplog):
    builds = Builds()
    with caplog.at_level(logging.WARNING, logger="raytrain_spot.loop.frozen_base"):
        for _ in range(2):
            built_once_per_node(IDENTITY, builds.build, builds.skeleton, root=str(tmp_path), keep_free=1.0)
    assert builds.count == 2 and "Not keeping the frozen weights" in caplog.text
    assert not os.path.exists(copy_dir(str(tmp_path), IDENTITY))


def test_a_directory_others_can_write_is_neither_read_nor_written(tmp_path, caplog):
    builds = Builds()
    build(tmp_path, builds)
    os.chmod(os.path.dirname(copy_dir(str(tmp_path), IDENTITY)), 0o777)
    with caplog.at_level(logging.WARNING, logger="raytrain_spot.loop.frozen_base"):
        build(tmp_path, builds)
    assert builds.count == 2 and "can write it" in caplog.text
