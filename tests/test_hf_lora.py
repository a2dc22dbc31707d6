"""LoRA on a pretrained Hugging Face VLM: only the adapters are checkpointed, a run resumes them at
another world size, and the exported adapter (or merged model) loads in plain transformers + peft."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("peft")

import torch  # noqa: E402

from raytrain_spot.export import export_model, rebuilt_model, run_config  # noqa: E402
from raytrain_spot.loop.frozen_base import WEIGHTS, copy_dir  # noqa: E402
from raytrain_spot.checkpoint.format import checkpoint_key, fetch_verified, load_state  # noqa: E402
from raytrain_spot.checkpoint.manager import MEMORY_SCRATCH, load_checkpoint_state  # noqa: E402
from raytrain_spot.config.errors import ConfigError  # noqa: E402
from raytrain_spot.observe.events import read_events  # noqa: E402
from raytrain_spot.storage.store import LocalStore  # noqa: E402
from raytrain_spot.tasks.hf_vlm.presets import write_preset  # noqa: E402
from raytrain_spot.tasks.hf_vlm.task import HfModelConfig, HuggingFaceVLMTask, LoraConfig  # noqa: E402
from tests.conftest import assert_clean_audit, ray_internal_lines, run_main  # noqa: E402
from tests.hf_families import families  # noqa: E402
from tests.test_frozen_base import mapped_file  # noqa: E402

STEPS = 60
"""Long enough that the loop hears the notice at step 10 before the run ends: steps take ~0.05 s and the
notice reaches the loop up to a second after the simulator sends it (seen: a 30-step run ended first)."""
PLAIN_LOAD = r"""
import json, sys
import numpy as np, torch
from PIL import Image
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

base_dir, adapter_dir, merged_dir = sys.argv[1:4]
processor = AutoProcessor.from_pretrained(adapter_dir, local_files_only=True)
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
inputs = processor(images=[image], text=["<image> a"], return_tensors="pt")
base = AutoModelForImageTextToText.from_pretrained(base_dir, local_files_only=True)
adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
merged = AutoModelForImageTextToText.from_pretrained(merged_dir, local_files_only=True).eval()
with torch.no_grad():
    logits = {name: m(**inputs).logits[0, -1].tolist() for name, m in (("adapter", adapted), ("merged", merged))}
    # min_new_tokens: a trained tiny model may greedily pick its end-of-sequence token after two (seen in CI).
    generated = adapted.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
caption = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
assert not [m for m in sys.modules if m.startswith("raytrain_spot")], "loaded without this package"
new_tokens = generated.shape[1] - inputs["input_ids"].shape[1]
print(json.dumps({"logits": logits, "caption": caption, "new_tokens": new_tokens}))
"""


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory) -> str:
    """A model directory with weights, as a downloaded pretrained model is (the tiny LLaVA, trained nowhere)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = str(tmp_path_factory.mktemp("base") / "tiny-llava")
    write_preset("tiny-llava", path)
    torch.manual_seed(1234)
    AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path)).save_pretrained(path)
    return path


def lora_overrides(tmp_path, base: str) -> list:
    return ["+experiment=hf_vlm", "run.name=lora", f"trainer.max_steps={STEPS}", "trainer.global_batch_size=24",
            "trainer.micro_batch_size=8", f"task.model.path={base}", "task.lora.r=4", "task.lora.alpha=8",
            "optim.lr=0.05", "optim.warmup_samples=48", "task.data.num_samples=1024",
            f"task.data.cache_dir={tmp_path}/data-cache",
            f"checkpoint.local_dir={tmp_path}/node-local", f"checkpoint.head_dir={tmp_path}/head",
            "task.model.keep_base_in_node_memory=true"]  # the restart maps the base the first group published


