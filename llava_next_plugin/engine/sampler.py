"""Batched sampling on the device: one call for every row of a step, no host sync inside.

Inputs, for ``n`` rows: ``logits [n, vocab]``, and per row ``temperature [n]`` (float32), ``top_p [n]``,
``seed [n]`` and ``step [n]`` (int64), ``do_sample [n]`` (bool: temperature > 0, else greedy). Output:
``tokens [n]`` (int64) and ``ok [n]`` (bool: the row's maximum is finite, so no NaN), both on the device; the
engine moves them to the host in one transfer per step.

A sampled row draws from ``softmax(logits / temperature)`` restricted to the nucleus (the smallest set of most
likely tokens whose mass reaches ``top_p``) by inverting its cumulative distribution at one uniform number.
That number is a counter-based hash of ``(seed, step)``, so a seeded request draws the same tokens whatever
else is in its batch, and no generator state is kept or synchronised.

Numerically safe for every temperature the validator accepts (down to ``5e-324``): the logits are shifted so
their maximum is 0 before dividing, and the temperature is clamped to float32's smallest normal number, so
``0 / T`` stays 0, the rest goes to ``-inf`` and the softmax never sees ``inf - inf``; a ``top_p`` that is 0 in
float32 (``5e-324``) keeps the most likely token, as any ``top_p`` does.
"""

from __future__ import annotations

import torch

__all__ = ["first_max", "greedy", "sample", "row_params", "uniform"]

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**31: products of a 32-bit value with it fit in int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values < 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX) & _M32
    x = x ^ (x >> 16)
    x = (x * _MIX) & _M32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``[n]`` float32 in (0, 1): a pure function of each row's 64-bit seed and its step."""
    bits = _mix((seed & _M32) ^ _mix(((seed >> 32) & _M32) ^ _mix((step * 0x2545F49) & _M32)))
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's most likely token ``[n]`` (the first maximum, as argmax) and whether the row is usable ``[n]``:
    its maximum is finite (a NaN propagates to it; a row whose maximum is +inf or -inf has no distribution). The
    compiled decode step computes the same in its graph (``ModelRunner.decode``'s ``greedy``)."""
    top, tokens = first_max(logits)
    return tokens, torch.isfinite(top)


def first_max(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum ``[n]`` and the index of its first occurrence ``[n]`` (the compiled decode step
    computes it in its graph, fused with the LM head's output).

    In two stages when the vocabulary splits into equal blocks: each block's maximum (``amax``, one vectorised
    pass), the first block holding the row's maximum, then the first maximum inside that block. That is the
    first maximum of the row, found 3-4x faster on a CPU than by ``max(dim=-1)``, whose index-tracking pass is
    not vectorised.
    """
    rows, vocab = logits.shape
    block = _block(vocab)
    if block is None:
        return logits.max(dim=-1)
    blocks = logits.reshape(rows, vocab // block, block)
    top, which = blocks.amax(dim=-1).max(dim=-1)  # [n]: the row's maximum and the first block holding it
    inside = blocks.gather(1, which[:, None, None].expand(rows, 1, block))[:, 0].max(dim=-1).indices
    return top, which * block + inside


def _block(vocab: int) -> int | None:
    """The largest divisor of *vocab* from 16 to 256 (a block of :func:`first_max`), or ``None``. (A few us: not
    cached, so the compiled step traces it to a constant without a cache for dynamo to see through.)"""
    for size in range(256, 15, -1):  # a plain loop: older dynamo versions trace generators less well
        if vocab % size == 0:
            return size
    return None


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    do_sample: torch.Tensor,
    *,
    top_p_rows: list[int] | torch.Tensor | None = None,
    first: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens ``[n]`` and whether each row is usable ``[n]`` (see :func:`greedy` and the module docstring).

    *top_p_rows* lists the rows with ``top_p < 1``, or holds them in a tensor on the logits' device (``None``: all
    rows are sorted).
    *first*: the rows' :func:`first_max`, when the step computed it already. A batch of greedy rows only is
    cheaper through :func:`greedy`.
    """
    logits = logits.float().contiguous()  # a decode step's may be a transposed view (head.py)
    top, greedy_tokens = first if first is not None else first_max(logits)
    ok = torch.isfinite(top)
    shifted = logits - top[:, None]  # <= 0, the maximum exactly 0
    temp = temperature.to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
    probs = torch.softmax(shifted / temp[:, None], dim=-1)
    u = uniform(seed, step)
    sampled = _invert(probs, u)
    rows = range(probs.shape[0]) if top_p_rows is None else top_p_rows
    if len(rows):
        index = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(list(rows), device=probs.device)
        sorted_probs, order = probs.index_select(0, index).sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the top token, even when top_p is 0 in float32)
        keep = top_p.index_select(0, index).clamp_min(torch.finfo(torch.float32).tiny)
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= keep[:, None]
        picked = _invert(sorted_probs.masked_fill(outside, 0.0), u.index_select(0, index))
        sampled = sampled.index_copy(0, index, order.gather(-1, picked[:, None])[:, 0])
    return torch.where(do_sample, sampled, greedy_tokens), ok


def _invert(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token index where each row's cumulative mass first reaches ``u`` of its total ``[n]``."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    return torch.searchsorted(cdf, target)[:, 0].clamp_max(probs.shape[-1] - 1)


def row_params(params_list, steps: list[int], seeds: list[int], device) -> tuple[torch.Tensor, ...]:
    """The per-row tensors :func:`sample` takes (after *logits*), built on the host, one transfer each."""
    temperature = torch.tensor([max(float(p.temperature), 0.0) for p in params_list], dtype=torch.float32)
    do_sample = torch.tensor([float(p.temperature) > 0 for p in params_list], dtype=torch.bool)
    top_p = torch.tensor([float(p.top_p) for p in params_list], dtype=torch.float32)
    return (
        temperature.to(device),
        top_p.to(device),
        torch.tensor(seeds, dtype=torch.int64).to(device),
        torch.tensor(steps, dtype=torch.int64).to(device),
        do_sample.to(device),
    )
