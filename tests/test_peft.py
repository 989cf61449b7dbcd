"""PEFT/LoRA on our model: the adapters land where they do on the reference class, a training step moves
only them, and a saved adapter reloaded onto a fresh model (by peft or by transformers) gives the same logits."""

from __future__ import annotations

import checkpoints
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import LlavaNextProcessor
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextForConditionalGeneration as ReferenceForConditionalGeneration,
)

from llava_next_plugin.modeling import LlavaNextForConditionalGeneration

RANK = 4


def lora_config() -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def photo() -> Image.Image:
    return checkpoints.real_photo("chelsea.png").convert("RGB").resize((90, 60))


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint):
    processor = LlavaNextProcessor.from_pretrained(tiny_checkpoint)
    batch = processor(images=[photo()], text=["[INST] <image>\nWhat is this? [/INST] A cat."], return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[labels == processor.tokenizer.convert_tokens_to_ids("<image>")] = -100  # no loss on image positions
    return dict(batch), labels


def logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


# peft reads transformers' deprecated is_gradient_checkpointing property (not ours to change).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_trains_only_its_adapters_and_reloads_onto_a_fresh_model(tiny_checkpoint, inputs, tmp_path):
    batch, labels = inputs
    base = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    before = logits(base, batch)
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = get_peft_model(base, lora_config())

    # Adapters on every q_proj/v_proj (vision tower and language model), r * (in + out) weights each, as
    # on transformers' own class.
    targets = {name: m for name, m in base.named_modules() if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj")}
    expected = sum(RANK * (m.in_features + m.out_features) for m in targets.values())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected > 0
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    reference = get_peft_model(ReferenceForConditionalGeneration.from_pretrained(tiny_checkpoint), lora_config())
    assert reference.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()

    def adapted(m):
        return sorted(n for n, _ in m.named_parameters() if "lora_" in n)

    assert adapted(model) == adapted(reference)

    # One training step: the loss flows back to the adapters, only they move.
    model.train()
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    # (The vision tower's last layer is past vision_feature_layer=-2: its adapters get no gradient.)
    text_lora_b = [p for name, p in model.named_parameters() if "lora_B" in name and "language_model" in name]
    assert text_lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in text_lora_b)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    for name, p in base.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, frozen[name.replace(".base_layer", "")]), name
    trained = logits(model, batch)
    assert not torch.allclose(trained, before)

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(
        LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint), tmp_path / "adapter"
    )
    torch.testing.assert_close(logits(reloaded, batch), trained, rtol=0, atol=1e-6)
    # transformers' own PEFT integration loads it too.
    fresh = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    fresh.load_adapter(str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(fresh, batch), trained, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_an_adapter_saved_with_the_hubs_older_key_names_loads_as_on_the_reference(tiny_checkpoint, inputs, tmp_path):
    """Many hub adapters for llava-v1.6 name their weights as transformers 4.4x held them
    (``base_model.model.language_model.model.*``, ``base_model.model.vision_tower.vision_model.*``): peft and
    transformers' load_adapter rename them, onto our class as onto transformers' own."""
    import shutil

    from safetensors.torch import load_file, save_file

    batch, _ = inputs
    torch.manual_seed(0)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trained = get_peft_model(ReferenceForConditionalGeneration.from_pretrained(tiny_checkpoint), config)
    expected = logits(trained, batch)
    trained.save_pretrained(tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    weights = load_file(tmp_path / "new" / "adapter_model.safetensors")

    def older(key: str) -> str:
        key = key.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
        return key.replace("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model.")

    renamed = {older(key): value for key, value in weights.items()}
    assert renamed.keys() != weights.keys()
    save_file(renamed, tmp_path / "old" / "adapter_model.safetensors", metadata={"format": "pt"})
    by_peft = PeftModel.from_pretrained(
        LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint), tmp_path / "old"
    )
    torch.testing.assert_close(logits(by_peft, batch), expected, rtol=0, atol=1e-6)
    by_transformers = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    by_transformers.load_adapter(str(tmp_path / "old"))
    torch.testing.assert_close(logits(by_transformers, batch), expected, rtol=0, atol=1e-6)


def test_an_engine_gives_the_tokens_of_the_adapter_state_it_runs_with_after_a_switch(tiny_checkpoint):
    """Disabling a peft adapter changes no parameter: the engine's reuse caches must still not serve what the
    adapter computed (its weights version counts the tuner layers' state)."""
    from checkpoints import ask, photo, reference_greedy

    from llava_next_plugin.engine import Engine, SamplingParams

    torch.manual_seed(0)
    model = ReferenceForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = LlavaNextProcessor.from_pretrained(tiny_checkpoint)
    config = LoraConfig(
        r=8, lora_alpha=64, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False
    )
    adapted = get_peft_model(model, config)
    engine = Engine(model, processor).start()
    try:
        prepared = engine.prepare(
            ask("Describe the picture in a few words."), [photo(80, 50)], SamplingParams(max_tokens=8, temperature=0)
        )
        with_adapter = engine.submit(prepared).result(timeout=120).token_ids
        assert with_adapter == reference_greedy(model, prepared, 8)
        with adapted.disable_adapter():
            without = engine.submit(prepared).result(timeout=120).token_ids
            assert without == reference_greedy(model, prepared, 8) != with_adapter
        assert engine.submit(prepared).result(timeout=120).token_ids == with_adapter
    finally:
        engine.shutdown(drain=False)
