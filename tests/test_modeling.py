"""Our LlavaNextForConditionalGeneration against transformers' own, on the same tiny random checkpoints.

Inputs come from transformers' ``LlavaNextProcessor`` (the reference) loaded from the same folder.
Tolerances: fp32 logits within 1e-4 max-abs; bf16 on CPU within 5e-2 max-abs (with logits of
magnitude ~1, i.e. a few bf16 ulps). Greedy generations are compared tie-aware: where two sequences
part, the reference's top-two logit gap at that step must be below 1e-3.
"""

from __future__ import annotations

import warnings

import checkpoints
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import LlavaNextProcessor
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextForConditionalGeneration as ReferenceForConditionalGeneration,
)

from llava_next_plugin.configuration import LlavaNextConfig as OurConfig
from llava_next_plugin.errors import InputError
from llava_next_plugin.modeling import LlavaNextForConditionalGeneration, LlavaNextModel

FP32_ATOL = 1e-4
BF16_ATOL = 5e-2
TIE_GAP = 1e-3

BACKBONES = {
    "mistral-clip": {},
    "llama-clip": {"text": "llama"},
    "qwen2-clip": {"text": "qwen2"},
    "mistral-siglip-full-layers": {"vision": "siglip", "strategy": "full", "feature_layer": [-3, -1]},
    "mistral-dinov2": {"vision": "dinov2"},  # a CLS token, and no vision_model level in its keys
}


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    """A real photo resized to ``size`` = (width, height), RGB."""
    return checkpoints.real_photo(name).convert("RGB").resize(size)


WIDE = ("chelsea.png", (90, 60))
TALL = ("rocket.jpg", (40, 110))
SQUARE = ("astronaut.png", (64, 64))


def load_pair(folder, **kwargs):
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
    reference = ReferenceForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
    return ours, reference


def processor_for(folder) -> LlavaNextProcessor:
    processor = LlavaNextProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return processor


def prompt(n_images: int, text: str = "Describe the picture.") -> str:
    return "[INST] " + "<image>\n" * n_images + text + " [/INST]"


def make_inputs(processor, case: str):
    """Processor outputs for one of the parity cases."""
    if case == "single":
        return processor(images=[photo(*WIDE)], text=[prompt(1)], return_tensors="pt")
    if case == "batch_mixed_sizes":
        return processor(
            images=[photo(*WIDE), photo(*TALL)],
            text=[prompt(1, "Hi"), prompt(1, "What is shown here?")],
            padding=True,
            return_tensors="pt",
        )
    if case == "several_images":
        return processor(
            images=[photo(*WIDE), photo(*TALL), photo(*SQUARE)], text=[prompt(3, "Compare them.")], return_tensors="pt"
        )
    if case == "image_and_text_only":
        return processor(
            images=[photo(*TALL)], text=["[INST] Hi there [/INST]", prompt(1)], padding=True, return_tensors="pt"
        )
    if case == "text_only":
        return processor(
            text=["[INST] Tell me a story. [/INST]", "[INST] Hi [/INST]"], padding=True, return_tensors="pt"
        )
    raise ValueError(case)


