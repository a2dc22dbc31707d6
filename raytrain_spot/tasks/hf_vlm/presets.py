"""Model directories for runs without downloaded weights: a config, a tokenizer and a processor,
laid out as ``save_pretrained`` writes them, so the task loads them like any model directory.

``tiny-llava`` and ``tiny-idefics3`` (the SmolVLM architecture) have a few tens of thousands of
parameters and a word-level tokenizer over the generated shapes captions: they train on a CPU in
the tests. Without weights in the directory the model starts from a seeded random init.

    python -m raytrain_spot.tasks.hf_vlm.presets tiny-llava OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Callable, Dict

from raytrain_spot.tasks.vlm.shapes import VOCAB as SHAPES_WORDS

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, "<fake_token_around_image>", "<global-img>",
                  "<end_of_utterance>"]
PRESET_MARKER = "raytrain_spot_preset.json"
"""Written into a preset's directory: what made it (the directory has no weights: seeded random init)."""


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in SHAPES_WORDS if not w.startswith("<")]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[4:])


def _tiny_llava(out: str) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    tokenizer = _tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id)
    LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                vision_feature_layer=-1, vision_feature_select_strategy="default").save_pretrained(out)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, image_token=IMAGE_TOKEN,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(out)


def _tiny_idefics3(out: str) -> None:
    from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer = _tokenizer()
    Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), scale_factor=2,
        pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                       max_image_size={"longest_edge": 32})
    Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4).save_pretrained(out)


PRESETS: Dict[str, Callable[[str], None]] = {"tiny-llava": _tiny_llava, "tiny-idefics3": _tiny_idefics3}


def write_preset(name: str, out: str) -> None:
    """Write preset ``name``'s model directory to ``out`` (atomically: a sibling, then a rename)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".preset-", dir=parent)
    try:
        PRESETS[name](staging)
        with open(os.path.join(staging, PRESET_MARKER), "w") as f:
            json.dump({"preset": name}, f)
        try:
            os.rename(staging, out)
        except OSError:
            pass  # another process wrote the same preset first
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.tasks.hf_vlm.presets", description=__doc__)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out", help="directory to create (must not exist)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"{args.out} exists; choose a new directory")
    write_preset(args.preset, args.out)
    print(f"wrote {args.preset} to {args.out}; train it with task.model.path={os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
