"""What users of transformers' LLaVA-NeXT already do keeps working with our classes swapped in.

Each test runs one habit on ours and on transformers' class over the same tiny fixture checkpoint.
"""

from __future__ import annotations

import inspect
import re
import warnings

import checkpoints
import pytest
import torch
from transformers import LlavaNextProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextForConditionalGeneration as ReferenceForConditionalGeneration,
)

from llava_next_plugin.errors import InputError
from llava_next_plugin.modeling import LlavaNextForConditionalGeneration

FP32_ATOL = 1e-4


def _photo(size=(90, 60)):
    return checkpoints.real_photo("chelsea.png").convert("RGB").resize(size)


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def processor(folder):
    return LlavaNextProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def models(folder, tiny_checkpoint_factory):
    """Ours and the reference on the fixture, and both on a second checkpoint (other weights) as assistants."""
    other = tiny_checkpoint_factory(seed=1)
    return {
        ("ours", "main"): LlavaNextForConditionalGeneration.from_pretrained(folder).eval(),
        ("reference", "main"): ReferenceForConditionalGeneration.from_pretrained(folder).eval(),
        ("ours", "assistant"): LlavaNextForConditionalGeneration.from_pretrained(other).eval(),
        ("reference", "assistant"): ReferenceForConditionalGeneration.from_pretrained(other).eval(),
    }


def _one_image(processor, text="[INST] <image>\nWhat is this? [/INST]"):
    return processor(images=[_photo()], text=[text], return_tensors="pt")


def _greedy(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)


# --- assisted decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("main,assistant", [("ours", "ours"), ("ours", "reference"), ("reference", "ours")])
def test_assisted_greedy_decoding_with_an_image_equals_plain_greedy(models, processor, main, assistant):
    """generate() encodes the image once and drafts with an assistant that never sees it: the drafts
    change, the verified tokens do not."""
    inputs = _one_image(processor)
    plain = _greedy(models["reference", "main"], inputs)
    assisted = _greedy(models[main, "main"], inputs, assistant_model=models[assistant, "assistant"])
    assert torch.equal(assisted, plain)


def test_our_model_assisting_itself_equals_plain_greedy(models, processor):
    ours = models["ours", "main"]
    inputs = _one_image(processor)
    assert torch.equal(_greedy(ours, inputs, assistant_model=ours), _greedy(ours, inputs))


def test_prompt_lookup_decoding_with_an_image_equals_plain_greedy(models, processor):
    # The last two prompt tokens recur earlier, followed by text: the lookup drafts text tokens.
    inputs = _one_image(processor, "<image>\nWhat is this? What is")
    ours, reference = models["ours", "main"], models["reference", "main"]
    plain = _greedy(reference, inputs)
    assert torch.equal(_greedy(ours, inputs, prompt_lookup_num_tokens=3), plain)
    assert torch.equal(_greedy(reference, inputs, prompt_lookup_num_tokens=3), plain)


# --- images encoded beforehand ---------------------------------------------------------------------


def test_features_encoded_beforehand_give_the_logits_of_pixel_values(models, processor):
    ours, reference = models["ours", "main"], models["reference", "main"]
    inputs = _one_image(processor)
    with torch.no_grad():
        encoded = ours.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        text = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_sizes")}
        mine = ours(**text, mm_encoder_outputs={"image": encoded}).logits
        theirs = reference(**text, mm_encoder_outputs={"image": encoded}).logits
        from_pixels = ours(**inputs).logits
    torch.testing.assert_close(mine, from_pixels, rtol=0, atol=0)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=FP32_ATOL)


def test_features_encoded_beforehand_must_match_the_image_tokens(models, processor):
    ours = models["ours", "main"]
    inputs = _one_image(processor)
    with torch.no_grad():
        encoded = ours.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    short = BaseModelOutputWithPooling(pooler_output=(encoded.pooler_output[0][:-1],))
    with pytest.raises(InputError, match="sample 0 has 70 <image> tokens but its images give 69 features"):
        ours(input_ids=inputs["input_ids"], mm_encoder_outputs={"image": short})
    with pytest.raises(InputError, match="either pixel_values or mm_encoder_outputs"):
        ours(**inputs, mm_encoder_outputs={"image": encoded})


