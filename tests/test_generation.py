"""generate() and the loading options users rely on, each against transformers' own class where it applies."""

from __future__ import annotations

import importlib.util
import threading

import checkpoints
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    BitsAndBytesConfig,
    CompileConfig,
    LlavaNextProcessor,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextForConditionalGeneration as ReferenceForConditionalGeneration,
)

from llava_next_plugin.modeling import LlavaNextForConditionalGeneration

NEW_TOKENS = 5


def _photo(size=(90, 60)) -> Image.Image:
    return checkpoints.real_photo("chelsea.png").convert("RGB").resize(size)


def _inputs(folder):
    processor = LlavaNextProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return processor, processor(
        images=[_photo(), _photo((40, 110))],
        text=["[INST] <image>\nWhat is this? [/INST]", "[INST] <image>\nHi [/INST]"],
        padding=True,
        return_tensors="pt",
    )


def _new_tokens(output, inputs) -> torch.Tensor:
    sequences = output.sequences if hasattr(output, "sequences") else output
    return sequences[:, inputs["input_ids"].shape[1] :]


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    ours = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    reference = ReferenceForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor, inputs = _inputs(tiny_checkpoint)
    return processor, inputs, ours, reference


@pytest.fixture(scope="module")
def wide_checkpoint(tiny_checkpoint_factory):
    """Every linear layer has 64+ features, so bitsandbytes 4-bit runs on CPU."""
    return tiny_checkpoint_factory(width=64, vision_width=64)


def _generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, **kwargs)


def test_sampling_with_the_same_seed_matches_reference(pair):
    _, inputs, ours, reference = pair
    kwargs = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95)
    torch.manual_seed(123)
    mine = _generate(ours, inputs, **kwargs)
    torch.manual_seed(123)
    theirs = _generate(reference, inputs, **kwargs)
    assert torch.equal(mine, theirs)


def test_beam_search_matches_reference(pair):
    _, inputs, ours, reference = pair
    kwargs = dict(num_beams=3, do_sample=False, num_return_sequences=2)
    mine, theirs = _generate(ours, inputs, **kwargs), _generate(reference, inputs, **kwargs)
    assert mine.shape[0] == 4
    assert torch.equal(mine, theirs)


class StopAfter(StoppingCriteria):
    def __init__(self, prompt_length: int, n: int):
        self.prompt_length, self.n = prompt_length, n

    def __call__(self, input_ids, scores, **kwargs):
        done = input_ids.shape[1] - self.prompt_length >= self.n
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


def test_chunked_prefill_of_a_batch_with_images_gives_the_unchunked_tokens_as_the_reference(pair):
    """generate(prefill_chunk_size=...) encodes the images once and hands each chunk its rows of all the features
    as one block, across samples: checked as a whole, as transformers does."""
    _, inputs, ours, reference = pair
    expected = _new_tokens(_generate(reference, inputs, do_sample=False), inputs)
    for model in (ours, reference):
        chunked = _generate(model, inputs, do_sample=False, prefill_chunk_size=16)
        assert torch.equal(_new_tokens(chunked, inputs), expected), type(model).__module__


def test_stopping_criteria_stop_generation(pair):
    _, inputs, ours, _ = pair
    criteria = StoppingCriteriaList([StopAfter(inputs["input_ids"].shape[1], 2)])
    out = _generate(ours, inputs, do_sample=False, stopping_criteria=criteria)
    assert _new_tokens(out, inputs).shape[1] == 2


def test_text_iterator_streamer_yields_the_generated_text(tiny_checkpoint):
    processor, _ = _inputs(tiny_checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    single = processor(images=[_photo()], text=["[INST] <image>\nWhat is this? [/INST]"], return_tensors="pt")
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(out=_generate(model, single, do_sample=False, streamer=streamer))
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    expected = processor.tokenizer.decode(_new_tokens(result["out"], single)[0], skip_special_tokens=True)
    assert streamed.strip() == expected.strip()


def test_static_cache_gives_the_same_tokens_as_the_dynamic_cache(pair):
    _, inputs, ours, reference = pair
    dynamic = _generate(ours, inputs, do_sample=False)
    static = _generate(ours, inputs, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)
    assert torch.equal(static, _generate(reference, inputs, do_sample=False, cache_implementation="static"))


def test_decode_step_with_static_cache_compiles_without_graph_breaks(pair):
    """``torch.compile(fullgraph=True)`` traces the decode step (eager backend: tracing, no codegen)."""
    _, inputs, ours, _ = pair
    compiled_step = torch.compile(ours.forward, backend="eager", fullgraph=True)
    logits = []
    for step in (ours.forward, compiled_step):
        cache = StaticCache(config=ours.config, max_cache_len=inputs["input_ids"].shape[1] + 4)
        with torch.no_grad():
            prefill = ours(**inputs, cache=cache, use_cache=True)
            next_ids = prefill.logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_ids)], dim=1)
            logits.append(step(input_ids=next_ids, attention_mask=mask, cache=cache, use_cache=True).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)


