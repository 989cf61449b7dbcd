"""Checkpoints: the three key layouts load into our model with nothing missing and the same logits,
and ``save_pretrained`` writes the llava-hf hub layout that transformers' own class loads."""

from __future__ import annotations

import shutil

import checkpoints
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaNextProcessor
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextForConditionalGeneration as ReferenceForConditionalGeneration,
)

from llava_next_plugin.checkpoint_keys import to_hub_key, to_memory_key
from llava_next_plugin.modeling import LlavaNextForConditionalGeneration, LlavaNextModel

HUB_PREFIXES = (
    "language_model.model.",
    "language_model.lm_head.",
    "vision_tower.vision_model.",
    "multi_modal_projector.",
    "image_newline",
)


def _assert_clean(info: dict) -> None:
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]


def _inputs(folder):
    processor = LlavaNextProcessor.from_pretrained(folder)
    return processor(
        images=[checkpoints.real_photo()], text=["[INST] <image>\nWhat is this? [/INST]"], return_tensors="pt"
    )


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def reference_logits(tiny_checkpoint):
    reference = ReferenceForConditionalGeneration.from_pretrained(tiny_checkpoint)
    inputs = _inputs(tiny_checkpoint)
    return inputs, _logits(reference, inputs), reference


def _in_memory_folder(source, target, reference) -> None:
    """A copy of *source* whose weights carry transformers 5's in-memory names (``model.language_model.*``)."""
    shutil.copytree(source, target)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})


def test_key_mapping_covers_all_three_layouts():
    memory = [
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
        "model.multi_modal_projector.linear_1.bias",
        "model.image_newline",
    ]
    hub = [
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.lm_head.weight",
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "multi_modal_projector.linear_1.bias",
        "image_newline",
    ]
    saved_by_transformers5 = [k.replace("vision_tower.vision_model.", "vision_tower.") for k in hub]
    assert [to_memory_key(k) for k in hub] == memory
    assert [to_memory_key(k) for k in saved_by_transformers5] == memory
    assert [to_memory_key(k) for k in memory] == memory
    assert [to_hub_key(k) for k in memory] == hub


@pytest.mark.parametrize("layout", ["hub", "transformers5", "in_memory"])
def test_every_layout_loads_cleanly_with_identical_logits(
    layout, tiny_checkpoint_factory, tiny_checkpoint, reference_logits, tmp_path
):
    inputs, expected, reference = reference_logits
    if layout == "hub":
        folder = tiny_checkpoint
    elif layout == "transformers5":
        folder = tiny_checkpoint_factory(hub_layout=False)
        keys = load_file(str(folder / "model.safetensors")).keys()
        assert any(k.startswith("vision_tower.embeddings.") for k in keys)
    else:
        folder = tmp_path / "in-memory"
        _in_memory_folder(tiny_checkpoint, folder, reference)
    model, info = LlavaNextForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    _assert_clean(info)
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=0)


def test_save_pretrained_writes_hub_layout_the_reference_loads(tiny_checkpoint, reference_logits, tmp_path):
    inputs, expected, _ = reference_logits
    ours = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ours.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")).keys())
    assert keys == set(load_file(str(tiny_checkpoint / "model.safetensors")).keys())
    assert all(k.startswith(HUB_PREFIXES) for k in keys)
    reference, info = ReferenceForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean(info)
    torch.testing.assert_close(_logits(reference, inputs), expected, rtol=0, atol=0)
    again, info = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean(info)
    torch.testing.assert_close(_logits(again, inputs), expected, rtol=0, atol=0)


def test_model_built_from_config_saves_hub_layout(tiny_checkpoint, tmp_path):
    config = LlavaNextForConditionalGeneration.config_class.from_pretrained(tiny_checkpoint)
    model = LlavaNextForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert all(k.startswith(HUB_PREFIXES) for k in keys)
    _, info = ReferenceForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean(info)


def test_tied_embeddings_load_tie_and_save_once(tiny_checkpoint_factory, tmp_path):
    folder = tiny_checkpoint_factory(tie_word_embeddings=True)
    inputs = _inputs(folder)
    reference = ReferenceForConditionalGeneration.from_pretrained(folder)
    ours, info = LlavaNextForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    _assert_clean(info)
    assert ours.lm_head.weight.data_ptr() == ours.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(_logits(ours, inputs), _logits(reference, inputs), rtol=0, atol=0)
    ours.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert "language_model.lm_head.weight" not in keys
    assert "language_model.model.embed_tokens.weight" in keys
    reloaded, info = ReferenceForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean(info)
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(reference, inputs), rtol=0, atol=0)


def test_base_model_loads_and_saves_hub_layout(tiny_checkpoint, tmp_path):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel as ReferenceModel

    model, info = LlavaNextModel.from_pretrained(tiny_checkpoint, output_loading_info=True)
    _assert_clean(info)  # the LM head is left out on purpose, not reported
    reference = ReferenceForConditionalGeneration.from_pretrained(tiny_checkpoint)
    torch.testing.assert_close(model.image_newline, reference.model.image_newline, rtol=0, atol=0)
    torch.testing.assert_close(model.language_model.norm.weight, reference.model.language_model.norm.weight)
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert all(k.startswith(HUB_PREFIXES) for k in keys) and "language_model.lm_head.weight" not in keys
    reloaded, info = ReferenceModel.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean(info)
    torch.testing.assert_close(reloaded.image_newline, model.image_newline, rtol=0, atol=0)