@pytest.mark.cluster
@pytest.mark.chaos
def test_lora_checkpoints_adapters_only_resumes_at_another_size_and_exports_for_plain_peft(tmp_path, pretrained_base):
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")
    # The handoff at once (no warm-up hold, which could train on to the run's last step): the resume is the point.
    result = run_main(*lora_overrides(tmp_path, pretrained_base), "+chaos=events", "chaos.notice_s=4",
                      "chaos.margin_s=1", "elastic.notice_standby_wait_s=0",
                      "chaos.events=[{action:preempt,node:1,at_step:10}]", cwd=str(tmp_path),
                      env={"RAY_TMPDIR": ray_tmp}, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert ray_internal_lines(result.stdout + result.stderr) == []
    storage = f"{tmp_path}/outputs/storage"
    assert_clean_audit("lora", f"file://{storage}", f"{tmp_path}/head", f"{tmp_path}/node-local", STEPS, ray_tmp)

    events = read_events(str(tmp_path / "outputs" / "lora" / "events.jsonl"))
    steps = [e["step"] for e in events if e["ev"] == "step"]
    assert len(steps) == len(set(steps)) == STEPS, "a step was redone"
    groups = [g for g in events if g["ev"] == "group"]
    assert [g["world_size"] for g in groups][:2] == [3, 2] and groups[1]["step"] > 0, "resumed at 2 workers"
    losses = [e["loss"] for e in events if e["ev"] == "step"]
    assert sum(losses[-5:]) < 0.97 * sum(losses[:5]), "the adapters must train (rank 4 on a random base: slowly)"
    mapped = [path for path in glob.glob(f"{ray_tmp}/ray/session_*/logs/worker-*.err")
              if "Frozen weights mapped from the node's copy" in open(path).read()]
    assert len(mapped) >= 2, "the restarted group's ranks map the base the first group kept in the node's memory"

    # Training the whole model would checkpoint its weights and two AdamW moments: 3x these bytes.
    full_model_bytes = sum(p.numel() * 4 for p in _plain_model(pretrained_base).parameters())
    saved = [e["bytes"] for e in events if e["ev"] == "checkpoint"]
    assert saved and max(saved) < full_model_bytes / 2, \
        f"checkpoints of {max(saved)} bytes: the frozen base ({full_model_bytes} bytes) was saved too"

    final = LocalStore(storage).local_path(checkpoint_key("lora", STEPS))
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    config = run_config(str(tmp_path / "outputs" / "lora" / ".hydra" / "config.yaml"))
    export_model(final, str(adapter), "fp32", "pretrained", adapter_only=True, config=config)
    export_model(final, str(merged), "fp32", "pretrained", config=config)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    assert "model.safetensors" in os.listdir(merged)
    loaded = subprocess.run([sys.executable, "-c", PLAIN_LOAD, pretrained_base, str(adapter), str(merged)],
                            capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    plain = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert plain["new_tokens"] == 4
    torch.testing.assert_close(torch.tensor(plain["logits"]["adapter"]), torch.tensor(plain["logits"]["merged"]),
                               rtol=1e-4, atol=1e-4)

    (tmp_path / "scratch").mkdir()
    manifest, paths = fetch_verified(LocalStore(os.path.dirname(final)), os.path.basename(final),
                                     str(tmp_path / "scratch"))
    _, ours = rebuilt_model(manifest, load_checkpoint_state(manifest, paths)["model"], config)
    untrained = _plain_model(pretrained_base)
    inputs = _inputs(pretrained_base)
    with torch.no_grad():
        trained_logits = ours.eval()(**inputs).logits[0, -1]
        base_logits = untrained.eval()(**inputs).logits[0, -1]
    torch.testing.assert_close(torch.tensor(plain["logits"]["adapter"]), trained_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3), "the exported adapter must carry the training"


def _plain_model(path: str):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)


def _inputs(path: str):
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return processor(images=[image], text=["<image> a"], return_tensors="pt")


def test_lora_settings_that_name_no_layer_stop_before_ray(tmp_path, pretrained_base):
    task = HuggingFaceVLMTask(model=HfModelConfig(path=pretrained_base), lora=LoraConfig(r=4, target_modules=["qproj"]))
    with pytest.raises(ConfigError, match=r"task.lora.target_modules: LlavaForConditionalGeneration has no layer "
                                          r"named qproj. Fix: .*q_proj"):
        task.check_modules()
    with pytest.raises(ConfigError, match="task.lora.r: must be >= 0"):
        LoraConfig(r=-1)


@pytest.mark.parametrize("preset", families())
def test_the_default_lora_targets_adapt_every_family_s_attention(tmp_path, preset):
    task = HuggingFaceVLMTask(model=HfModelConfig(preset=preset, cache_dir=str(tmp_path)), lora=LoraConfig(r=2))
    task.check_modules()
    torch.manual_seed(0)
    model = task.build_model()
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    text_layers = model.base_model.model.config.text_config.num_hidden_layers
    assert len([name for name in adapted if "language_model" in name or "text_model" in name]) == 4 * text_layers
    assert all(not parameter.requires_grad for name, parameter in model.named_parameters() if "lora_" not in name)


@pytest.mark.parametrize("preset", families())
def test_a_later_build_on_the_node_maps_the_frozen_base_and_trains_like_a_loaded_one(tmp_path, preset):
    """The second LoRA build on a node (a restart's, another rank's) maps the first one's copy of the
    base; every family's model then holds the same weights, adapters included, and gives the same
    loss and adapter gradients as a model loaded from the directory."""
    def build(keep: bool):
        task = HuggingFaceVLMTask(model=HfModelConfig(preset=preset, cache_dir=str(tmp_path),
                                                      keep_base_in_node_memory=keep), lora=LoraConfig(r=2))
        torch.manual_seed(0)
        return task, task.build_model()

    task, loaded = build(keep=False)
    copy = copy_dir(MEMORY_SCRATCH, task.base_identity())
    shutil.rmtree(copy, ignore_errors=True)
    try:
        build(keep=True)  # the node's first build publishes the base
        _, mapped = build(keep=True)
        frozen = [parameter for parameter in mapped.parameters() if not parameter.requires_grad]
        assert {mapped_file(parameter) for parameter in frozen} == {os.path.join(copy, WEIGHTS)}

        assert [(name, p.requires_grad) for name, p in loaded.named_parameters()] == \
            [(name, p.requires_grad) for name, p in mapped.named_parameters()]
        for (name, expected), actual in zip(loaded.named_parameters(), mapped.parameters()):
            assert torch.equal(expected, actual), name
        batch = task.collate([task.build_dataset(0)[i] for i in range(2)])
        for model in (loaded, mapped):
            model.train()
            task.loss(model, batch).sum().backward()
        assert torch.equal(task.loss(loaded, batch), task.loss(mapped, batch))
        for (name, expected), actual in zip(loaded.named_parameters(), mapped.parameters()):
            if expected.requires_grad:
                assert torch.equal(expected.grad, actual.grad), name
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@pytest.mark.parametrize("preset", families("tiny-idefics3", "tiny-gemma3", "tiny-qwen2.5-vl"))
def test_an_adapter_of_a_preset_without_weights_is_refused_merged_export_works(tmp_path, preset):
    task = HuggingFaceVLMTask(model=HfModelConfig(preset=preset, cache_dir=str(tmp_path)), lora=LoraConfig(r=2))
    torch.manual_seed(0)
    model = task.build_model()
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ConfigError, match="has no weights file .*Fix: export merged weights"):
        task.save_pretrained(model, str(tmp_path / "adapter"), adapter_only=True)
    (tmp_path / "merged").mkdir()
    task.save_pretrained(model, str(tmp_path / "merged"), adapter_only=False)
    reloaded = _plain_model(str(tmp_path / "merged"))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_the_torch_export_of_a_frozen_base_checkpoint_holds_every_weight(tmp_path, pretrained_base):
    """A checkpoint without its frozen parameters still exports the whole model: export rebuilds the base."""
    from raytrain_spot.checkpoint.format import Manifest, STATE_FILE, commit, write_state
    from raytrain_spot.checkpoint.state import ModelWeights

    settings = {"_target_": "raytrain_spot.tasks.hf_vlm.task.HuggingFaceVLMTask",
                "model": {"path": pretrained_base}, "lora": {"r": 2}}
    task = HuggingFaceVLMTask(model=HfModelConfig(path=pretrained_base), lora=LoraConfig(r=2))
    torch.manual_seed(0)
    model = task.build_model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5)
    state = {"model": ModelWeights(model).state_dict()}
    entry = write_state(state, str(tmp_path / STATE_FILE))
    store = LocalStore(str(tmp_path / "ckpt"))
    commit(store, "step_00000001", {STATE_FILE: str(tmp_path / STATE_FILE)},
           Manifest(step=1, samples_seen=8, kind="final", world_size=1, files={STATE_FILE: entry},
                    config={"task": settings, "run": {"seed": 0}}))
    export_model(store.local_path("step_00000001"), str(tmp_path / "out"), "fp32",
                 config={"task": settings, "run": {"seed": 0}})
    exported = load_state(str(tmp_path / "out" / "model.pt"))
    assert exported.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(exported[name], value), name
