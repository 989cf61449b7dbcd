"""The engine's plain decoder forward equals transformers' decoder bit for bit (hidden states and the keys and
values it writes in the slots) for each Llama-family backbone, over prefill chunks and one-token steps; other
backbones, other attentions and hooked models run through transformers' modules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from checkpoints import text_config

from llava_next_plugin._compat import cache_kwarg
from llava_next_plugin.engine.decoder import HookWatch, PlainDecoder
from llava_next_plugin.engine.kv import KVSlots
from llava_next_plugin.engine.step import ModelRunner


def _decoder_model(kind: str, attention: str = "sdpa", **overrides):
    config = text_config(kind)
    for name, value in overrides.items():
        setattr(config, name, value)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    with torch.no_grad():  # random biases (zeros at init would hide a missing one)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


def _slots(model) -> KVSlots:
    config = model.config
    dtype = next(model.parameters()).dtype
    return KVSlots(
        layers=config.num_hidden_layers,
        slots=3,
        kv_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        max_len=32,
        dtype=dtype,
        device="cpu",
    )


def _forward(model, kv: KVSlots, plain: bool, embeds, positions, rows: slice):
    """One engine forward of *rows* (slot rows), as :class:`ModelRunner` runs it, by either path."""
    kv_len = int(positions.max()) + 1
    runner = SimpleNamespace(sliding_window=None, dtype=embeds.dtype)
    mask = ModelRunner.mask(runner, positions, torch.arange(kv_len))
    cache = kv.view(rows, positions, kv_len)
    with torch.inference_mode():
        if plain:
            return PlainDecoder(model)(embeds, positions, mask, cache)
        cache_arg = cache_kwarg(model.forward)  # transformers 5.24 renamed past_key_values to cache
        return model(
            inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=True, **{cache_arg: cache}
        ).last_hidden_state


BACKBONES = {
    "mistral": ("mistral", {}),
    "llama with biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama 3 rotary": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "qwen2 (q, k, v biases)": ("qwen2", {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_plain_decoder_equals_transformers_bit_for_bit_over_chunks_and_steps(backbone, dtype):
    kind, overrides = BACKBONES[backbone]
    model = _decoder_model(kind, **overrides).to(dtype)
    assert PlainDecoder.of(model) is not None
    if "rope_type" in overrides.get("rope_parameters", {}):
        assert model.rotary_emb.rope_type == "llama3"
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    theirs_kv, ours_kv = _slots(model), _slots(model)
    # a prefill chunk of two rows (slots 1 and 2) that start at different positions, then a step of three rows
    chunk = torch.randn(2, 5, hidden, generator=gen).to(dtype)
    chunk_positions = torch.stack([torch.arange(0, 5), torch.arange(3, 8)])
    step = torch.randn(3, 1, hidden, generator=gen).to(dtype)
    step_positions = torch.tensor([[0], [5], [8]])
    for embeds, positions, rows in ((chunk, chunk_positions, slice(1, 3)), (step, step_positions, slice(0, 3))):
        theirs = _forward(model, theirs_kv, False, embeds, positions, rows)
        ours = _forward(model, ours_kv, True, embeds, positions, rows)
        assert torch.equal(ours, theirs)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(ours_kv.keys[layer], theirs_kv.keys[layer])
        assert torch.equal(ours_kv.values[layer], theirs_kv.values[layer])


@pytest.mark.parametrize(
    ("kind", "attention", "overrides", "reason"),
    [
        ("phi3", "sdpa", {}, "model type 'phi3'"),
        ("mistral", "eager", {}, "attention implementation 'eager'"),
        ("llama", "sdpa", {"hidden_act": "gelu"}, "activation 'gelu'"),
        ("llama", "sdpa", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rotary"),
    ],
)
def test_backbones_the_plain_decoder_does_not_know_run_through_transformers(kind, attention, overrides, reason):
    model = _decoder_model(kind, attention, **overrides)
    assert PlainDecoder.of(model) is None
    assert reason in PlainDecoder._unsupported(model)


def test_a_hook_on_any_module_of_the_decoder_sends_the_engine_through_the_modules(tiny_checkpoint):
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    processor = transformers.AutoProcessor.from_pretrained(tiny_checkpoint)
    from checkpoints import ask, photo

    from llava_next_plugin.engine import Engine, SamplingParams

    engine = Engine(model, processor, max_batch_size=1).start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0)
        plain = engine.generate(ask("Hi"), [photo(40, 40)], params)
        assert engine.runner._plain()
        calls = []
        layer = model.model.language_model.layers[1].mlp.down_proj
        handle = layer.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
        assert not engine.runner._plain()
        hooked = engine.generate(ask("Hi"), [photo(40, 40)], params)
        handle.remove()
        assert engine.runner._plain()
    finally:
        engine.shutdown(drain=False)
    assert len(calls) == 4  # the prefill and three decode steps went through the hooked module
    assert hooked.token_ids == plain.token_ids


def test_pre_hooks_and_global_hooks_count_as_hooks_while_they_are_set():
    model = _decoder_model("mistral")
    hooked = HookWatch(model.modules())
    assert not hooked()
    handle = model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda module, args: None)
    assert hooked()
    handle.remove()
    assert not hooked()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert hooked()
    finally:
        handle.remove()
    assert not hooked()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backbone", ["mistral", "qwen2 (q, k, v biases)"])
def test_a_chunk_from_position_0_attends_causally_without_a_mask_with_the_same_result(backbone, dtype):
    """The first chunk of new prompts (rows of 7 and 4 tokens, the second padded) runs SDPA's ``is_causal``
    instead of a built mask: the hidden states of real tokens and the keys and values written are the same."""
    kind, overrides = BACKBONES[backbone]
    model = _decoder_model(kind, **overrides).to(dtype)
    gen = torch.Generator().manual_seed(2)
    embeds = torch.randn(2, 7, model.config.hidden_size, generator=gen).to(dtype)
    positions = torch.stack([torch.arange(7), torch.tensor([0, 1, 2, 3, 0, 0, 0])])
    theirs_kv, ours_kv = _slots(model), _slots(model)
    write = positions.clone()
    write[1, 4:] = theirs_kv.scratch  # padding writes to the scratch column, as the engine's prefill does
    runner = SimpleNamespace(sliding_window=None, dtype=dtype)
    mask = ModelRunner.mask(runner, positions, torch.arange(7))
    with torch.inference_mode():
        cache_arg = cache_kwarg(model.forward)
        theirs = model(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{cache_arg: theirs_kv.view(slice(1, 3), write, 7)},
        ).last_hidden_state
        ours = PlainDecoder(model)(embeds, positions, None, ours_kv.view(slice(1, 3), write, 7))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1, :4], theirs[1, :4])
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(ours_kv.keys[layer][:, :, :7], theirs_kv.keys[layer][:, :, :7])
        assert torch.equal(ours_kv.values[layer][:, :, :7], theirs_kv.values[layer][:, :, :7])
