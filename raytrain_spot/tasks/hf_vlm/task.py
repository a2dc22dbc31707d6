"""A Hugging Face image-text-to-text model as a training task: any model ``transformers`` builds
from a model directory (``AutoModelForImageTextToText``), with its own processor and tokenizer.

Tested families: LLaVA, Idefics3 (SmolVLM), Gemma 3 and Qwen2.5-VL. The model directory is what
``save_pretrained`` writes: ``config.json``, the processor's and tokenizer's files, and the
weights; without weights the model starts from a seeded random init (the presets, for tests and
smoke runs). Directories are read with ``local_files_only``; a hub id is fetched into the Hugging
Face cache first, at the commit the driver resolved (hub.py).

A sample is written with the processor's chat template when it has one (the user turn with the
images and the prompt, the assistant turn the caption), else in the raw form
``<image> {prompt} {caption}</s>`` (text.py). The loss is next-token cross-entropy on the answer
only (the caption and its end-of-turn or end-of-sequence token): padding, image tokens and the
prompt are masked, and each sample's loss is the mean over its own answer tokens.

A micro-batch is the processor's batch for its samples, each sample's images passed as its own
list: what the processor returns per image (Qwen2.5-VL's flat ``pixel_values`` rows and
``image_grid_thw``) stays concatenated over the micro-batch's images, never stacked per sample,
and its other outputs (Gemma 3's ``token_type_ids``) go to the model as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from raytrain_spot.config.errors import ConfigError, require, require_non_negative
from raytrain_spot.tasks.hf_vlm.data import (
    BadRow,
    HeldOutShapes,
    ImageTextDataConfig,
    ImageTextShards,
    Sample,
    content_parts,
    conversation,
    generated_data_dir,
    skipped_rows,
)
from raytrain_spot.tasks.hf_vlm.hub import hub_snapshot, is_hub_id
from raytrain_spot.tasks.hf_vlm.presets import PRESET_MARKER, PRESETS, missing_packages, write_preset
from raytrain_spot.tasks.hf_vlm.text import IGNORE, SampleText, image_token
from raytrain_spot.storage.node_cache import local_copy
from raytrain_spot.loop.frozen_base import built_once_per_node
from raytrain_spot.loop.task import MapDataset, TrainingTask, move_to

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
IMAGE_TOKENS_PER_TILE = {
    "llava": lambda c: (c.vision_config.image_size // c.vision_config.patch_size) ** 2
    + (c.vision_feature_select_strategy == "full"),
    "idefics3": lambda c: (c.vision_config.image_size // c.vision_config.patch_size) ** 2 // c.scale_factor ** 2,
    "gemma3": lambda c: c.mm_tokens_per_image,
}
"""How many image features a tested family's model yields per image tile (the check before Ray starts)."""