def test_static_cache_generation_compiled_by_inductor_gives_the_reference_tokens(pair, tiny_checkpoint):
    """``generate(cache_implementation="static", compile_config=...)`` runs the decode steps through our forward
    compiled by inductor (C++ codegen on CPU): the uncompiled greedy tokens, the reference's, and no
    recompilation at every step. ``_compile_all_devices`` lets transformers compile on CPU too."""
    from torch._dynamo.utils import counters

    _, inputs, _, reference = pair
    new_tokens = 6
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    static = dict(max_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        eager = model.generate(**inputs, **static)
        expected = reference.generate(**inputs, **static)
    compile_config = CompileConfig(backend="inductor", mode="default")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            compiled = model.generate(**inputs, **static, compile_config=compile_config)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled, expected)
    # one graph for the first decode step, one shape-generic graph that every later step reuses
    assert 0 < graphs < new_tokens - 1, f"{graphs} graphs for {new_tokens} tokens: recompiling at every step"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementations_match_reference(tiny_checkpoint, attn):
    ours = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation=attn)
    reference = ReferenceForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation=attn)
    assert ours.model.language_model.config._attn_implementation == attn
    _, inputs = _inputs(tiny_checkpoint)
    with torch.no_grad():
        mine, theirs = ours(**inputs).logits, reference(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert (mine - theirs).abs()[mask].max() <= 1e-4


def test_flash_attention_2_without_flash_attn_is_a_clear_error(tiny_checkpoint):
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="FlashAttention2.*not.*installed"):
            LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="flash_attention_2")
    else:  # with flash-attn installed, loading selects it for the language model
        model = LlavaNextForConditionalGeneration.from_pretrained(
            tiny_checkpoint, attn_implementation="flash_attention_2", dtype=torch.bfloat16
        )
        assert model.model.language_model.config._attn_implementation == "flash_attention_2"


def test_dtype_bfloat16_generates(pair, tiny_checkpoint):
    _, inputs, _, _ = pair
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = ReferenceForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert torch.equal(_generate(model, inputs, do_sample=False), _generate(reference, inputs, do_sample=False))