def logits_of(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def assert_close_where_attended(ours, reference, attention_mask, atol):
    mask = attention_mask.bool()
    diff = (ours.float() - reference.float()).abs()[mask].max().item()
    assert diff <= atol, f"max-abs logit difference {diff:.3g} > {atol}"


def assert_greedy_parity(ours, reference, inputs, max_new_tokens=6):
    """Greedy generations agree, or part only where the reference's top-two logits are within TIE_GAP."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        mine = ours.generate(**inputs, **kwargs)
        theirs = reference.generate(**inputs, **kwargs)
    start = inputs["input_ids"].shape[1]
    a, b = mine.sequences[:, start:], theirs.sequences[:, start:]
    length = min(a.shape[1], b.shape[1])
    all_agree = True
    for row in range(a.shape[0]):
        parted = (a[row, :length] != b[row, :length]).nonzero()
        if len(parted) == 0:
            continue
        all_agree = False
        step = parted[0].item()
        top2 = theirs.logits[step][row].float().topk(2).values
        gap = (top2[0] - top2[1]).item()
        assert gap < TIE_GAP, f"row {row} parts at step {step} where the reference's top-2 gap is {gap:.3g}"
    if all_agree:
        assert a.shape == b.shape


@pytest.fixture(scope="module", params=list(BACKBONES))
def backbone(request, tiny_checkpoint_factory):
    folder = tiny_checkpoint_factory(**BACKBONES[request.param])
    ours, reference = load_pair(folder)
    return folder, processor_for(folder), ours, reference


# --- parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["single", "batch_mixed_sizes", "several_images", "image_and_text_only", "text_only"])
def test_logits_match_reference(backbone, case):
    _, processor, ours, reference = backbone
    inputs = make_inputs(processor, case)
    assert_close_where_attended(
        logits_of(ours, inputs), logits_of(reference, inputs), inputs["attention_mask"], FP32_ATOL
    )


@pytest.mark.parametrize("case", ["single", "batch_mixed_sizes"])
def test_loss_with_labels_matches_reference(backbone, case):
    _, processor, ours, reference = backbone
    inputs = make_inputs(processor, case)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        mine = ours(**inputs, labels=labels).loss
        theirs = reference(**inputs, labels=labels).loss
    assert torch.isfinite(mine)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("case", ["single", "batch_mixed_sizes", "several_images", "text_only"])
def test_greedy_generation_matches_reference(backbone, case):
    _, processor, ours, reference = backbone
    assert_greedy_parity(ours, reference, make_inputs(processor, case))


def test_image_features_match_reference(backbone):
    _, processor, ours, reference = backbone
    inputs = make_inputs(processor, "several_images")
    with torch.no_grad():
        mine = ours.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        theirs = reference.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert len(mine) == len(theirs) == 3
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=FP32_ATOL)


def test_bf16_on_cpu_matches_reference(tiny_checkpoint):
    ours, reference = load_pair(tiny_checkpoint, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.model.vision_tower.dtype == torch.bfloat16
    inputs = make_inputs(processor_for(tiny_checkpoint), "batch_mixed_sizes")
    mine, theirs = logits_of(ours, inputs), logits_of(reference, inputs)
    assert mine.dtype == torch.bfloat16
    assert_close_where_attended(mine, theirs, inputs["attention_mask"], BF16_ATOL)


@pytest.fixture(scope="module")
def mistral_pair(tiny_checkpoint):
    ours, reference = load_pair(tiny_checkpoint)
    return processor_for(tiny_checkpoint), ours, reference


@pytest.fixture(scope="module", params=["mistral-clip", "mistral-siglip-full-layers"])
def sweep_pair(request, tiny_checkpoint_factory):
    folder = tiny_checkpoint_factory(**BACKBONES[request.param])
    return (processor_for(folder), *load_pair(folder))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(1, 260), width=st.integers(1, 260))
def test_feature_count_equals_processor_token_count(sweep_pair, height, width):
    processor, ours, reference = sweep_pair
    image = Image.fromarray(np.full((height, width, 3), 127, dtype=np.uint8))
    inputs = processor(images=[image], text=[prompt(1)], return_tensors="pt")
    n_tokens = int((inputs["input_ids"] == ours.config.image_token_id).sum())
    with torch.no_grad():
        (mine,) = ours.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        (theirs,) = reference.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert mine.shape[0] == n_tokens == ours.config.image_geometry(height, width).num_tokens
    torch.testing.assert_close(mine, theirs, rtol=0, atol=FP32_ATOL)


# --- what users rely on --------------------------------------------------------------------------------


def test_output_hidden_states_and_attentions_match_reference(tiny_checkpoint):
    ours, reference = load_pair(tiny_checkpoint, attn_implementation="eager")
    inputs = make_inputs(processor_for(tiny_checkpoint), "single")
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        mine, theirs = ours(**inputs, **kwargs), reference(**inputs, **kwargs)
    layers = ours.config.text_config.num_hidden_layers
    assert len(mine.hidden_states) == layers + 1 and len(mine.attentions) == layers
    seq = inputs["input_ids"].shape[1]
    assert mine.attentions[0].shape == (1, ours.config.text_config.num_attention_heads, seq, seq)
    for a, b in zip(mine.hidden_states + mine.attentions, theirs.hidden_states + theirs.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=FP32_ATOL)


def test_stacked_or_listed_pixel_values_give_the_same_logits_as_padded_5d(mistral_pair):
    processor, ours, _ = mistral_pair
    inputs = make_inputs(processor, "batch_mixed_sizes")
    tiles = [ours.config.image_geometry(h, w).num_tiles for h, w in inputs["image_sizes"].tolist()]
    assert len(set(tiles)) > 1, "the case should pad one image's tiles"
    per_image = [pv[:n] for pv, n in zip(inputs["pixel_values"], tiles, strict=True)]
    expected = logits_of(ours, inputs)
    torch.testing.assert_close(
        logits_of(ours, dict(inputs, pixel_values=torch.cat(per_image))), expected, rtol=0, atol=0
    )
    torch.testing.assert_close(logits_of(ours, dict(inputs, pixel_values=per_image)), expected, rtol=0, atol=0)


def test_inputs_embeds_give_the_same_logits_as_input_ids(mistral_pair):
    processor, ours, _ = mistral_pair
    inputs = make_inputs(processor, "single")
    embeds = ours.get_input_embeddings()(inputs["input_ids"])
    by_embeds = dict(inputs, inputs_embeds=embeds)
    del by_embeds["input_ids"]
    torch.testing.assert_close(logits_of(ours, by_embeds), logits_of(ours, inputs), rtol=0, atol=FP32_ATOL)


def test_return_dict_false_gives_a_tuple(mistral_pair):
    processor, ours, _ = mistral_pair
    inputs = make_inputs(processor, "single")
    with torch.no_grad():
        out = ours(**inputs, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], logits_of(ours, inputs))


def test_the_cache_comes_back_under_the_name_generate_reads(mistral_pair):
    """transformers 5.24 names the KV cache ``cache``, 5.23 ``past_key_values`` (outputs and forward
    arguments): ours uses the installed version's name, as the reference does, and decodes from it alike."""
    processor, ours, reference = mistral_pair
    inputs = make_inputs(processor, "single")
    next_ids = torch.tensor([[7]])
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_ids)], dim=1)
    steps = []
    for model in (ours, reference):
        with torch.no_grad():
            prefill = model(**inputs, use_cache=True)
            names = [name for name in ("cache", "past_key_values") if name in prefill.keys()]
            step = model(input_ids=next_ids, attention_mask=mask, use_cache=True, **{names[0]: prefill[names[0]]})
        steps.append((names, step.logits))
    (our_names, our_logits), (reference_names, reference_logits) = steps
    assert our_names == reference_names
    torch.testing.assert_close(our_logits, reference_logits, atol=FP32_ATOL, rtol=0)