# --- get_image_features ------------------------------------------------------------------------------


def test_get_image_features_returns_the_vision_towers_outputs_when_asked(folder, processor):
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    reference = ReferenceForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    inputs = _one_image(processor)
    args = (inputs["pixel_values"], inputs["image_sizes"])
    flags = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        mine, theirs = ours.get_image_features(*args, **flags), reference.get_image_features(*args, **flags)
        as_tuple = ours.get_image_features(*args, return_dict=False)
        reference_tuple = reference.get_image_features(*args, return_dict=False)
    layers = ours.config.vision_config.num_hidden_layers
    assert len(mine.hidden_states) == layers + 1 and len(mine.attentions) == layers
    torch.testing.assert_close(mine.last_hidden_state, theirs.last_hidden_state, rtol=0, atol=FP32_ATOL)
    for a, b in zip(mine.hidden_states + mine.attentions, theirs.hidden_states + theirs.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=FP32_ATOL)
    assert isinstance(as_tuple, tuple) and isinstance(reference_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], reference_tuple[0], rtol=0, atol=FP32_ATOL)  # last_hidden_state
    torch.testing.assert_close(as_tuple[1][0], reference_tuple[1][0], rtol=0, atol=FP32_ATOL)  # packed features


def test_get_image_features_follows_the_configs_output_flags_as_the_reference(folder, processor):
    inputs = _one_image(processor)
    args = (inputs["pixel_values"], inputs["image_sizes"])
    outputs = {}
    for name, model_class in (
        ("ours", LlavaNextForConditionalGeneration),
        ("reference", ReferenceForConditionalGeneration),
    ):
        model = model_class.from_pretrained(folder, attn_implementation="eager").eval()
        for config in (model.config, model.config.vision_config):  # as users set them: everywhere
            config.output_hidden_states = config.output_attentions = True
        with torch.no_grad():
            flagged = model.get_image_features(*args)
        for config in (model.config, model.config.vision_config):
            config.output_hidden_states = config.output_attentions = False
        model.config.return_dict = False
        with torch.no_grad():
            outputs[name] = (flagged, model.get_image_features(*args))
    (mine, mine_tuple), (theirs, theirs_tuple) = outputs["ours"], outputs["reference"]
    assert mine.hidden_states is not None and mine.attentions is not None
    assert len(mine.hidden_states) == len(theirs.hidden_states) and len(mine.attentions) == len(theirs.attentions)
    assert all(h is not None for h in mine.hidden_states)
    # transformers 5.24 leaves some hidden states of the vision tower None here (those its feature layer does
    # not read); compare the ones it gives, and every attention map
    pairs = [(a, b) for a, b in zip(mine.hidden_states, theirs.hidden_states, strict=True) if b is not None]
    assert pairs
    for a, b in pairs + list(zip(mine.attentions, theirs.attentions, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=FP32_ATOL)
    assert isinstance(mine_tuple, tuple) and isinstance(theirs_tuple, tuple)
    # (transformers' tuple also carries the hidden states its feature layer needed; the first two agree)
    torch.testing.assert_close(mine_tuple[0], theirs_tuple[0], rtol=0, atol=FP32_ATOL)  # last_hidden_state
    torch.testing.assert_close(mine_tuple[1][0], theirs_tuple[1][0], rtol=0, atol=FP32_ATOL)  # packed features


# --- the cache's old name -----------------------------------------------------------------------------


def test_past_key_values_still_works_with_transformers_deprecation_warning(models, processor):
    """From 5.24 the cache is ``cache`` and ``past_key_values`` gets transformers' FutureWarning; in 5.23
    ``past_key_values`` is the name itself, so neither class warns."""
    from llava_next_plugin._compat import CACHE_NAME, output_cache

    inputs = _one_image(processor)
    next_ids = torch.tensor([[7]])
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_ids)], dim=1)
    steps = {}
    for name in ("ours", "reference"):
        model = models[name, "main"]
        with torch.no_grad():
            prefill = model(**inputs, use_cache=True)
            if CACHE_NAME == "cache":
                with pytest.warns(FutureWarning, match=r"`past_key_values` is deprecated.*Use `cache` instead"):
                    steps[name] = model(
                        input_ids=next_ids, attention_mask=mask, past_key_values=output_cache(prefill)
                    ).logits
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    steps[name] = model(
                        input_ids=next_ids, attention_mask=mask, past_key_values=output_cache(prefill)
                    ).logits
    torch.testing.assert_close(steps["ours"], steps["reference"], rtol=0, atol=FP32_ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            models["ours", "main"](**inputs, use_cache=True)  # the new name: no warning


# --- weight initialisation ------------------------------------------------------------------------


def test_weights_missing_from_a_checkpoint_are_initialised_as_the_reference_does():
    """``from_pretrained(None, config=..., state_dict={})`` initialises every weight (nothing left on the
    meta device) with the same rules, hence under the same seed the same values, as transformers' class:
    CLIP's own init for the vision tower's layers, image_newline ~ N(0, 1/sqrt(hidden))."""
    from llava_next_plugin.configuration import LlavaNextConfig

    config = checkpoints.reference_config()
    models = []
    for model_class, model_config in (
        (ReferenceForConditionalGeneration, config),
        (LlavaNextForConditionalGeneration, LlavaNextConfig(**config.to_dict())),
    ):
        torch.manual_seed(0)
        models.append(model_class.from_pretrained(None, config=model_config, state_dict={}))
    theirs, mine = (model.state_dict() for model in models)
    assert mine.keys() == theirs.keys()
    assert not [key for key, value in mine.items() if value.device.type == "meta"]
    assert [key for key in mine if not torch.equal(mine[key], theirs[key])] == []
    q_proj = mine["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"]
    assert q_proj.std() > 0.05  # CLIP's scaled init, not the generic std 0.02


def test_image_processor_keeps_an_explicit_none_setting_as_transformers_does():
    from transformers import LlavaNextImageProcessor as ReferenceImageProcessor

    from llava_next_plugin.image_processing import LlavaNextImageProcessor
    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    image = _photo()
    settings = dict(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=checkpoints.REAL_PINPOINTS,
        do_normalize=None,
    )
    reference = ReferenceImageProcessor(**settings)
    expected = reference(image, return_tensors="pt")["pixel_values"]
    for processor_class in (LlavaNextImageProcessor, LlavaNextImageProcessorFast):
        processor = processor_class(**settings)
        assert processor.do_normalize is None and reference.do_normalize is None
        out = torch.as_tensor(processor(image, return_tensors="pt")["pixel_values"])
        assert out.shape == expected.shape and (out - expected).abs().max() <= 0.05  # rescaled, not normalized
        assert out.min() >= 0


def test_image_processor_classes_carry_transformers_defaults_and_an_explicit_none_survives_a_save(tmp_path):
    from transformers import LlavaNextImageProcessor as ReferenceImageProcessor

    from llava_next_plugin.image_processing import LlavaNextImageProcessor
    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad", "do_convert_rgb"):
        expected = getattr(ReferenceImageProcessor, name)
        assert expected is not None
        assert getattr(LlavaNextImageProcessor, name) == expected
        assert getattr(LlavaNextImageProcessorFast, name) == expected
    for processor_class in (LlavaNextImageProcessor, LlavaNextImageProcessorFast):
        processor = processor_class(do_normalize=None)
        assert "do_normalize" in processor.to_dict() and processor.to_dict()["do_normalize"] is None
        processor.save_pretrained(tmp_path / processor_class.__name__)
        assert processor_class.from_pretrained(tmp_path / processor_class.__name__).do_normalize is None
        # transformers' class reads the saved file the same way
        assert ReferenceImageProcessor.from_pretrained(tmp_path / processor_class.__name__).do_normalize is None


def test_image_processor_kwargs_are_found_under_transformers_naming_convention():
    import sys

    from llava_next_plugin.image_processing import LlavaNextImageProcessor, LlavaNextImageProcessorKwargs
    from llava_next_plugin.image_processing_fast import LlavaNextImageProcessorFast

    for processor_class in (LlavaNextImageProcessor, LlavaNextImageProcessorFast):
        module = sys.modules[processor_class.__module__]
        # transformers looks for "<class name>Kwargs" in the class's module
        assert getattr(module, f"{processor_class.__name__}Kwargs") is processor_class.valid_kwargs
        assert processor_class.valid_kwargs is LlavaNextImageProcessorKwargs
        assert "image_grid_pinpoints" in processor_class.valid_kwargs.__annotations__


# --- loading and generation habits -------------------------------------------------------------------


def test_device_map_auto_places_modules_as_the_reference_without_cutting_a_layer(folder, tmp_path):
    """A budget too small for the model: accelerate offloads, but never inside a decoder or vision
    layer (the sub-models' ``_no_split_modules``), and our map is the reference's, module for module."""
    maps = {}
    for name, model_class in (
        ("reference", ReferenceForConditionalGeneration),
        ("ours", LlavaNextForConditionalGeneration),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # accelerate's note on the bare image_newline parameter
            model = model_class.from_pretrained(
                folder, device_map="auto", max_memory={"cpu": "12MB"}, offload_folder=str(tmp_path / name)
            )
        maps[name] = model.hf_device_map
    assert maps["ours"] == maps["reference"]
    assert set(maps["ours"].values()) == {"cpu", "disk"}
    cut = [key for key in maps["ours"] if re.search(r"\.layers\.\d+\.", key)]
    assert cut == [], f"device map entries inside a layer: {cut}"


def test_dtype_auto_loads_the_checkpoints_dtype_as_the_reference(folder, tmp_path):
    bf16 = tmp_path / "bf16"
    ReferenceForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(bf16)
    for name in (
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "processor_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "tokenizer.json",
    ):
        if (folder / name).exists():
            (bf16 / name).write_bytes((folder / name).read_bytes())
    inputs = _one_image(LlavaNextProcessor.from_pretrained(folder))
    logits = {}
    for name, model_class in (
        ("ours", LlavaNextForConditionalGeneration),
        ("reference", ReferenceForConditionalGeneration),
    ):
        model = model_class.from_pretrained(bf16, dtype="auto")
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        with torch.no_grad():
            logits[name] = model(**inputs).logits
    assert torch.equal(logits["ours"], logits["reference"])


ATTENTION_ATOL = 1e-4  # fp32 logits of the same model under two attention kernels


def test_eager_sdpa_and_flex_attention_give_the_same_logits(folder, processor):
    inputs = processor(
        images=[_photo(), _photo((40, 110))],
        text=["[INST] <image>\nWhat is this? [/INST]", "[INST] <image>\nHi [/INST]"],
        padding=True,
        return_tensors="pt",
    )
    mask = inputs["attention_mask"].bool()
    logits = {}
    for attn in ("eager", "sdpa", "flex_attention"):
        ours = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation=attn).eval()
        reference = ReferenceForConditionalGeneration.from_pretrained(folder, attn_implementation=attn).eval()
        assert ours.model.language_model.config._attn_implementation == attn
        with torch.no_grad():
            logits[attn] = ours(**inputs).logits
            theirs = reference(**inputs).logits
        assert (logits[attn] - theirs).abs()[mask].max() <= ATTENTION_ATOL
    for attn in ("sdpa", "flex_attention"):
        assert (logits[attn] - logits["eager"]).abs()[mask].max() <= ATTENTION_ATOL


def test_scores_and_logits_returned_by_generate_match_the_reference(models, processor):
    inputs = _one_image(processor)
    kwargs = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
    mine = _greedy(models["ours", "main"], inputs, **kwargs)
    theirs = _greedy(models["reference", "main"], inputs, **kwargs)
    assert torch.equal(mine.sequences, theirs.sequences)
    assert len(mine.scores) == len(theirs.scores) == mine.sequences.shape[1] - inputs["input_ids"].shape[1]
    for a, b in zip(mine.scores + mine.logits, theirs.scores + theirs.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=FP32_ATOL)


def test_several_sampled_sequences_per_prompt_match_the_reference_under_one_seed(models, processor):
    inputs = processor(
        images=[_photo(), _photo((40, 110))],
        text=["[INST] <image>\nWhat is this? [/INST]", "[INST] <image>\nHi [/INST]"],
        padding=True,
        return_tensors="pt",
    )
    kwargs = dict(do_sample=True, num_return_sequences=3, top_k=20, max_new_tokens=6)
    outputs = []
    for name in ("ours", "reference"):
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(models[name, "main"].generate(**inputs, **kwargs))
    assert outputs[0].shape[0] == 6
    assert torch.equal(outputs[0], outputs[1])


def test_contrastive_search_is_the_hub_recipe_in_both(models, processor):
    """transformers 5.24 no longer ships contrastive search: it loads it from the hub, only with
    trust_remote_code=True. Ours gives the same clear error (offline, nothing is fetched)."""
    inputs = _one_image(processor)
    messages = []
    for name in ("ours", "reference"):
        with pytest.raises(ValueError, match="Contrastive Search requires `trust_remote_code=True`") as info:
            _greedy(models[name, "main"], inputs, penalty_alpha=0.6, top_k=4)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


@pytest.fixture(scope="module")
def eager_models(folder):
    """Ours and the reference with eager attention: the kernel that can return attention weights."""
    return {
        "ours": LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval(),
        "reference": ReferenceForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval(),
    }


@pytest.mark.parametrize("method", ["greedy", "beam search", "assisted", "prompt lookup"])
def test_generate_with_an_image_returns_the_references_attentions_and_hidden_states(eager_models, processor, method):
    """generate(output_attentions=True, output_hidden_states=True) with an image: one tuple per step, each
    with one tensor per layer, equal to the reference's. The image is encoded once before the first step;
    the language model's flags must still reach every step (assisted decoding reads them at each step)."""
    inputs = _one_image(processor, "<image>\nWhat is this? What is")
    extra: dict[str, dict[str, object]] = {
        "greedy": {},
        "beam search": {"num_beams": 2},
        "assisted": {},
        "prompt lookup": {"prompt_lookup_num_tokens": 2},
    }
    kwargs: dict[str, object] = {
        "return_dict_in_generate": True,
        "output_attentions": True,
        "output_hidden_states": True,
        **extra[method],
    }
    outputs = {}
    for name, model in eager_models.items():
        if method == "assisted":
            kwargs["assistant_model"] = model
        outputs[name] = _greedy(model, inputs, **kwargs)
    mine, theirs = outputs["ours"], outputs["reference"]
    assert torch.equal(mine.sequences, theirs.sequences)
    layers = eager_models["ours"].config.text_config.num_hidden_layers
    for field, per_step in (("attentions", layers), ("hidden_states", layers + 1)):
        steps, reference_steps = getattr(mine, field), getattr(theirs, field)
        assert len(steps) == len(reference_steps) > 0
        for step, reference_step in zip(steps, reference_steps, strict=True):
            assert isinstance(step, tuple) and len(step) == per_step
            for a, b in zip(step, reference_step, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=FP32_ATOL)


def test_get_image_features_takes_the_output_flags_by_keyword_only(eager_models, processor):
    """generate() passes get_image_features the model kwargs named in its signature and keeps them from
    the language model: the output flags are keyword arguments (**kwargs), as in transformers' model."""
    ours = eager_models["ours"]
    for method in (ours.get_image_features, ours.model.get_image_features):
        named = set(inspect.signature(method).parameters)
        assert not named & {"output_attentions", "output_hidden_states", "return_dict"}
    inputs = _one_image(processor)
    args = (inputs["pixel_values"], inputs["image_sizes"])
    flags = dict(output_attentions=True, output_hidden_states=True)
    mine, theirs = ours.get_image_features(*args, **flags), eager_models["reference"].get_image_features(*args, **flags)
    for field in ("attentions", "hidden_states"):
        assert len(getattr(mine, field)) == len(getattr(theirs, field)) > 0
        for a, b in zip(getattr(mine, field), getattr(theirs, field), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=FP32_ATOL)


def test_the_configs_use_cache_and_return_dict_settings_are_followed_as_the_reference_follows_them(models, processor):
    """Fine-tuning scripts set ``model.config.use_cache = False`` (no cache built) and some code sets
    ``config.return_dict = False`` (tuples); an explicit argument still wins."""
    inputs = _one_image(processor)
    for side in ("ours", "reference"):
        model = models[(side, "main")]
        saved = (getattr(model.config, "use_cache", None), model.config.return_dict)  # unset until a user sets it
        try:
            model.config.use_cache = False
            with torch.no_grad():
                assert model(**inputs).past_key_values is None, side
                assert model(**inputs, use_cache=True).past_key_values is not None, side
                model.config.return_dict = False
                for module in (model, model.model):
                    assert isinstance(module(**inputs), tuple), side
                    assert not isinstance(module(**inputs, return_dict=True), tuple), side
        finally:
            model.config.use_cache, model.config.return_dict = saved
    with torch.no_grad():
        ours, reference = (models[(side, "main")](**inputs, return_dict=False) for side in ("ours", "reference"))
    assert len(ours) == len(reference)
    torch.testing.assert_close(ours[0], reference[0], atol=FP32_ATOL, rtol=0)


def test_forward_gives_the_image_outputs_get_image_features_gives(models, processor):
    """``out.image_outputs``: the tower's last hidden state and one feature tensor per image (a list, as in
    transformers 5.24), so ``out[2][1]`` of a tuple is the features there too. (5.23's reference has only
    ``image_hidden_states``, all images' features in one tensor: ours answers that name too.)"""
    inputs = _one_image(processor)
    with torch.no_grad():
        ours, reference = (models[(side, "main")](**inputs) for side in ("ours", "reference"))
        as_tuple = models[("ours", "main")](**inputs, use_cache=False, return_dict=False)
    if hasattr(reference, "image_outputs"):  # transformers 5.24
        for name in ("last_hidden_state", "pooler_output"):
            mine, theirs = getattr(ours.image_outputs, name), getattr(reference.image_outputs, name)
            assert type(mine) is type(theirs), name
            torch.testing.assert_close(mine, theirs, atol=FP32_ATOL, rtol=0)
        expected = reference.image_outputs.pooler_output
    else:  # transformers 5.23
        theirs = reference.image_hidden_states
        expected = list(theirs) if isinstance(theirs, (list, tuple)) else [theirs]
        expected = [torch.cat([t.reshape(-1, t.shape[-1]) for t in expected])]
        assert ours.image_outputs.last_hidden_state is not None
    features = as_tuple[1][1]
    torch.testing.assert_close(torch.cat(features), torch.cat(expected), atol=FP32_ATOL, rtol=0)
    assert isinstance(ours.image_outputs.pooler_output, list)


def test_image_outputs_carry_the_towers_hidden_states_as_the_reference_and_all_of_them_when_asked(models, processor):
    """``out.image_outputs.hidden_states``: as the reference's, the layers the features come from (the others
    None); with ``output_hidden_states=True`` every layer of the tower, and with ``output_attentions=True`` its
    attentions."""
    inputs = _one_image(processor)
    ours_model, reference_model = models[("ours", "main")], models[("reference", "main")]
    with torch.no_grad():
        plain, reference = ours_model(**inputs), reference_model(**inputs)
        asked = ours_model(**inputs, output_hidden_states=True)
        attended = ours_model(**inputs, output_attentions=True)
    if hasattr(reference, "image_outputs"):  # transformers 5.24
        expected = reference.image_outputs.hidden_states
        assert [h is None for h in plain.image_outputs.hidden_states] == [h is None for h in expected]
        for mine, all_layers, theirs in zip(
            plain.image_outputs.hidden_states, asked.image_outputs.hidden_states, expected, strict=True
        ):
            if theirs is not None:
                torch.testing.assert_close(mine, theirs, atol=FP32_ATOL, rtol=0)
                torch.testing.assert_close(all_layers, theirs, atol=FP32_ATOL, rtol=0)
    layers = ours_model.config.vision_config.num_hidden_layers
    assert len(asked.image_outputs.hidden_states) == layers + 1
    assert all(h is not None for h in asked.image_outputs.hidden_states)
    # (under SDPA the tower has no attention weights to give: an empty tuple, as it returns them)
    assert plain.image_outputs.attentions is None and attended.image_outputs.attentions is not None


@pytest.mark.parametrize("newline", [True, False])
def test_transformers_public_helpers_pack_features_and_find_placeholders_as_the_reference(models, processor, newline):
    images = [_photo((90, 60)), _photo((40, 120)), _photo((30, 30))]
    text = ["[INST] <image><image>\nWhat? [/INST]", "[INST] <image>\nAnd this? [/INST]"]
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    reference = models[("reference", "main")]
    with torch.no_grad():
        tiles = reference.model.vision_tower(inputs["pixel_values"].flatten(0, 1), output_hidden_states=True)
        projected = reference.model.multi_modal_projector(tiles.hidden_states[-2][:, 1:])
        per_image = list(projected.unflatten(0, inputs["pixel_values"].shape[:2]))
        # each image's own tiles (the processor pads to the most), and one image given as its base view alone
        own = (inputs["pixel_values"].flatten(2).abs().sum(-1) > 0).sum(-1).tolist()  # padding tiles are zeros
        per_image = [f[:n] for f, n in zip(per_image, own[:2] + [1], strict=True)]
        results = {}
        for side in ("ours", "reference"):
            model = models[(side, "main")]
            line = model.model.image_newline if newline else None
            for owner in (model, model.model):
                packed, lengths = owner.pack_image_features(per_image, inputs["image_sizes"], "default", line)
                results.setdefault(side, []).append((packed, lengths))
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            features = torch.cat(packed)
            if side == "ours" and features.shape[0] != int((inputs["input_ids"] == model.config.image_token_id).sum()):
                with pytest.raises(InputError, match="<image> tokens but"):
                    model.model.get_placeholder_mask(inputs["input_ids"], embeds, features)
            assert model.model.vocab_size == model.config.text_config.vocab_size
    for (ours, our_lengths), (theirs, their_lengths) in zip(results["ours"], results["reference"], strict=True):
        assert our_lengths.tolist() == their_lengths.tolist()
        for mine, other in zip(ours, theirs, strict=True):
            torch.testing.assert_close(mine, other, atol=0, rtol=0)


def test_get_placeholder_mask_finds_the_image_tokens_from_ids_or_embeddings_as_the_reference(models, processor):
    inputs = _one_image(processor)
    masks = {}
    for side in ("ours", "reference"):
        model = models[(side, "main")].model
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        count = int((inputs["input_ids"] == model.config.image_token_id).sum())
        features = torch.zeros(count, embeds.shape[-1])
        masks[side] = [model.get_placeholder_mask(ids, embeds, features) for ids in (inputs["input_ids"], None)]
    for mine, theirs in zip(masks["ours"], masks["reference"], strict=True):
        assert mine.shape == theirs.shape and torch.equal(mine, theirs)
    with pytest.raises(InputError, match="the prompt has .* <image> tokens but 3 image features"):
        models[("ours", "main")].model.get_placeholder_mask(inputs["input_ids"], embeds, torch.zeros(3, 64))
