"""The tiny Hugging Face presets, one per model family, as pytest parameters: a preset whose
processor needs a package this environment lacks is skipped, and the skip names the package."""

from __future__ import annotations

import pytest

from raytrain_spot.tasks.hf_vlm.presets import missing_packages

TINY_PRESETS = ("tiny-llava", "tiny-idefics3", "tiny-gemma3", "tiny-qwen2.5-vl")
"""LLaVA, Idefics3 (SmolVLM), Gemma 3, Qwen2.5-VL."""
END_OF_ANSWER = {"tiny-llava": "</s>", "tiny-idefics3": "<end_of_utterance>", "tiny-gemma3": "<end_of_turn>",
                 "tiny-qwen2.5-vl": "<|im_end|>"}
"""The token each preset's answers end with: its chat template's end of turn, or EOS (the raw form)."""


def family(preset: str, *marks) -> pytest.param:
    """``preset`` as a test parameter, skipped where its processor's packages are missing."""
    missing = missing_packages(preset)
    skip = pytest.mark.skipif(bool(missing), reason=f"{preset}'s processor needs {', '.join(missing)}")
    return pytest.param(preset, marks=[*marks, skip], id=preset)


def families(*presets: str):
    """The parameters of ``presets`` (all tiny presets by default)."""
    return [family(preset) for preset in presets or TINY_PRESETS]
