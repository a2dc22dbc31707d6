"""The Hugging Face presets: the real-size ones are the size their names say, every preset writes
without building a model, and what it writes loads as a model directory (local files only)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from raytrain_spot.tasks.hf_vlm.presets import PRESETS, parameter_count, write_preset  # noqa: E402
from raytrain_spot.tasks.hf_vlm.task import model_image_token_id  # noqa: E402
from tests.hf_families import family  # noqa: E402

REAL_SIZE = {"smolvlm-256m": 256e6, "smolvlm-500m": 500e6, "smolvlm-2.2b": 2.2e9}


def test_every_real_size_preset_is_listed():
    assert sorted(REAL_SIZE) == sorted(name for name in PRESETS if not name.startswith("tiny-"))


@pytest.mark.parametrize("name", sorted(REAL_SIZE))
def test_a_real_size_preset_has_the_parameters_its_name_says(name):
    assert parameter_count(name) == pytest.approx(REAL_SIZE[name], rel=0.10)


@pytest.mark.parametrize("name", [family(name) for name in sorted(PRESETS)])
def test_a_preset_writes_without_building_a_model_and_loads_from_local_files(tmp_path, monkeypatch, name):
    import transformers
    from transformers import AutoConfig, AutoProcessor

    def no_model(*args, **kwargs):
        raise AssertionError("writing a preset built a model")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", no_model)
    write_preset(name, str(tmp_path / name))
    assert not any(path.suffix in (".safetensors", ".bin") for path in (tmp_path / name).iterdir())
    config = AutoConfig.from_pretrained(str(tmp_path / name), local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(tmp_path / name), local_files_only=True)
    assert processor.image_token_ids == [model_image_token_id(config)], "images expand into the model's image token"
    if name in REAL_SIZE:  # one tile's tokens in the prompt = the connector's outputs per tile
        vision = config.vision_config
        assert processor.image_seq_len == (vision.image_size // vision.patch_size // config.scale_factor) ** 2
        assert config.text_config.vocab_size == 49280 > len(processor.tokenizer)