def test_base_model_returns_hidden_states_and_image_outputs(tiny_checkpoint):
    model = LlavaNextModel.from_pretrained(tiny_checkpoint).eval()
    inputs = make_inputs(processor_for(tiny_checkpoint), "several_images")
    with torch.no_grad():
        out = model(**inputs)
    assert out.last_hidden_state.shape == (*inputs["input_ids"].shape, model.config.text_config.hidden_size)
    assert len(out.image_outputs.pooler_output) == 3


def test_resize_token_embeddings_updates_embeddings_head_and_loss(tiny_checkpoint):
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    inputs = make_inputs(processor_for(tiny_checkpoint), "single")
    new_size = model.config.text_config.vocab_size + 8
    model.resize_token_embeddings(new_size)
    assert model.get_input_embeddings().weight.shape[0] == new_size
    assert model.lm_head.weight.shape[0] == new_size
    assert model.config.text_config.vocab_size == new_size
    labels = inputs["input_ids"].clone()
    labels[0, -1] = new_size - 1
    out = model(**inputs, labels=labels)
    assert out.logits.shape[-1] == new_size and torch.isfinite(out.loss)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoint):
    inputs = make_inputs(processor_for(tiny_checkpoint), "single")
    grads = []
    for checkpointing in (False, True):
        model = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append(
            (
                model.model.image_newline.grad,
                model.model.multi_modal_projector.linear_1.weight.grad,
                model.model.language_model.layers[0].self_attn.q_proj.weight.grad,
            )
        )
    for plain, checkpointed in zip(*grads, strict=True):
        assert plain is not None and plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)