def test_device_map_auto_offloads_and_generates_the_same_tokens(pair, tiny_checkpoint, tmp_path):
    _, inputs, ours, _ = pair
    # A memory budget too small for the whole model: accelerate splits it between CPU and disk.
    # transformers' device map names the bare parameter image_newline, which accelerate's check of module
    # names warns about: the reference class gets the very same warning.
    placement = dict(device_map="auto", max_memory={"cpu": "12MB"})
    bare_parameter = r"device_map keys do not match any submodules in the model: \['model\.image_newline'\]"
    for model_class in (ReferenceForConditionalGeneration, LlavaNextForConditionalGeneration):
        with pytest.warns(UserWarning, match=bare_parameter):
            model = model_class.from_pretrained(
                tiny_checkpoint, offload_folder=str(tmp_path / model_class.__module__), **placement
            )
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert torch.equal(_generate(model, inputs, do_sample=False), _generate(ours, inputs, do_sample=False))
    # Saving an offloaded model writes every weight, in the hub layout (transformers warns that it reads
    # the offloaded weights back into memory to do so: expected here).
    with pytest.warns(UserWarning, match="save a model with offloaded modules"):
        model.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    torch.testing.assert_close(saved["language_model.lm_head.weight"], ours.lm_head.weight, rtol=0, atol=0)
    _, info = ReferenceForConditionalGeneration.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_quantization_matches_reference_and_saves_hub_layout(wide_checkpoint, bits, tmp_path):
    """Quantized logits equal the reference's; the save is the reference's save, tensor for tensor.

    What a reload reproduces depends on bitsandbytes, not on us: on a CPU with AVX512-BF16,
    bitsandbytes 0.50 repacks a 4-bit weight for its CPU kernel at the first forward, and undoing that
    when saving leaves the non-nested ``absmax`` transposed ([in/blocksize, out], bfloat16). A layer
    with more than one block per row then reloads with scrambled scales (logits off by ~0.07), and
    transformers' own class saves exactly the same tensors. So: a model saved before any forward
    reloads to its own logits; one saved after a forward saves what the reference saves, and both
    reload to the same logits.
    """
    quantization = BitsAndBytesConfig(**{f"load_in_{bits}bit": True})
    ours = LlavaNextForConditionalGeneration.from_pretrained(wide_checkpoint, quantization_config=quantization)
    reference = ReferenceForConditionalGeneration.from_pretrained(wide_checkpoint, quantization_config=quantization)
    quantized = type(ours.model.language_model.layers[0].self_attn.q_proj).__name__
    assert quantized == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    _, inputs = _inputs(wide_checkpoint)
    mask = inputs["attention_mask"].bool()

    def logits(model):
        with torch.no_grad():
            return model(**inputs).logits

    ours.save_pretrained(tmp_path / "before-forward")
    mine, theirs = logits(ours), logits(reference)
    assert torch.isfinite(mine).all()
    assert (mine - theirs).abs()[mask].max() <= 1e-4
    out = _generate(ours, inputs, do_sample=False)
    assert _new_tokens(out, inputs).shape == (2, NEW_TOKENS)

    saved = load_file(str(tmp_path / "before-forward" / "model.safetensors"))
    assert "language_model.model.embed_tokens.weight" in saved and not any(k.startswith("model.") for k in saved)
    reloaded, info = ReferenceForConditionalGeneration.from_pretrained(
        tmp_path / "before-forward", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (logits(reloaded) - mine).abs()[mask].max() <= 1e-4

    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "reference")
    mine_saved = load_file(str(tmp_path / "ours" / "model.safetensors"))
    theirs_saved = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert mine_saved.keys() == theirs_saved.keys()
    for key, tensor in theirs_saved.items():
        assert torch.equal(mine_saved[key], tensor), key
    mine_reloaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "ours")
    theirs_reloaded = ReferenceForConditionalGeneration.from_pretrained(tmp_path / "reference")
    assert torch.equal(logits(mine_reloaded), logits(theirs_reloaded))


def _multi_image_inputs(processor, images_per_prompt):
    """Two prompts, the first with two images; left padded. Returns the inputs and each sample's image range."""
    texts = ["[INST] " + "<image>" * len(images) + "\nCompare [/INST]" for images in images_per_prompt]
    inputs = processor(images=images_per_prompt, text=texts, padding=True, return_tensors="pt")
    starts = [0, len(images_per_prompt[0]), len(images_per_prompt[0]) + len(images_per_prompt[1])]
    return inputs, [range(starts[i], starts[i + 1]) for i in range(2)]


def _one_sample(inputs, row: int, images: range) -> dict:
    """Row ``row`` of a batch (same padding), with only its own images."""
    return {
        "input_ids": inputs["input_ids"][row : row + 1],
        "attention_mask": inputs["attention_mask"][row : row + 1],
        "pixel_values": inputs["pixel_values"][images.start : images.stop],
        "image_sizes": inputs["image_sizes"][images.start : images.stop],
    }


def test_beam_search_gives_each_sample_its_own_block_of_images(pair):
    processor, _, ours, _ = pair
    images = [[_photo((90, 30)), _photo((30, 90))], [_photo((60, 45))]]  # two sizes, then a single image
    inputs, blocks = _multi_image_inputs(processor, images)
    kwargs = dict(num_beams=2, do_sample=False, num_return_sequences=2)
    batched = _generate(ours, inputs, **kwargs)
    assert batched.shape[0] == 4
    for row, block in enumerate(blocks):
        alone = _generate(ours, _one_sample(inputs, row, block), **kwargs)
        assert torch.equal(batched[2 * row : 2 * row + 2], alone)


def test_each_returned_sequence_sees_its_sample_images_in_order(pair):
    processor, _, ours, _ = pair
    photo = _photo((60, 45))
    flipped = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    images = [[photo, flipped], [_photo((30, 90))]]  # same size: a swap would pass every shape check
    inputs, blocks = _multi_image_inputs(processor, images)
    torch.manual_seed(0)
    rows = _generate(ours, inputs, do_sample=True, top_k=1, num_return_sequences=2)  # top_k=1: greedy rows
    for row, block in enumerate(blocks):
        greedy = _generate(ours, _one_sample(inputs, row, block), do_sample=False)  # no expansion at all
        assert torch.equal(rows[2 * row], greedy[0]) and torch.equal(rows[2 * row + 1], greedy[0])
