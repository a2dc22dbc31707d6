"""Model directories for runs without downloaded weights: a config, a tokenizer and a processor,
laid out as ``save_pretrained`` writes them, so the task loads them like any model directory.
Without weights in the directory the model starts from a seeded random init.

The tiny presets, one per tested family, have a few tens of thousands of parameters and a
word-level tokenizer over the generated shapes captions: they train on a CPU in the tests.

- ``tiny-llava``: LLaVA; no chat template (samples are written in the raw form).
- ``tiny-idefics3``: Idefics3 (the SmolVLM architecture); a chat template in SmolVLM-Instruct's
  turn format, like the SmolVLM presets.
- ``tiny-gemma3``: Gemma 3; 4 soft tokens per image, a chat template in Gemma 3's turn format.
- ``tiny-qwen2.5-vl``: Qwen2.5-VL; images as flat rows of patches with an ``image_grid_thw`` row
  each, their token count following their size; a chat template in Qwen2.5-VL's turn format. Its
  processor needs torchvision (``PRESET_PACKAGES``).

``smolvlm-256m``, ``smolvlm-500m`` and ``smolvlm-2.2b`` are the published SmolVLM configurations
(Idefics3: a SigLIP vision tower, a pixel-shuffle connector, a SmolLM2 text model; the real image
processor and tokens per image) at their real size, for smoke runs at scale and GPU step
benchmarks. The numbers are those of the models' ``config.json`` (SmolVLM-256M, SmolVLM2-500M,
SmolVLM2-2.2B) as public copies of them give them, not read from the hub; ``parameter_count``
(256.5M, 507.5M, 2.25B) is tested against the names. Writing one writes only the config and the
processor files (milliseconds: no weights, no model built). The tokenizer is this project's
word-level one plus the tile-position tokens the processor writes, while the text model keeps the
real vocabulary of 49280 embeddings. To train the real model, set ``task.model.path`` to its
hub id (``HuggingFaceTB/SmolVLM-256M-Instruct``) or to its ``save_pretrained`` directory instead
of a preset.

    python -m raytrain_spot.tasks.hf_vlm.presets tiny-llava OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from raytrain_spot.tasks.vlm.shapes import VOCAB as SHAPES_WORDS

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, "<fake_token_around_image>", "<global-img>",
                  "<end_of_utterance>", "<|im_start|>"]
ROLES = ["System:", "User:", "Assistant:"]
"""Words of the chat template's turn headers (the word-level tokenizer knows only the words it lists)."""
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>Assistant:{% endif %}")
"""The Idefics3 presets' chat template, in SmolVLM-Instruct's turn format: ``<|im_start|>User:<image> the
prompt<end_of_utterance>``, each turn ending with ``<end_of_utterance>``, where an answer ends."""
PRESET_MARKER = "raytrain_spot_preset.json"
"""Written into a preset's directory: what made it (the directory has no weights: seeded random init)."""
Preset = Tuple[Any, Any]
"""A model config and its processor (with its tokenizer), both with ``save_pretrained``."""


def _tokenizer(extra_special_tokens: Sequence[str] = (), special_tokens: Sequence[str] = SPECIAL_TOKENS,
               roles: Sequence[str] = ROLES, named_tokens: Optional[Dict[str, str]] = None):
    """A word-level tokenizer over the shapes captions' words and ``roles``; ``named_tokens`` are
    special tokens a processor reads by name from the tokenizer (``tokenizer.image_token``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in SHAPES_WORDS if not w.startswith("<")] + list(roles)
    special = list(special_tokens) + list(extra_special_tokens)
    vocab = {token: i for i, token in enumerate(special + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>",
                                        extra_special_tokens=named_tokens or special[4:])
    if named_tokens:  # named ones replace the list of extra special tokens: the rest are added as special
        tokenizer.add_tokens(special[4:], special_tokens=True)
    return tokenizer


def _tiny_llava() -> Preset:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    tokenizer = _tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return config, LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, image_token=IMAGE_TOKEN,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _tiny_idefics3() -> Preset:
    from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer = _tokenizer()
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), scale_factor=2,
        pad_token_id=tokenizer.pad_token_id)
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                       max_image_size={"longest_edge": 32})
    return config, Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                     chat_template=CHAT_TEMPLATE)


GEMMA3_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<start_of_image>", "<image_soft_token>", "<end_of_image>",
                         "<start_of_turn>", "<end_of_turn>"]
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
"""The Gemma 3 preset's chat template, in Gemma 3's turn format: ``<start_of_turn>user\n<start_of_image> the
prompt<end_of_turn>``, the answer in a ``model`` turn ending with ``<end_of_turn>``. The processor expands
``<start_of_image>`` into the image's soft tokens between ``<start_of_image>`` and ``<end_of_image>``."""


def _tiny_gemma3() -> Preset:
    from transformers import Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = _tokenizer(special_tokens=GEMMA3_SPECIAL_TOKENS, roles=["user", "model", "system"],
                           named_tokens={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                                         "eoi_token": "<end_of_image>"})
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         sliding_window=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"), pad_token_id=tokenizer.pad_token_id)
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    return config, Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                                   image_seq_length=config.mm_tokens_per_image)


QWEN_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
                       "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""The Qwen2.5-VL preset's chat template, in Qwen2.5-VL's turn format: ``<|im_start|>user\n<|vision_start|>