def test_module_names_match_reference_for_peft(mistral_pair):
    _, ours, reference = mistral_pair
    assert dict(ours.named_parameters()).keys() == dict(reference.named_parameters()).keys()
    names = {n.rsplit(".", 1)[-1] for n, _ in ours.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names


# --- clear errors instead of shape errors ------------------------------------------------------------


def _raises_bad_request(model, match, **inputs):
    with pytest.raises(InputError, match=match) as info:
        with torch.no_grad():
            model(**inputs)
    assert isinstance(info.value, ValueError)
    return info.value


def test_image_tokens_without_any_image_are_ordinary_tokens_with_one_warning(tiny_checkpoint):
    """As transformers: a text-only prompt holding the <image> id embeds it like any token (warned once)."""
    ours, reference = load_pair(tiny_checkpoint)
    ids = make_inputs(processor_for(tiny_checkpoint), "single")["input_ids"]
    assert (ids == ours.config.image_token_id).any()
    with pytest.warns(UserWarning, match=r"<image> tokens \(id 32000\) but no images.*ordinary tokens"):
        mine = logits_of(ours, {"input_ids": ids})
    torch.testing.assert_close(mine, logits_of(reference, {"input_ids": ids}), rtol=0, atol=FP32_ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits_of(ours, {"input_ids": ids})  # once per model, not at every call


def test_pixel_values_without_image_tokens(mistral_pair):
    processor, ours, _ = mistral_pair
    images = make_inputs(processor, "single")
    text = processor(text=["[INST] Hi [/INST]"], return_tensors="pt")
    _raises_bad_request(
        ours,
        "no <image> token",
        input_ids=text["input_ids"],
        pixel_values=images["pixel_values"],
        image_sizes=images["image_sizes"],
    )


def test_token_feature_mismatch_names_the_sample_and_the_cause(mistral_pair):
    processor, ours, _ = mistral_pair
    inputs = make_inputs(processor, "batch_mixed_sizes")
    ids = inputs["input_ids"].clone()
    last_image_token = (ids[1] == ours.config.image_token_id).nonzero()[-1].item()
    ids[1, last_image_token] = 1
    error = _raises_bad_request(
        ours, "sample 1 has", input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
    )
    expected = ours.config.image_geometry(110, 40).num_tokens
    assert f"{expected - 1} <image> tokens" in str(error) and f"{expected} features" in str(error)
    assert "patch_size" in str(error)


def test_missing_image_sizes(mistral_pair):
    processor, ours, _ = mistral_pair
    inputs = make_inputs(processor, "single")
    _raises_bad_request(ours, "without image_sizes", input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])


def test_image_sizes_of_the_wrong_length(mistral_pair):
    processor, ours, _ = mistral_pair
    inputs = make_inputs(processor, "batch_mixed_sizes")
    _raises_bad_request(
        ours,
        "image_sizes has 1",
        input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        image_sizes=inputs["image_sizes"][:1],
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda i: {"image_sizes": i["image_sizes"][0]}, r"image_sizes must be \[images, 2\]"),
        (lambda i: {"image_sizes": i["image_sizes"][0].tolist()}, r"image_sizes must be \[images, 2\]"),
        (lambda i: {"pixel_values": i["pixel_values"].numpy()}, "return_tensors='pt'"),
        (lambda i: {"pixel_values": i["pixel_values"][:, :, :2]}, "takes 3 channels"),
        (lambda i: {"vision_feature_layer": 3}, "not a hidden state of the 2-layer vision tower"),
        (lambda i: {"vision_feature_layer": [0, -1]}, "selects 2 layer.s. but the projector takes 1"),
    ],
    ids=["sizes-1d", "sizes-flat-list", "numpy-pixels", "two-channels", "layer-out-of-range", "layers-vs-projector"],
)
def test_bad_image_inputs_name_the_parameter_and_the_fix(mistral_pair, change, match):
    processor, ours, _ = mistral_pair
    inputs = make_inputs(processor, "single")
    _raises_bad_request(ours, match, **dict(inputs, **change(inputs)))


