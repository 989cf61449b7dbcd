"""The serving engine: continuous batching over static KV slots, on its own thread, for every front.

The HTTP server and the SDK's local transport both use only what this package exports: :class:`Engine`
(``prepare`` / ``submit`` / ``check_admission`` / ``generate``, ``start`` / ``shutdown``, ``accepting``, ``stopped``,
``queue_depth``, ``batch_size``, ``stats_snapshot()``), :class:`RequestHandle`, :class:`EngineResult`,
:class:`SamplingParams`, :class:`PreparedRequest`, :func:`get_shared_engine` and :func:`default_device`.

Data flow (a module for each idea)::

    caller's thread                          engine thread (scheduler.Engine._serve: queue, slots, the loop)
    ---------------                          -----------------------------------------------------------
    Engine.prepare ──► PreparedRequest ──► queue ──► a free KV slot (kv.KVSlots) ──► the batch (batch.Batch):
      (prepare.Preparer: prompt, own           │   join: prompt embeddings [L, hidden] (step.ModelRunner);
      processor copy per thread, context       │         vision features reused by image hash, the longest
      checks, images hashed)                   │         cached prefix copied into the slot (reuse.py)
    Engine.submit ──► RequestHandle            ├──► prefill chunk (<= prefill_chunk tokens, join order)
      (handle.py: iterate from threads,        │       embeds [R, q, hidden] -> logits [R, vocab] at each row's last
       asyncio or trio; cancel anywhere)       │       (decoder.PlainDecoder: a Llama-family forward written out)
                                               ├──► decode step: tokens [n] for slot rows [0, n) -> logits [n, vocab]
                                               │       and the greedy picks [2, n] (on a CPU, 2+ rows: the LM head
                                               │       computed vocabulary-major, head.py)
                                               ├──► sampler.sample on the device -> tokens [n] (one transfer)
                                               └──► detokenizer.TextStream: text deltas, stop strings -> handle
                                                       (most tokens append their known text: PieceTable)

Tensor shapes: KV slots ``[layers] x [slots, kv_heads, max_len + 1, head_dim]`` (column ``max_len`` is
scratch for padding rows); attention masks ``[R, 1, q, K]`` additive (none for a chunk of new prompts: causal
SDPA); per-row ``position_ids`` and
``write_index [R, q]``; every request's tokens start at column 0 of its slot (no left padding).

An idle engine that a request wakes waits ``burst_window`` (1 ms) for others arriving with it, so that a burst
starts in one vision call and one prefill forward.

On CPU the engine thread's OpenMP workers should be the only ones alive: the threads that start the engine or
prepare requests let theirs go (openmp.py), else libgomp puts every worker to sleep between ops; the engine
thread lets its own go when its batch empties.
"""

from .handle import RequestHandle
from .request import EngineResult, PreparedRequest, SamplingParams
from .scheduler import Engine, default_device
from .shared import get_shared_engine

__all__ = [
    "Engine",
    "SamplingParams",
    "PreparedRequest",
    "RequestHandle",
    "EngineResult",
    "get_shared_engine",
    "default_device",
]