<|image_pad|><|vision_end|> the prompt<|im_end|>``, the answer in an ``assistant`` turn ending with
``<|im_end|>``. The processor repeats ``<|image_pad|>`` once per merged patch of the image."""
QWEN_PIXELS = dict(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8, temporal_patch_size=2, merge_size=2)
"""Images resized to a multiple of 16 pixels a side (a patch of 8, merged 2x2) between 16x16 and 64x64
pixels: a 32x32 image is 4 image tokens, a 48x32 one 6."""


def _tiny_qwen2_5_vl() -> Preset:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    tokenizer = _tokenizer(special_tokens=QWEN_SPECIAL_TOKENS, roles=["user", "assistant", "system"])
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=QWEN_PIXELS["patch_size"], spatial_merge_size=QWEN_PIXELS["merge_size"],
                           temporal_patch_size=QWEN_PIXELS["temporal_patch_size"], window_size=16,
                           fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        pad_token_id=tokenizer.pad_token_id)
    # The processor needs its video processor (torchvision) even where only images are trained.
    return config, Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**QWEN_PIXELS), tokenizer=tokenizer,
                                       video_processor=Qwen2VLVideoProcessor(**QWEN_PIXELS),
                                       chat_template=QWEN_CHAT_TEMPLATE)


SIGLIP_BASE_512 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=512, patch_size=16)
"""SigLIP base patch16/512, the vision tower of SmolVLM-256M and -500M (86M parameters: the published 93M
less the pooling head Idefics3 does not use)."""
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14)
"""SigLIP so400m patch14/384 (shape-optimised), the vision tower of SmolVLM-2.2B (413M parameters without
the pooling head)."""
SMOLVLM_VOCAB = 49280
TILE_TOKENS = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
"""What the Idefics3 processor writes before each tile of a split image (SmolVLM's tokenizer has them)."""


def _smolvlm(text: Dict[str, Any], vision: Dict[str, Any], scale_factor: int, max_tiles_side: int) -> Preset:
    """A SmolVLM configuration with its processor, which resizes an image's longer side to
    ``max_tiles_side`` tiles and feeds the encoder every tile plus the whole image downscaled (a
    square image: 17 inputs of ``image_size``), each one ``image_seq_len`` tokens in the prompt."""
    from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer = _tokenizer(TILE_TOKENS)
    config = Idefics3Config(
        vision_config=vision,
        text_config=dict(model_type="llama", vocab_size=SMOLVLM_VOCAB, head_dim=64, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, **text),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), scale_factor=scale_factor,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    tile = vision["image_size"]
    images = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": max_tiles_side * tile},
                                       max_image_size={"longest_edge": tile})
    tokens_per_tile = (tile // vision["patch_size"] // scale_factor) ** 2
    return config, Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=tokens_per_tile,
                                     chat_template=CHAT_TEMPLATE)


PRESETS: Dict[str, Callable[[], Preset]] = {
    "tiny-llava": _tiny_llava,
    "tiny-idefics3": _tiny_idefics3,
    "tiny-gemma3": _tiny_gemma3,
    "tiny-qwen2.5-vl": _tiny_qwen2_5_vl,
    "smolvlm-256m": partial(_smolvlm, dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                           num_attention_heads=9, num_key_value_heads=3,
                                           max_position_embeddings=8192, rope_theta=100000.0),
                            SIGLIP_BASE_512, scale_factor=4, max_tiles_side=4),
    "smolvlm-500m": partial(_smolvlm, dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                           num_attention_heads=15, num_key_value_heads=5,
                                           max_position_embeddings=8192, rope_theta=100000.0),
                            SIGLIP_BASE_512, scale_factor=4, max_tiles_side=4),
    "smolvlm-2.2b": partial(_smolvlm, dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                           num_attention_heads=32, num_key_value_heads=32,
                                           max_position_embeddings=16384, rope_theta=273768.0),
                            SIGLIP_SO400M_384, scale_factor=3, max_tiles_side=4),
}
"""Each builds its model config and processor (cheap: no model is built)."""
PRESET_PACKAGES: Dict[str, Tuple[str, ...]] = {"tiny-qwen2.5-vl": ("torchvision",)}
"""Packages beyond the ``hf`` extra a preset's processor needs: Qwen2.5-VL's processor is built with its
video processor, which transformers implements on torchvision, even to process images."""


def missing_packages(name: str) -> List[str]:
    """The packages preset ``name`` needs that this environment does not have."""
    return [package for package in PRESET_PACKAGES.get(name, ()) if importlib.util.find_spec(package) is None]


def write_preset(name: str, out: str) -> None:
    """Write preset ``name``'s model directory to ``out`` (atomically: a sibling, then a rename)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".preset-", dir=parent)
    try:
        config, processor = PRESETS[name]()
        config.save_pretrained(staging)
        processor.save_pretrained(staging)
        with open(os.path.join(staging, PRESET_MARKER), "w") as f:
            json.dump({"preset": name}, f)
        try:
            os.rename(staging, out)
        except OSError:
            pass  # another process wrote the same preset first
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def parameter_count(name: str) -> int:
    """Parameters of preset ``name``'s model, built on the meta device: shapes without storage, so
    the 2.2B preset is counted in seconds and without its 9 GB of float32 weights."""
    import torch
    from transformers import AutoModelForImageTextToText

    config, _ = PRESETS[name]()
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.tasks.hf_vlm.presets", description=__doc__)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out", help="directory to create (must not exist)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"{args.out} exists; choose a new directory")
    if missing := missing_packages(args.preset):
        parser.error(f"{args.preset}'s processor needs {', '.join(missing)}: pip install {' '.join(missing)}")
    write_preset(args.preset, args.out)
    print(f"wrote {args.preset} ({parameter_count(args.preset) / 1e6:,.1f}M parameters, no weights) to {args.out}; "
          f"train it with task.model.path={os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