def test_full_strategy_with_clip_says_why(mistral_pair):
    processor, ours, _ = mistral_pair
    inputs = make_inputs(processor, "single")
    _raises_bad_request(ours, "CLS", vision_feature_select_strategy="full", **inputs)


def test_tiles_of_the_wrong_size_say_which_setting_differs(mistral_pair):
    processor, ours, _ = mistral_pair
    inputs = make_inputs(processor, "single")
    big = torch.nn.functional.interpolate(inputs["pixel_values"][0], size=(48, 48))[None]
    _raises_bad_request(ours, "crop_size", **dict(inputs, pixel_values=big))


def test_full_strategy_given_to_from_pretrained_of_a_clip_model_fails_at_load_with_the_configs_message(tiny_checkpoint):
    from llava_next_plugin import LlavaNextConfig

    config = LlavaNextConfig.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="square grid") as at_config:
        LlavaNextConfig(
            vision_config=config.vision_config, text_config=config.text_config, vision_feature_select_strategy="full"
        )
    for model_class in (LlavaNextForConditionalGeneration, LlavaNextModel):
        with pytest.raises(ValueError, match="square grid") as at_load:
            model_class.from_pretrained(tiny_checkpoint, vision_feature_select_strategy="full")
        assert str(at_load.value) == str(at_config.value)


# flash-attn made absent (``find_spec`` answers None for a module set to None), as on most machines.
LOAD_WITH_FLASH_ATTENTION_ABSENT = """
import sys

sys.modules["flash_attn"] = None
from llava_next_plugin import LlavaNextForConditionalGeneration

try:
    LlavaNextForConditionalGeneration.from_pretrained(sys.argv[1], attn_implementation="flash_attention_2")
except ImportError as exc:
    print("ImportError:", exc)
"""


def test_flash_attention_without_flash_attn_says_what_to_install_or_use_instead(tiny_checkpoint):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_FLASH_ATTENTION_ABSENT, str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "ImportError: attn_implementation='flash_attention_2' cannot be used here" in done.stdout
    assert "pip install 'llava-next-plugin[flash]'" in done.stdout
    assert "attn_implementation='sdpa'" in done.stdout


def test_packing_orders_are_cached_per_layout_not_per_image_size():
    from llava_next_plugin import geometry
    from llava_next_plugin.modeling import _packing_order_of_layout, packing_order

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's
    sizes = [(h, w) for h in range(200, 2001, 45) for w in range(200, 2001, 45)]
    geoms = [geometry.image_geometry(h, w, pinpoints, 336, 14) for h, w in sizes]
    layouts = {(g.grid_rows, g.grid_cols, g.side, g.crop_top, g.crop_bottom, g.crop_left, g.crop_right) for g in geoms}
    _packing_order_of_layout.cache_clear()
    orders = [packing_order(g, 576) for g in geoms]
    assert _packing_order_of_layout.cache_info().currsize == len(layouts) < len(sizes) // 4
    for g, order in zip(geoms, orders, strict=True):
        assert order.shape == (g.num_tokens,)
        assert int((order == -1).sum()) == g.unpadded_rows  # one newline per kept row


# --- which images belong to which sample: the one walk ------------------------------------------------------