@dataclass
class HfModelConfig:
    """Which model, and how to train it."""

    path: Optional[str] = None
    """A model directory (``save_pretrained`` layout): a local path, ``gs://bucket/prefix``, which
    each node copies once into ``cache_dir`` (verified; fetched anew when the objects change), or a
    Hugging Face hub id (``HuggingFaceTB/SmolVLM-256M-Instruct``), fetched through the Hugging Face
    client into its cache (``HF_HOME``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` hold). Unset:
    ``preset``'s directory, written into ``cache_dir`` on first use."""
    revision: Optional[str] = None
    """With a hub id: its branch, tag or commit (unset: the default branch). The driver resolves it
    to a commit before Ray starts, and every worker loads that commit."""
    preset: str = "tiny-llava"
    """With no ``path``: a built-in model directory without weights (seeded random init): ``tiny-llava``,
    ``tiny-idefics3``, ``tiny-gemma3``, ``tiny-qwen2.5-vl`` (CPU-sized), or the SmolVLM configurations
    ``smolvlm-256m``, ``smolvlm-500m``, ``smolvlm-2.2b``."""
    cache_dir: str = "~/.cache/raytrain_spot/hf_models"
    """Where preset directories are written."""
    dtype: str = "float32"
    """Weights in ``float32`` or ``bfloat16``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    freeze_vision: bool = False
    """Train the projector and the language model only; the vision tower keeps its weights."""
    keep_base_in_node_memory: bool = False
    """With LoRA: build the frozen base once per node and keep it in the node's memory
    (``/dev/shm``, checksummed), so every later build on the node, a restart's included, maps it
    instead of loading the model directory, and the node's ranks share its pages
    (raytrain_spot/loop/frozen_base.py). It pays where building the base is slow: a seeded init
    (no weights: 4x faster at 1 GB), or weights stored in another dtype (1.2x); a safetensors load
    at the stored dtype from the page cache is faster than the copy's checksum (0.7x at 1 GB:
    bench/bench_frozen_base.py). It costs the base's size in the node's memory, and is skipped
    (logged) where that would leave less than half of ``/dev/shm`` free."""
    chat_template: bool = True
    """Write samples with the processor's chat template when it has one (``false``: always the raw
    form ``<image> {prompt} {caption}</s>``)."""

    def __post_init__(self):
        require(self.path is not None or self.preset in PRESETS, "task.model.preset",
                f"{self.preset!r} is not a preset", f"use one of {', '.join(sorted(PRESETS))}, or set task.model.path")
        missing = missing_packages(self.preset) if self.path is None else []
        require(not missing, "task.model.preset", f"{self.preset}'s processor needs {', '.join(missing)}",
                f"pip install {' '.join(missing)}")
        require(self.dtype in ("float32", "bfloat16"), "task.model.dtype", f"{self.dtype!r} is not supported",
                "use float32 or bfloat16")


@dataclass
class LoraConfig:
    """Low-rank adapters (``peft``): the base model is frozen and only the adapters train, so a
    checkpoint holds the adapters and their optimizer state alone (docs/checkpoints.md)."""

    r: int = 0
    """Rank of the adapters; 0 trains the whole model (no LoRA)."""
    alpha: int = 16
    """Scale of the adapters' update (``alpha / r``)."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names (last path component) of the linear layers that get adapters: attention projections by default."""
    modules_to_save: List[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (e.g. ``multi_modal_projector`` or ``connector``)."""

    def __post_init__(self):
        require_non_negative("task.lora", self, "r", "dropout")
        require(self.r == 0 or bool(self.target_modules), "task.lora.target_modules", "no module names given",
                "name the linear layers to adapt, e.g. [q_proj,v_proj]")
        require(self.dropout < 1, "task.lora.dropout", f"{self.dropout} drops every input", "use a value in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class HuggingFaceVLMTask(TrainingTask):
    """Fine-tune an image-text-to-text model on your image-caption shards."""

    model: HfModelConfig = field(default_factory=HfModelConfig)
    data: ImageTextDataConfig = field(default_factory=ImageTextDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    resumable_settings: ClassVar[Tuple[str, ...]] = ("model.cache_dir", "model.gradient_checkpointing",
                                                     "model.keep_base_in_node_memory",
                                                     "data.cache_dir", "model.revision", "data.eval_path",
                                                     "data.eval_samples", "data.eval_examples")
    # model.revision: the workers' settings carry the commit the driver resolved; a resume resolves it again
    unused_parameters: ClassVar[bool] = True  # LLaVA never uses its CLIP tower's post_layernorm
    preload_modules: ClassVar[Tuple[str, ...]] = ("transformers.modeling_utils", "peft")

    # -- driver --------------------------------------------------------------------------------

    def prepare(self, seed: int) -> Optional[str]:
        """Write what is generated, then check the model directory and every row before Ray starts."""
        model_dir = self.model_dir()
        processor = self.processor()
        if image_token(processor) not in processor.tokenizer.get_vocab():
            raise ConfigError(f"task.model.path: the tokenizer in {model_dir} has no {image_token(processor)} token. "
                              "Fix: use the processor saved with the model (its tokenizer knows the image token)")
        self.check_modules()
        data_dir = self.data_dir(seed)
        try:
            skipped = skipped_rows(self.data, data_dir)
        except (BadRow, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None
        self.check_inputs(model_dir, ImageTextShards(self.data, data_dir)[0])
        if self.data.eval_path:
            try:
                skipped_rows(self.data, self.eval_data_dir())
            except (BadRow, FileNotFoundError) as error:
                raise ConfigError(f"task.data.eval_path: {error}") from None
        return f"{model_dir} on {data_dir}" + (f" ({skipped} bad rows left out)" if skipped else "")

    def check_inputs(self, model_dir: str, sample: Sample) -> None:
        """The chat template writes the sample as its prompt followed by its answer, and what the
        processor makes of an image fits the model: the tile side its vision tower takes and, for
        the tested families, as many image tokens as the tower yields features. A mismatch (a
        processor saved with another model) would fail every rank's first step."""
        from transformers import AutoConfig

        try:
            self.sample_text().full(sample.prompt, sample.caption)
        except ValueError as error:
            raise ConfigError(f"task.model.chat_template: the processor in {model_dir}: {error}. Fix: set "
                              "task.model.chat_template=false to train on the raw form") from None
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        vision = getattr(config, "vision_config", None)
        if vision is None:
            return
        batch = self.prompt_inputs(sample.images[:1], "")
        side = tuple(batch["pixel_values"].shape[-2:])
        # Families whose processor returns images as flat patch rows (pixel_values of 2 dims) take any side.
        if batch["pixel_values"].dim() >= 4 and side != (vision.image_size, vision.image_size):
            raise ConfigError(f"task.model.path: the processor in {model_dir} makes {side[0]}x{side[1]} images, but "
                              f"the vision tower in its config.json takes {vision.image_size}x{vision.image_size}. "
                              "Fix: save the processor that belongs to this model into the directory "
                              "(AutoProcessor.from_pretrained(ITS_SOURCE).save_pretrained(DIR))")
        if (per_tile := IMAGE_TOKENS_PER_TILE.get(config.model_type)) is not None:
            tiles = batch["pixel_values"].shape[1] if batch["pixel_values"].dim() == 5 else 1
            expected = per_tile(config) * tiles
            made = int((batch["input_ids"] == model_image_token_id(config)).sum())
            if made != expected:
                raise ConfigError(f"task.model.path: the processor in {model_dir} writes {made} image tokens for an "
                                  f"image, but the model's config.json yields {expected} image features. Fix: save "
                                  "the processor that belongs to this model into the directory")

    def check_modules(self) -> None:
        """The layers ``task.lora.target_modules`` and ``task.model.freeze_vision`` name exist (on the
        meta device: no weights are allocated)."""
        if not (self.lora.enabled or self.model.freeze_vision):
            return
        model = self.base_skeleton()
        if self.model.freeze_vision:
            vision_tower(model)
        if self.lora.enabled:
            linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear)}
            children = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            for setting, names, known in (("target_modules", self.lora.target_modules, linear),
                                          ("modules_to_save", self.lora.modules_to_save, children)):
                if missing := sorted(set(names) - known):
                    raise ConfigError(f"task.lora.{setting}: {type(model).__name__} has no layer named "
                                      f"{', '.join(missing)}. Fix: use names it has, e.g. "
                                      f"{', '.join(sorted(known)[:12])}")

    def model_dir(self) -> str:
        """The local model directory, worked out once: a bucket's copy is listed and checked once
        per process, and every later use reads the same copy."""
        if getattr(self, "_model_dir", None) is None:
            self._model_dir = self._local_model_dir()
        return self._model_dir

    def resolved_settings(self) -> Dict[str, Any]:
        """A hub id's commit, as this process resolved it: the driver hands it to every worker."""
        if self.model.path is None or not is_hub_id(self.model.path):
            return {}
        return {"model.revision": os.path.basename(os.path.normpath(self.model_dir()))}

    def _local_model_dir(self) -> str:
        if self.model.path is None:
            path = os.path.join(os.path.expanduser(self.model.cache_dir), self.model.preset)
            if not os.path.exists(os.path.join(path, PRESET_MARKER)):
                write_preset(self.model.preset, path)
            return path
        if is_hub_id(self.model.path):
            path = hub_snapshot(self.model.path, self.model.revision)
        else:
            path = local_copy(self.model.path, self.model.cache_dir, setting="task.model.path")
        if not os.path.isfile(os.path.join(path, "config.json")):
            where = path if path == os.path.expanduser(self.model.path) else f"{self.model.path} (its copy {path})"
            raise ConfigError(f"task.model.path: {where} has no config.json. Fix: point it at a model directory "
                              "as save_pretrained writes it (config, processor and tokenizer files, weights)")
        return path

    def data_dir(self, seed: int) -> str:
        if not self.data.path:
            return generated_data_dir(self.data, seed)
        return local_copy(self.data.path, self.data.cache_dir, setting="task.data.path")

    def eval_data_dir(self) -> str:
        return local_copy(self.data.eval_path, self.data.cache_dir, setting="task.data.eval_path")

    # -- workers -------------------------------------------------------------------------------

    def localize(self, seed: int) -> None:
        self.model_dir()
        self.data_dir(seed)
        if self.data.eval_path:
            self.eval_data_dir()

    def processor(self):
        if getattr(self, "_processor", None) is None:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self.model_dir(), local_files_only=True)
        return self._processor

    def sample_text(self) -> SampleText:
        """How samples are written (chat template or raw form), worked out once from the processor."""
        if getattr(self, "_sample_text", None) is None:
            self._sample_text = SampleText.of(self.processor(), self.model.chat_template)
        return self._sample_text

    def build_model(self) -> torch.nn.Module:
        # Built or mapped, the base leaves torch's generator as it found it: the adapters' init is then the
        # same on a rank that built the base as on one that mapped the node's copy.
        with torch.random.fork_rng(devices=[]):
            model = (built_once_per_node(self.base_identity(), self.base_model, self.base_skeleton)
                     if self.lora.enabled and self.model.keep_base_in_node_memory else self.base_model())
        model.config.use_cache = False  # training: no key/value cache
        if self.model.freeze_vision:
            for parameter in vision_tower(model).parameters():
                parameter.requires_grad_(False)
        if self.model.gradient_checkpointing:
            model.activation_checkpointing_enable()
        if self.lora.enabled:
            model = with_adapters(model, self.lora, self.model.gradient_checkpointing)
        return model

    def base_model(self) -> torch.nn.Module:
        """The model as the model directory has it: its weights, or a seeded random init without them."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        path = self.model_dir()
        dtype = getattr(torch, self.model.dtype)
        if has_weights(path):
            return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        # a config alone: a seeded random init, the same on every rank
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path, local_files_only=True),
                                                       dtype=dtype)

    def base_skeleton(self) -> torch.nn.Module:
        """``base_model``'s modules on the meta device: shapes without storage, built in a moment."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        with torch.device("meta"):
            config = AutoConfig.from_pretrained(self.model_dir(), local_files_only=True)
            model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, self.model.dtype))
        return model.eval() if has_weights(self.model_dir()) else model  # from_pretrained returns it in eval mode

    def base_identity(self) -> Dict[str, Any]:
        """What decides ``base_model``'s weights: the model directory's files, the dtype, the seed
        (the init of what the weights leave out) and the libraries that build it."""
        from importlib.metadata import version

        path = self.model_dir()
        files = sorted((entry.name, status.st_size, status.st_mtime_ns)
                       for entry in os.scandir(path) if entry.is_file() and (status := entry.stat()))
        return {"model_dir": os.path.realpath(path), "files": files, "dtype": self.model.dtype,
                "seed": torch.initial_seed(), "transformers": version("transformers"), "torch": torch.__version__}

    def build_dataset(self, seed: int) -> ImageTextShards:
        return ImageTextShards(self.data, self.data_dir(seed))

    def build_eval_dataset(self, seed: int) -> Optional[MapDataset]:
        if self.data.eval_path:
            return ImageTextShards(self.data, self.eval_data_dir())
        if self.data.path or not self.data.eval_samples:
            return None
        return HeldOutShapes(self.data, seed, self.data.eval_samples)

    def eval_examples(self, model: torch.nn.Module, dataset: MapDataset,
                      device: torch.device) -> List[Dict[str, str]]:
        """The captions the model writes for the first ``task.data.eval_examples`` evaluation samples."""
        samples = [dataset[i] for i in range(min(self.data.eval_examples, len(dataset)))]
        return [{"reference": sample.caption, "generated": self.caption(model, sample.images, sample.prompt)}
                for sample in samples]

    def collate(self, samples: Sequence[Sample]) -> Dict[str, torch.Tensor]:
        text = self.sample_text()
        prompts = [text.prompt(sample.prompt) for sample in samples]
        fulls = [text.full(sample.prompt, sample.caption) for sample in samples]
        batch = self.model_inputs([sample.images for sample in samples], fulls)
        answer_tokens = [len(text.answer_ids(prompt, full)) for prompt, full in zip(prompts, fulls)]
        batch["labels"] = text.labels(batch["input_ids"], batch["attention_mask"], answer_tokens)
        return batch

    def caption(self, model: torch.nn.Module, images, prompt="", max_new_tokens: int = 16) -> str:
        """The caption ``model`` writes for ``images`` (a Pillow image, or a sample's images) after
        ``prompt`` (text, or a sample's prompt turns), greedily, stopping where an answer ends."""
        images = tuple(image.convert("RGB") for image in (images if isinstance(images, (list, tuple)) else [images]))
        inputs = move_to(self.prompt_inputs(images, prompt), next(model.parameters()).device)
        tokenizer = self.processor().tokenizer
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=list(self.sample_text().stop_ids),
                                       pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def prompt_inputs(self, images: Sequence[Any], prompt) -> Dict[str, torch.Tensor]:
        """The model's inputs for ``images`` and ``prompt`` (text after ``task.data.prompt``, or prompt turns)."""
        if isinstance(prompt, str):
            prompt, _ = conversation([{"role": "user", "content": content_parts(prompt)},
                                      {"role": "assistant", "content": "-"}], len(images), self.data.prompt,
                                     self.data.image_column)
        return self.model_inputs([images], [self.sample_text().prompt(prompt)])

    def model_inputs(self, images: Sequence[Sequence[Any]], texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The processor's batch for each sample's images and text."""
        processor = self.processor()
        return dict(processor(images=[list(own) for own in images], text=list(texts), return_tensors="pt",
                              padding=True, add_special_tokens=self.sample_text().add_special_tokens))

    def save_pretrained(self, model: torch.nn.Module, out_dir: str, adapter_only: bool) -> None:
        """The model directory ``from_pretrained`` loads (adapters merged), or the adapters alone,
        with the processor either way so the directory is all inference needs."""
        if adapter_only:
            if not self.lora.enabled:
                raise ConfigError("--adapter-only: this run trained no adapters (task.lora.r=0). Fix: export the "
                                  "whole model (without --adapter-only)")
            if not has_weights(self.model_dir()):
                raise ConfigError(f"--adapter-only: the base model in {self.model_dir()} has no weights file (a "
                                  "preset's seeded init), so nothing outside this run could load the adapters "
                                  "onto it. Fix: export merged weights (without --adapter-only)")
            model.save_pretrained(out_dir)
        else:
            (model.merge_and_unload() if self.lora.enabled else model).save_pretrained(out_dir)
        self.processor().save_pretrained(out_dir)

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        targets = labels[:, 1:]
        token_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=IGNORE, reduction="none").view(targets.shape)
        counted = (targets != IGNORE).float()
        return (token_loss * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1.0)


def has_weights(model_dir: str) -> bool:
    return any(os.path.exists(os.path.join(model_dir, name)) for name in WEIGHT_FILES)


def model_image_token_id(config) -> int:
    """The token id a model replaces with image features (``image_token_id``, or LLaVA's and Gemma 3's
    ``image_token_index``): the processor's expansion of its image token, not that token itself."""
    token_id = getattr(config, "image_token_id", None)
    return token_id if token_id is not None else config.image_token_index


def with_adapters(model: torch.nn.Module, lora: LoraConfig, gradient_checkpointing: bool) -> torch.nn.Module:
    """``model`` with LoRA adapters; everything else frozen but ``lora.modules_to_save``."""
    import peft

    adapted = peft.get_peft_model(model, peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                         target_modules=list(lora.target_modules),
                                                         modules_to_save=list(lora.modules_to_save) or None))
    if gradient_checkpointing:
        adapted.enable_input_require_grads()  # a frozen embedding would cut the recomputed graph
    return adapted


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision encoder of an image-text-to-text model (LLaVA: ``vision_tower``, Idefics3: ``vision_model``)."""
    for name, module in model.named_modules():
        if name.endswith(("vision_tower", "vision_model")):
            return module
    raise ConfigError(f"task.model.freeze_vision: {type(model).__name__} has no vision_tower or vision_model. Fix: "
                      "set task.model.freeze_vision=false for this model")
