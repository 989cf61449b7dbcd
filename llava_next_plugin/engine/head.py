"""The LM head of a decode step on a CPU, computed vocabulary-major.

Every decode step multiplies ``hidden [R, h]`` (each row's last hidden state) by the LM head's ``weight
[vocab, h]``; on a CPU it is the largest product of a step, most of a small model's. ``F.linear`` computes it as
``hidden @ weight.T`` (``R`` rows of output, the weight read as its transpose); the same numbers computed the
other way round, ``weight @ hidden.T`` -> ``[vocab, R]`` (a GEMM whose first, long side is the vocabulary),
come out faster from MKL for a few rows. Measured on this project's 2-core machine
(torch 2.14, vocabulary 32064, medians of interleaved runs; the machine is noisy, the direction held in every
run):

=========  ==========  ==========  ==========
hidden     2 rows      4 rows      16 rows
=========  ==========  ==========  ==========
64         1.1-1.2x    1.7x        2.4-3.6x
512        5.6x        4.3x        1.3-1.7x
4096       1.9x        2.5x        1.4-1.6x
=========  ==========  ==========  ==========

(faster than ``F.linear``; at one row both are the same matrix-vector product, and one row keeps ``F.linear``.)
An earlier version kept a copy of the weight in MKL's packed layout (10x the weight at hidden 64, made again
whenever the weight changed); this needs no copy and was as fast or faster than it at every size above but 2 rows
of hidden 64 (4% slower).

The step then reads each row's first maximum along the vocabulary axis (``max(dim=0)``, whose index is the first
occurrence, as ``argmax``), and the logits it hands on are the ``[R, vocab]`` transposed view (sampling makes it
contiguous). Products differ from ``F.linear``'s in the last bits, as any two GEMM kernels do; greedy tokens are
those of ``model.generate`` up to ties (``tests/test_engine_fast_paths.py``).
"""

from __future__ import annotations

import torch

__all__ = ["by_vocab", "first_max_by_vocab", "logits_by_vocab"]


def by_vocab(head: torch.nn.Module, rows: int) -> bool:
    """Whether a decode step of *rows* rows computes *head* vocabulary-major: a plain float32 ``nn.Linear`` on the
    CPU and 2 rows or more (anything else, a LoRA-wrapped or quantized head, runs through its own forward)."""
    if rows < 2 or type(head) is not torch.nn.Linear:
        return False
    weight = head.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def logits_by_vocab(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``weight @ hidden.T (+ bias)`` -> ``[vocab, R]`` for ``hidden [R, h]``: the transpose of ``head(hidden)``."""
    if head.bias is None:
        return torch.mm(head.weight, hidden.t())
    return torch.addmm(head.bias[:, None], head.weight, hidden.t())


def first_max_by_vocab(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's maximum ``[R]`` and the index of its first occurrence ``[R]``, for ``scores [vocab, R]``
    (what :func:`~.sampler.first_max` gives for the ``[R, vocab]`` transpose; a NaN is the maximum, as there)."""
    return scores.max(dim=0)
