"""The language model's forward written out, for Llama-family decoders (Mistral, Llama, Vicuna, Yi, Qwen2).

transformers' decoder does the arithmetic of one step in about fifty tensor ops per layer, and as much again in
Python around them: module calls, decorators, keyword plumbing, output classes. On a GPU under CUDA graphs that
Python is free; eager, and on a CPU, it is most of a decode step of a small model. :class:`PlainDecoder` runs the
same ops on the same weights (it holds the model's modules and reads their parameters at each call: no copy, and a
model moved or reloaded in place stays in use), in the same order, so its output equals transformers' bit for bit
(``tests/test_engine_decoder.py`` checks it for each backbone). A model it does not know is run by transformers.

One forward, for ``R`` rows of ``q`` queries (see :mod:`.step` for the inputs)::

    x [R, q, hidden] = embeds
    cos, sin [R, 1, q, head_dim]           rotary angles of position_ids (once, shared by the layers)
    per layer:
        h = rms_norm(x)
        q [R, heads, q, D], k, v [R, kv_heads, q, D]   projections; rotary on q and k
        k, v = cache.update(k, v, layer)                written in the rows' slots; [R, kv_heads, K, D] read back
        a = sdpa(q, k, v, mask [R, 1, q, K])            one query: q read as [R, kv_heads, groups, D] (no repeat);
                                                        a chunk: k and v repeated per query head, as transformers;
                                                        a chunk from position 0: no mask, is_causal
        x = x + o_proj(a);  x = x + down(silu(gate(rms_norm(x))) * up(rms_norm(x)))
    rms_norm(x) -> [R, q, hidden]
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["HookWatch", "PlainDecoder"]

logger = logging.getLogger(__name__)

#: Decoders whose layers are exactly: RMSNorm, attention with rotary (optional q/k/v/o biases), RMSNorm, SiLU MLP.
SUPPORTED = frozenset({"mistral", "llama", "qwen2"})
#: Rotary kinds whose frequencies are fixed at load (the ``dynamic`` and ``longrope`` kinds change with length).
STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})
#: Attention implementations computed as SDPA (ours, registered by :mod:`.step` for the compiled step, is too).
SDPA_LIKE = frozenset({"sdpa", "llava_next_slots"})


class HookWatch:
    """Called, whether a forward hook is set on any of *modules*, or on every module: a forward then runs through
    the modules, as the hook's author expects (a fault injector, a probe, a visualiser).

    The modules' hook dicts are listed once (torch adds and removes hooks in these same dicts): asked before
    every forward, a scan of ~800 dicts on a 7B model takes ~10 us, a tenth of reading them through the modules.
    """

    def __init__(self, modules) -> None:
        self._dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]

    def __call__(self) -> bool:
        from torch.nn.modules import module as nn_module

        return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks) or any(self._dicts)


def _linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """A plain ``nn.Linear`` as one op; anything else (quantized, LoRA-wrapped) through its own forward."""
    if type(module) is torch.nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module(x)


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' Llama-family RMSNorm: in float32, scaled by the weight in the input's dtype."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PlainDecoder:
    """The forward of a Llama-family ``language_model`` (transformers' base decoder, without its LM head)."""

    def __init__(self, language_model) -> None:
        config = language_model.config
        self.layers = list(language_model.layers)
        self.norm = language_model.norm
        self.rotary = language_model.rotary_emb
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.scaling = self.head_dim**-0.5

    @classmethod
    def of(cls, language_model) -> PlainDecoder | None:
        """A plain decoder for *language_model*, or ``None`` (logged) when it is not one this module knows."""
        reason = cls._unsupported(language_model)
        if reason:
            logger.info("the engine runs transformers' decoder forward: %s", reason)
            return None
        return cls(language_model)

    @staticmethod
    def _unsupported(language_model) -> str | None:
        config = getattr(language_model, "config", None)
        kind = getattr(config, "model_type", None)
        if kind not in SUPPORTED:
            return f"model type {kind!r} is not one of {sorted(SUPPORTED)}"
        attention = getattr(config, "_attn_implementation", None)
        if attention not in SDPA_LIKE:
            return f"attention implementation {attention!r} is not SDPA"
        if getattr(config, "hidden_act", None) not in ("silu", "swish"):
            return f"activation {getattr(config, 'hidden_act', None)!r} is not SiLU"
        rope = getattr(language_model, "rotary_emb", None)
        if rope is None or getattr(rope, "rope_type", None) not in STATIC_ROPE:
            return f"rotary kind {getattr(rope, 'rope_type', None)!r} changes with the length"
        if any(getattr(module, "_hf_hook", None) is not None for module in language_model.modules()):
            return "accelerate dispatches it (a device map)"
        for layer in language_model.layers:
            attention_module, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            names = [(attention_module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            names += [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
            names += [(layer, "input_layernorm"), (layer, "post_attention_layernorm")]
            if any(getattr(owner, name, None) is None for owner, name in names):
                return f"{type(layer).__name__} is not a Llama-family layer"
            if any(hasattr(attention_module, n) for n in ("q_norm", "k_norm")):
                return "its attention normalises queries and keys"
        return None

    def rotary_angles(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [R, 1, q, head_dim]`` for ``position_ids [R, q]``, as transformers' rotary embedding."""
        rope = self.rotary
        freqs = position_ids[..., None].float() * rope.inv_freq.to(device=position_ids.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * rope.attention_scaling).to(dtype)
        sin = (angles.sin() * rope.attention_scaling).to(dtype)
        return cos[:, None], sin[:, None]

    def __call__(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor] | None,
        cache,
        layer_types: list[str] | None = None,
    ) -> torch.Tensor:
        """``[R, q, hidden]`` final hidden states for ``embeds [R, q, hidden]``; *cache* is a :class:`~.kv.SlotView`
        (its ``update`` writes this forward's keys and values and returns the rows' ``[R, kv_heads, K, D]``).
        *mask* ``[R, 1, q, K]`` additive, or ``None`` for a chunk at positions ``0..q-1`` of every row (``K == q``):
        plain causal attention; or one such mask per attention kind, each layer taking its kind's
        (``layer_types[i]``)."""
        rows, length, _ = embeds.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        groups = heads // kv_heads
        cos, sin = self.rotary_angles(position_ids, embeds.dtype)
        x = embeds
        masks: list[torch.Tensor | None]
        if isinstance(mask, dict):
            if layer_types is None:
                raise ValueError("a mask per attention kind needs each layer's kind (layer_types)")
            masks = [mask[kind] for kind in layer_types]
        else:
            masks = [mask] * len(self.layers)
        for index, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            layer_mask = masks[index]
            h = _rms_norm(layer.input_layernorm, x)
            q = _linear(attention.q_proj, h).view(rows, length, heads, dim).transpose(1, 2)
            k = _linear(attention.k_proj, h).view(rows, length, kv_heads, dim).transpose(1, 2)
            v = _linear(attention.v_proj, h).view(rows, length, kv_heads, dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k, v = cache.update(k, v, index)
            if groups > 1 and length == 1:  # [R, kv_heads, groups, D]: each key/value head serves its group
                a = F.scaled_dot_product_attention(
                    q.reshape(rows, kv_heads, groups, dim), k, v, attn_mask=layer_mask, scale=self.scaling
                )
            else:
                if groups > 1:
                    k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(rows, heads, -1, dim)
                    v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(rows, heads, -1, dim)
                a = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=layer_mask, is_causal=layer_mask is None, scale=self.scaling
                )
            a = a.reshape(rows, heads, length, dim).transpose(1, 2).reshape(rows, length, heads * dim)
            x = x + _linear(attention.o_proj, a)
            h = _rms_norm(layer.post_attention_layernorm, x)
            x = x + _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h))
        return _rms_norm(self.norm, x)
