"""How a sample becomes the text a Hugging Face processor reads, and which of its tokens are trained.

With a processor that has a chat template (``task.model.chat_template=true``, the default), a
sample is the conversation the template renders: its prompt turns (the user turn with the images
and the prompt), then an assistant turn with the caption. Without one, it is the raw form
``<image> {prompt} {caption}</s>``, each image written as the template would write it where the
processor has one (Qwen2.5-VL's model finds an image by the tokens around ``<|image_pad|>``).
Either way the answer (everything the conversation adds after the prompt with its generation
prompt: the caption and the template's end-of-turn token, or the caption and the end-of-sequence
token) is what the loss counts, so the model learns where a caption ends, and generation stops at
the same tokens.

The answer's tokens are counted from the end of each sample's tokens: the processor expands the
image tokens, which all come before the answer, so the answer's length is the same in the text
alone and in the processed batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch

IGNORE = -100
"""Label of a position the loss skips (transformers' convention)."""
IMAGE_TOKEN = "<image>"
IMAGE_WRAPPERS = ("<fake_token_around_image>", "<global-img>", "<start_of_image>", "<end_of_image>",
                  "<|vision_start|>", "<|vision_end|>")
"""Tokens processors put around an image's tokens (Idefics3's, Gemma 3's, Qwen2.5-VL's): never trained on."""

Turns = Sequence[Dict[str, Any]]


def image_token(processor) -> str:
    """The token a processor expands into an image's tokens (``<image>`` for the tested families)."""
    return getattr(processor, "image_token", None) or IMAGE_TOKEN


def image_placeholder(processor) -> str:
    """What stands for one image in the raw form: what the processor's chat template writes for an
    image (Qwen2.5-VL's ``<|vision_start|><|image_pad|><|vision_end|>``: its model finds each image by
    those wrappers), else the processor's image token."""
    if not getattr(processor, "chat_template", None):
        return image_token(processor)
    before, after = "raytrain-spot-before-image", "raytrain-spot-after-image"
    written = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after}]}], tokenize=False)
    return written.split(before, 1)[1].split(after, 1)[0].strip()


def answer_turn(caption: str) -> Dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": caption}]}


@dataclass(frozen=True)
class SampleText:
    """A processor's way of writing samples: chat template or raw form, and the tokens that matter."""

    processor: Any
    templated: bool
    image_ids: torch.Tensor
    stop_ids: Tuple[int, ...]
    """Tokens an answer ends with (end of turn, end of sequence): where generation stops."""
    image_text: str
    """What stands for one image in the raw form (``image_placeholder``)."""

    @classmethod
    def of(cls, processor, use_chat_template: bool) -> "SampleText":
        tokenizer = processor.tokenizer
        vocab = tokenizer.get_vocab()
        # The processor's image token, what it expands into (Gemma 3: soft tokens), and the wrappers around them.
        expanded = {i for i in getattr(processor, "image_token_ids", ()) if i is not None}
        image_ids = torch.tensor(sorted(expanded | {vocab[t] for t in (image_token(processor), *IMAGE_WRAPPERS)
                                                    if t in vocab}))
        text = cls(processor, bool(use_chat_template and getattr(processor, "chat_template", None)), image_ids, (),
                   image_placeholder(processor))
        probe = ({"role": "user", "content": [{"type": "image"}]},)
        answer = text.answer_ids(text.prompt(probe), text.full(probe, "a"))
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        special -= {tokenizer.unk_token_id, tokenizer.pad_token_id, *image_ids.tolist()}
        stops = tuple(dict.fromkeys(i for i in answer if i in special)) or (tokenizer.eos_token_id,)
        return cls(processor, text.templated, image_ids, tuple(i for i in stops if i is not None), text.image_text)

    @property
    def add_special_tokens(self) -> bool:
        """A chat template writes the special tokens it wants (BOS included); the raw form gets the tokenizer's."""
        return not self.templated

    def prompt(self, turns: Turns) -> str:
        """What precedes the answer: the turns, then the template's generation prompt."""
        if self.templated:
            return self.processor.apply_chat_template(list(turns), add_generation_prompt=True, tokenize=False)
        return " ".join(self.image_text if part["type"] == "image" else part["text"]
                        for turn in turns for part in turn["content"])

    def full(self, turns: Turns, caption: str) -> str:
        """The prompt and the answer; raises ValueError when the template does not write the prompt first."""
        if not self.templated:
            return f"{self.prompt(turns)} {caption}{self.processor.tokenizer.eos_token or ''}"
        full = self.processor.apply_chat_template([*turns, answer_turn(caption)], tokenize=False)
        if not full.startswith(self.prompt(turns)):
            raise ValueError("its chat template does not write a conversation as the prompt (with the generation "
                             "prompt) followed by the answer, so the answer's tokens cannot be told apart")
        return full

    def answer_ids(self, prompt: str, full: str) -> List[int]:
        """The tokens ``full`` has after ``prompt`` (where they tokenize alike)."""
        tokenizer = self.processor.tokenizer
        full_ids, prompt_ids = tokenizer([full, prompt], add_special_tokens=self.add_special_tokens)["input_ids"]
        common = next((i for i, (a, b) in enumerate(zip(full_ids, prompt_ids)) if a != b),
                      min(len(full_ids), len(prompt_ids)))
        return full_ids[common:]

    def labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               answer_tokens: Sequence[int]) -> torch.Tensor:
        """``input_ids`` with all but each row's last ``answer_tokens`` real tokens set to IGNORE."""
        attended = attention_mask > 0
        from_end = attended.flip(1).cumsum(1).flip(1)  # real tokens at or after each position
        answer = attended & (from_end <= torch.tensor(answer_tokens).unsqueeze(1))
        return input_ids.masked_fill(~answer | torch.isin(input_ids, self.image_ids), IGNORE)