def test_images_of_samples_gives_each_sample_its_block_of_images():
    from llava_next_plugin.modeling import images_of_samples

    labels = ["a", "b", "c", "d"]
    assert images_of_samples([3, 0, 5, 4], [1, 2, 5, 4], labels) == [range(0, 2), range(2, 2), range(2, 3), range(3, 4)]
    with pytest.raises(InputError, match=r"sample 0 has 2 <image> tokens but its images give 3 features \(image 0 a"):
        images_of_samples([2, 5], [3, 4], labels[:2])
    with pytest.raises(InputError, match=r"sample 1 has 5 <image> tokens .*\(no image left\)"):
        images_of_samples([3, 5], [3], labels[:1])
    with pytest.raises(InputError, match="1 image\\(s\\) have no <image> tokens"):
        images_of_samples([3], [3, 4], labels[:2])


# --- OpenAI's detail: low is the base view alone ------------------------------------------------------------


@pytest.fixture(scope="module")
def our_processor(tiny_checkpoint):
    from llava_next_plugin import LlavaNextProcessor as OurProcessor

    processor = OurProcessor.from_pretrained(tiny_checkpoint)
    processor.tokenizer.padding_side = "left"
    return processor


def test_low_detail_features_are_the_base_view_of_the_full_features(mistral_pair, our_processor):
    _, ours, reference = mistral_pair
    images = [photo(*WIDE), photo(*TALL), photo(*SQUARE)]
    inputs = our_processor(images=images, text=[prompt(3)], return_tensors="pt")
    base = ours.config.image_geometry(60, 90).base_tokens
    with torch.no_grad():
        full = reference.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        per_image = [pv[: 1 + 4] for pv in inputs["pixel_values"]]  # a list with more tiles than a low image uses
        for pixel_values in (inputs["pixel_values"], per_image):
            low = ours.get_image_features(pixel_values, inputs["image_sizes"], image_detail="low").pooler_output
            assert [len(f) for f in low] == [base] * 3
            for low_i, full_i in zip(low, full, strict=True):
                torch.testing.assert_close(low_i, full_i[:base], atol=FP32_ATOL, rtol=0)
        mixed = ours.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], image_detail=["low", "high", "auto"]
        ).pooler_output
    assert [len(f) for f in mixed] == [base, len(full[1]), len(full[2])]
    torch.testing.assert_close(mixed[2], full[2], atol=FP32_ATOL, rtol=0)


def test_low_detail_generate_takes_the_processors_expansion_and_expands_by_sample(mistral_pair, our_processor):
    _, ours, _ = mistral_pair
    detail = ["low", "high", "low"]
    inputs = our_processor(
        images=[photo(*WIDE), photo(*TALL), photo(*SQUARE)],
        text=[prompt(2, "Compare."), prompt(1, "Hi")],
        padding=True,
        return_tensors="pt",
        image_detail=detail,
    )
    start = inputs["input_ids"].shape[1]
    with torch.no_grad():
        greedy = ours.generate(**inputs, image_detail=detail, max_new_tokens=4, do_sample=False)[:, start:]
        # two rows per sample: each sample's block of images (and its details) repeated, rows stay greedy
        rows = ours.generate(
            **inputs, image_detail=detail, max_new_tokens=4, do_sample=True, top_k=1, num_return_sequences=2
        )[:, start:]
        logits = ours(**inputs, image_detail=detail).logits
    assert torch.equal(rows, greedy.repeat_interleave(2, dim=0))
    assert torch.equal(logits[:, -1].argmax(-1), greedy[:, 0])
    expected = [ours.config.image_geometry(60, 90).base_tokens, ours.config.image_geometry(110, 40).num_tokens]
    assert (inputs["input_ids"][1] == ours.config.image_token_id).sum() == ours.config.image_geometry(
        64, 64
    ).base_tokens
    assert (inputs["input_ids"][0] == ours.config.image_token_id).sum() == sum(expected)


def test_a_detail_the_processor_did_not_use_is_a_clear_error(mistral_pair, our_processor):
    _, ours, _ = mistral_pair
    inputs = our_processor(images=[photo(*WIDE)], text=[prompt(1)], return_tensors="pt", image_detail="low")
    _raises_bad_request(ours, "sample 0 has 16 <image> tokens but its images give", **inputs)  # model at full
    full = our_processor(images=[photo(*WIDE)], text=[prompt(1)], return_tensors="pt")
    _raises_bad_request(ours, "but its images give 16 features", **full, image_detail="low")
    _raises_bad_request(ours, "'low', 'high', 'auto'", **inputs, image_detail="medium")


