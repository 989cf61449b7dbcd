"""The LM head as MKL's packed GEMM on a CPU: the largest matmul of a decode step, made faster.

Every decode step multiplies ``hidden [R, h]`` (each row's last hidden state) by the LM head's ``weight
[vocab, h]``: it reads the whole weight for a few rows, and on a CPU it is most of a small model's step. MKL can
lay the weight out once in its own blocked format (``cblas_sgemm_pack``, torch's
``mkl::_mkl_reorder_linear_weight``; inductor does this for every linear layer when it freezes weights), and its
product with that copy (``mkl::_mkl_linear``) was measured on this project's 2-core machine (torch 2.14), against
``F.linear`` on the same tensors, in the product's own time:

=========  =========  =========  =========  ==========
hidden     1 row      2 rows     4 rows     8-16 rows
=========  =========  =========  =========  ==========
64         1.2x       1.16x      1.8x       1.6-2.1x
512        0.89x      1.00x      1.7x       2.0-2.4x
4096       0.87x      0.87x      1.5x       1.7-1.9x
=========  =========  =========  =========  ==========

So the engine uses it for steps of 2 rows or more (one graph for all of them when compiled), ``F.linear`` for one.
At 2 rows of a large hidden size it is up to 13% slower, on a product that is a small part of such a model's
step; a threshold at 4 rows would cost the compiled step a third graph.

Costs and limits:

* a second copy of the weight in MKL's layout (1.05x the weight at hidden 4096, 1.36x at 512, ~10x at a tiny 64),
  made on first use and logged with its size;
* it is made again whenever the weight changes: another tensor, another address, its version counter moved (an
  in-place write), or one of 64 sampled values differs (a write through ``.data``, which torch does not count);
  a change that touches none of the sampled values (a few weights) is not noticed;
* at that moment the packed product is checked against ``F.linear`` at several row counts
  (:meth:`PackedHead._mismatch`); if the check
  or the packing fails, the head runs as ``F.linear`` from then on (a compiled step then compiles its graph of
  2+ rows once more);
* products differ from ``F.linear``'s in the last bits, as any two GEMM kernels do.

The product is a custom op (``llava_next::packed_linear``) so that the compiled decode step calls it as one
opaque kernel: inductor lowers ``_mkl_linear`` itself only for weights frozen into the graph.
"""

from __future__ import annotations

import logging
import threading
import weakref

import torch

__all__ = ["PackedHead"]

logger = logging.getLogger(__name__)


def _mkl_ops_available() -> bool:
    return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl, "_mkl_linear")


#: The live packed heads by their weight's data pointer: the custom op finds its packed weight here, since an MKL
#: tensor cannot be an input of a compiled graph (inductor's graph cache cannot pickle one, so every start would
#: compile the step again).
_HEADS: dict[int, weakref.ref[PackedHead]] = {}
_HEADS_LOCK = threading.Lock()


@torch.library.custom_op("llava_next::packed_linear", mutates_args=())
def packed_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden [R, h] @ weight.T (+ bias)`` -> ``[R, vocab]``: with *weight*'s packed copy when a live
    :class:`PackedHead` holds one for it (kept current by :meth:`PackedHead.current` before each step), else
    ``F.linear``."""
    ref = _HEADS.get(weight.data_ptr())
    return _product(hidden, weight, bias, ref() if ref is not None else None)


def _product(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, head: PackedHead | None):
    """``hidden @ weight.T (+ bias)`` with *head*'s packed copy when it is of *weight* as it is, else ``F.linear``."""
    if head is None or head.packed is None or head.packed_ptr != weight.data_ptr() or head.shape != tuple(weight.shape):
        return torch.nn.functional.linear(hidden, weight, bias)
    return torch.ops.mkl._mkl_linear(hidden.contiguous(), head.packed, weight, bias, hidden.shape[0])


@packed_linear.register_fake
def _packed_linear_shape(hidden, weight, bias):
    return hidden.new_empty((hidden.shape[0], weight.shape[0]))


