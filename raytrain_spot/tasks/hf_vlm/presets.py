"""Model directories for runs without downloaded weights: a config, a tokenizer and a processor,
laid out as ``save_pretrained`` writes them, so the task loads them like any model directory.
Without weights in the directory the model starts from a seeded random init.

``tiny-llava`` and ``tiny-idefics3`` (the SmolVLM architecture) have a few tens of thousands of
parameters and a word-level tokenizer over the generated shapes captions: they train on a CPU in
the tests. The Idefics3 presets have a chat template in SmolVLM-Instruct's turn format (samples
are written as conversations); ``tiny-llava`` has none (samples are written in the raw form).

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
import json
import os
import shutil
import tempfile
from functools import partial
from typing import Any, Callable, Dict, Sequence, Tuple

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


def _tokenizer(extra_special_tokens: Sequence[str] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in SHAPES_WORDS if not w.startswith("<")] + ROLES
    special = SPECIAL_TOKENS + list(extra_special_tokens)
    vocab = {token: i for i, token in enumerate(special + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=special[4:])


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
    write_preset(args.preset, args.out)
    print(f"wrote {args.preset} ({parameter_count(args.preset) / 1e6:,.1f}M parameters, no weights) to {args.out}; "
          f"train it with task.model.path={os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