def test_pinpoints_that_are_not_whole_tiles_feed_the_tower_the_whole_tiles_in_their_places():
    """With a 64x80 pinpoint and 32 px tiles the processors cut a 2x3 grid of views, the third column a 16 px
    strip; the model's grid is the 2x2 whole tiles. It must read views 1, 2, 4, 5 (not the first four, which
    would put a strip where a tile belongs)."""
    from llava_next_plugin.configuration import LlavaNextConfig
    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    torch.manual_seed(0)
    pinpoints = [[64, 80]]
    config = LlavaNextConfig(
        vision_config=checkpoints.vision_config().to_dict(),
        text_config=checkpoints.text_config().to_dict(),
        image_token_index=32000,
        image_grid_pinpoints=pinpoints,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    processor = LlavaNextImageProcessorFast(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    inputs = processor(image, return_tensors="pt")
    pixels, sizes = inputs["pixel_values"], inputs["image_sizes"]
    geometry = config.image_geometry(64, 80)
    assert pixels.shape[1] == 7 and (geometry.grid_rows, geometry.grid_cols) == (2, 2)
    assert list(geometry.view_indices(32)) == [0, 1, 2, 4, 5]

    def features(pixel_values):
        with torch.no_grad():
            return model.get_image_features(pixel_values, sizes).pooler_output[0]

    plain = features(pixels)
    for view in range(7):
        changed = pixels.clone()
        changed[0, view] += 1.0
        assert torch.equal(features(changed), plain) == (view in (3, 6)), view  # the strips are not read
    # the same from a list, and from 4-D input holding exactly the tiles used
    assert torch.equal(features([pixels[0]]), plain)
    assert torch.equal(features(pixels[0, [0, 1, 2, 4, 5]]), plain)


def test_vision_feature_layer_0_reads_the_towers_embeddings():
    """Layer 0 is the embeddings' output, the same hidden state as layer -(layers + 1): a bare 0 once asked the
    tower to record no layer at all."""
    from llava_next_plugin.configuration import LlavaNextConfig
    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    torch.manual_seed(0)
    vision = checkpoints.vision_config()
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=checkpoints.text_config().to_dict(),
        image_token_index=32000,
        vision_feature_layer=0,
        image_grid_pinpoints=[[64, 64]],
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    processor = LlavaNextImageProcessorFast(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=[[64, 64]]
    )
    inputs = processor(photo("astronaut.png", (60, 50)), return_tensors="pt")
    with torch.no_grad():
        first = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
        same = model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-(vision.num_hidden_layers + 1)
        ).pooler_output[0]
    assert torch.equal(first, same)


def test_transformers_own_config_builds_our_model_with_the_same_weights(tiny_checkpoint):
    """`from transformers import LlavaNextConfig` still names transformers' class after our import: given to our
    classes, it is read as ours (it crashed on a method only ours has)."""
    import transformers

    theirs = transformers.LlavaNextConfig.from_pretrained(tiny_checkpoint)
    assert not isinstance(theirs, OurConfig)
    built = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint, config=theirs).eval()
    plain = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    assert isinstance(built.config, OurConfig) and isinstance(LlavaNextModel(theirs).config, type(built.config))
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(built(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_dinov2_tower_saved_by_us_loads_into_the_reference_with_every_key(tiny_checkpoint_factory, tmp_path):
    """Towers other than CLIP and SigLIP never had a ``vision_model`` level: saved as ``vision_tower.X``."""
    from safetensors import safe_open

    folder = tiny_checkpoint_factory(vision="dinov2")
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ours.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        tower_keys = [key for key in saved.keys() if key.startswith("vision_tower.")]
    assert tower_keys and not any(key.startswith("vision_tower.vision_model.") for key in tower_keys)
    reference, info = ReferenceForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = make_inputs(processor_for(folder), "single")
    torch.testing.assert_close(logits_of(ours.eval(), inputs), logits_of(reference.eval(), inputs), rtol=0, atol=0)