class PackedHead:
    """An ``nn.Linear`` LM head's weight packed by MKL, kept in step with the weight; see the module docstring."""

    #: Weights compared at every step to notice a write that torch does not count (through ``.data``)
    SAMPLES = 64

    def __init__(self, linear: torch.nn.Linear, max_rows: int) -> None:
        self.linear = linear
        self.max_rows = max_rows
        self.packed: torch.Tensor | None = None
        self.packed_ptr = 0  # the data pointer of the weight packed
        self.shape: tuple[int, ...] = ()
        # the weight packed (weakly: a replaced weight is not kept alive), its version, and a sample of its values
        self._packed_from: tuple[weakref.ref[torch.Tensor], int] | None = None
        self._where: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sample: torch.Tensor | None = None
        self.usable = True  # False once packing failed or its check did

    @classmethod
    def of(cls, lm_head: torch.nn.Module, max_rows: int) -> PackedHead | None:
        """One for *lm_head* when it can help: a plain float32 ``nn.Linear`` on the CPU, MKL in this torch build,
        steps of 2 rows or more possible; else ``None``."""
        weight = getattr(lm_head, "weight", None)
        if (
            type(lm_head) is not torch.nn.Linear
            or not isinstance(weight, torch.Tensor)
            or weight.device.type != "cpu"
            or weight.dtype != torch.float32
            or max_rows < 2
            or not _mkl_ops_available()
        ):
            return None
        return cls(lm_head, max_rows)

    def current(self) -> bool:
        """Whether the packed weight is usable for the LM head's weight as it is now (packed again first if it
        changed); call it before each forward that would use it."""
        if not self.usable:
            return False
        weight = self.linear.weight
        if self._stale(weight):
            self._pack(weight)
        if self.packed is None:
            return False
        ref = _HEADS.get(self.packed_ptr)
        if ref is None or ref() is not self:  # another engine's head for the same weight took its place, or died
            self._register()
        return True

    def _stale(self, weight: torch.Tensor) -> bool:
        if self._packed_from is None or self._where is None or self._sample is None:
            return True
        packed_weight, version = self._packed_from
        if packed_weight() is not weight or weight._version != version or weight.data_ptr() != self.packed_ptr:
            return True
        if tuple(weight.shape) != self.shape or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return True
        with torch.inference_mode():
            return not torch.equal(weight.detach()[self._where], self._sample)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``logits [R, vocab]`` for ``hidden [R, h]`` (traceable: one opaque op in a compiled graph)."""
        weight, bias = self.linear.weight, self.linear.bias
        if torch.compiler.is_compiling():
            return packed_linear(hidden, weight, bias)
        return _product(hidden, weight, bias, self)  # eagerly, without the custom op's dispatch (~30 us a call)

    def _pack(self, weight: torch.Tensor) -> None:
        self.packed, self.packed_ptr, self._packed_from = None, 0, None
        try:
            if weight.dtype != torch.float32 or weight.device.type != "cpu":
                raise ValueError(f"the weight is now {weight.dtype} on {weight.device}")
            with torch.inference_mode():
                version = weight._version
                packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(), self.max_rows)
                problem = self._mismatch(packed, weight.detach())
                rows, columns = weight.shape
                picks = torch.linspace(0, rows - 1, self.SAMPLES).long()
                self._where = (picks, (picks * 7919) % columns)
                self._sample = weight.detach()[self._where].clone()
        except Exception as exc:  # e.g. a torch build whose MKL ops refuse these shapes: F.linear it is
            problem = repr(exc)
        if problem:
            logger.warning("the LM head is not packed for MKL (%s): it runs as F.linear from now on", problem)
            self.usable = False
            return
        self.packed, self.packed_ptr, self.shape = packed, weight.data_ptr(), tuple(weight.shape)
        self._packed_from = (weakref.ref(weight), version)
        self._register()
        logger.info(
            "LM head packed for MKL's GEMM (CPU, steps of 2+ rows): %.1f MiB",
            packed.numel() * packed.element_size() / (1 << 20),
        )

    def _register(self) -> None:
        with _HEADS_LOCK:  # engines on other threads register theirs
            for ptr in [ptr for ptr, ref in _HEADS.items() if ref() is None]:
                del _HEADS[ptr]
            _HEADS[self.packed_ptr] = weakref.ref(self)

    def _mismatch(self, packed: torch.Tensor, weight: torch.Tensor) -> str | None:
        """Why the packed product cannot be trusted, or ``None``. Torch's ``_mkl_linear`` uses a packed weight
        only at the row count it was packed for, yet MKL's packed layout serves any count: the engine asks for
        each step's own count, which this checks against ``F.linear`` at 2, 3, 5 and 7 rows, each power of two
        and the most rows (a few products, once per packing; every count from 1 to 64 agreed on this machine)."""
        counts, n = {c for c in (2, 3, 5, 7) if c <= self.max_rows} | {self.max_rows}, 4
        while n < self.max_rows:
            counts.add(n)
            n *= 2
        generator = torch.Generator().manual_seed(0)
        for rows in sorted(counts):
            hidden = torch.randn((rows, weight.shape[1]), generator=generator)
            want = torch.nn.functional.linear(hidden, weight, self.linear.bias)
            got = torch.ops.mkl._mkl_linear(hidden, packed, weight, self.linear.bias, rows)
            error = float((got - want).abs().max())
            if not error <= 1e-4 * float(want.abs().max()) + 1e-6:
                return f"its product differs from F.linear's by {error:.3g} at {rows} rows"
        return None
