"""The engine's narrow interface to the model, and the two forwards it runs: a prefill chunk and a decode step.

The model is used only through its public pieces: ``get_input_embeddings()``, ``get_image_features(pixel_values,
image_sizes)``, its language model (``model.model.language_model``, a transformers decoder called with
``inputs_embeds``, ``position_ids``, a 4-D ``attention_mask`` and our :class:`~.kv.SlotView` as its cache) and
``get_output_embeddings()`` (the LM head, applied to the rows' last hidden states only). Ours and
transformers' ``LlavaNextForConditionalGeneration`` both work.

Shapes, for ``R`` rows of ``q`` queries each over the first ``K`` cache columns:

* ``embeds [R, q, hidden]``, ``position_ids [R, q]`` (rotary positions), ``write_index [R, q]`` (cache
  columns written: the position, or the scratch column for padding);
* ``attention_mask [R, 1, q, K]``, additive (0 where query ``i`` of row ``r`` sees column ``j``, i.e.
  ``j <= position_ids[r, i]`` and inside the sliding window if the model has one; a large negative value
  elsewhere); where some layers slide and others do not, one such mask per kind, by name. Every row starts
  at column 0 of its own slot, so there is no left padding anywhere. A chunk whose rows all start at
  position 0 (``K == q``) is plainly causal: the plain decoder then gets no mask and runs SDPA's ``is_causal``.
* ``logits [R, vocab]`` at each row's ``last [R]`` query.
"""

from __future__ import annotations

import logging
import time

import torch

from .._compat import cache_kwarg
from .decoder import HookWatch, PlainDecoder
from .head import by_vocab, first_max_by_vocab, logits_by_vocab
from .kv import KVSlots
from .sampler import first_max

__all__ = ["ModelRunner", "length_bucket"]

logger = logging.getLogger(__name__)

#: What dynamo raises when it cannot compile a step (the recompile limit's class was FailOnCacheLimitHit before).
_COMPILE_FAILURES: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (
        getattr(torch._dynamo.exc, name, None)
        for name in ("TorchDynamoException", "FailOnRecompileLimitHit", "FailOnCacheLimitHit")
    )
    if isinstance(cls, type) and issubclass(cls, BaseException)
)

#: The attention the compiled decode step runs (registered with transformers' ``AttentionInterface``).
SLOT_ATTENTION = "llava_next_slots"


def slot_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' SDPA attention, except that a one-token query of a grouped-query model attends over the
    key/value heads as they are, under ``torch.compile`` too: the query ``[B, heads, 1, D]`` is read as
    ``[B, kv_heads, heads / kv_heads, D]``, so the cache is not repeated per head in every layer of every step
    (transformers does this in eager mode only). Same arithmetic as transformers' eager decode step.

    :returns: ``([B, 1, heads, D], None)``, as transformers' attention functions.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and query.shape[2] == 1:
        batch, heads, _, dim = query.shape
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(batch, heads // groups, groups, dim), key, value, attn_mask=attention_mask, scale=scaling
        )
        return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _graphs_made() -> int:
    """How many graphs dynamo has made in this process (its counters are read anew: tests clear them)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def length_bucket(columns: int, max_len: int) -> int:
    """The smallest of 512, 640, 768, 896, 1024, 1280, 1536, ... (four sizes per doubling: at most a quarter more
    than *columns*) that holds *columns*, capped at *max_len*: the cache lengths CUDA graphs are recorded at."""
    size = 512
    while size < columns:
        size += (1 << (size.bit_length() - 1)) // 4  # a quarter of the power of two at or below size
    return min(size, max_len)


def language_model(model):
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None) or getattr(model, "language_model", None)
    if lm is None:
        raise TypeError(f"{type(model).__name__} has no language_model: the engine needs a LLaVA-NeXT model")
    return lm


class ModelRunner:
    """Runs forwards over a :class:`KVSlots`; owns the compiled decode step when compiling.

    Compiling (``torch.compile``, inductor, ``fullgraph=True``; CUDA graphs on CUDA) applies to the decode step
    only: two graphs (one row; any rows ``[0, R)`` from 2), dynamic in the row count and the context length (the
    columns read), so joins, leaves and growing contexts reuse them.
    """

    def __init__(self, model, kv: KVSlots, *, image_token_id: int, compile: bool = False) -> None:
        self.model = model
        self.kv = kv
        self.embed_tokens = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.language_model = language_model(model)
        self.cache_arg = cache_kwarg(self.language_model.forward)
        #: The decoder forward written out (a Llama-family backbone), else ``None``: transformers' forward runs.
        self.decoder = PlainDecoder.of(self.language_model)
        #: Whether a forward hook is set on the language model, its LM head or every module: the forward then runs
        #: through the modules, eagerly (a compiled step traced without a hook would not run one set later, and
        #: one traced with a hook recompiles whenever the hook's state changes).
        self.hooked = HookWatch([*self.language_model.modules(), *self.lm_head.modules()])
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        window = getattr(text_config, "sliding_window", None)
        if getattr(text_config, "use_sliding_window", True) is False:
            window = None
        self.sliding_window = int(window) if window else None
        #: Each layer's attention kind where they differ (a Qwen2 backbone with ``max_window_layers`` below its
        #: depth: full attention below, the sliding window above); then :meth:`mask` gives one mask per kind. Read
        #: from the built attention modules, as the decoder's own forward reads it: a config may carry
        #: ``layer_types`` that its model ignores (Mistral's keeps the key and slides every layer).
        self.layer_types: list[str] | None = None
        layers = getattr(self.language_model, "layers", None) or []
        found = [getattr(getattr(layer, "self_attn", None), "layer_type", None) for layer in layers]
        kinds = [str(kind) for kind in found if kind is not None]
        if self.sliding_window is not None and kinds and len(kinds) == len(layers):
            if "sliding_attention" not in kinds:
                self.sliding_window = None  # every layer attends in full
            elif any(kind != "sliding_attention" for kind in kinds):
                self.layer_types = kinds
        self.image_token_id = image_token_id
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._decode_forward = self._decode_run
        #: The compiled step's graphs made, by what each is specialised on: (several rows, plain, head by vocab)
        self._compiled_kinds: set[tuple[bool, bool, bool]] = set()
        self.compiled = False
        #: Why the compiled step was given up for the eager one (its error), or ``None``
        self.compile_failure: str | None = None
        #: Whether the compiled step runs as CUDA graphs (its output is overwritten by the next replay; each
        #: shape is a graph of its own, so :meth:`row_bucket` and :meth:`kv_bucket` round rows and lengths)
        self.graphs = False
        self.warmup_seconds = 0.0
        if compile:
            mode = None
            if self.device.type == "cuda":
                mode = "reduce-overhead"  # CUDA graphs: the slots must keep their addresses
                self.graphs = True
                for tensor in kv.keys + kv.values:
                    # guarded: another engine's slots (other addresses) get graphs of their own, rather than make
                    # this one's graph trees record again whenever the engines take turns. (Each engine's graphs
                    # count towards dynamo's recompile limit of this one function, 8: past it, about the fifth
                    # engine of a process decodes eagerly, with a warning.)
                    torch._dynamo.mark_static_address(tensor, guard=True)
            attention = getattr(self.language_model.config, "_attn_implementation", None)
            if self.decoder is None and attention == "sdpa":  # the plain decoder packs grouped queries itself
                from transformers import AttentionInterface

                AttentionInterface.register(SLOT_ATTENTION, slot_attention)
                self.language_model.set_attn_implementation(SLOT_ATTENTION)
            # two graphs (decode() marks rows and columns dynamic); no graph break allowed
            self._decode_forward = torch.compile(self._decode_run, dynamic=False, fullgraph=True, mode=mode)
            self.compiled = True

    # --- embeddings
    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """One ``[n_tokens_i, hidden]`` tensor per image, for ``pixel_values [N, tiles, 3, h, w]`` (tiles padded
        to the most of any image; each image's size says how many are its own) and ``image_sizes [N, 2]``."""
        out = self.model.get_image_features(pixel_values.to(self.device, self.dtype), image_sizes.to(self.device))
        features = getattr(out, "pooler_output", out)
        if isinstance(features, (list, tuple)):  # ours: one tensor per image
            return list(features)
        # transformers' model packs every image into one [total, hidden]: split it by each image's token count
        return list(torch.split(features, [self.image_tokens(h, w) for h, w in image_sizes.tolist()]))

    @torch.inference_mode()
    def base_view_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, n_tokens, hidden]``: the features of images' base views alone (``pixel_values [N, 3, h, w]``):
        the vision tower's selected layer(s), the CLS token dropped for the ``default`` strategy, projected.
        This is OpenAI's ``detail: "low"`` (576 tokens at llava-v1.6's 336 px tiles)."""
        inner = getattr(self.model, "model", self.model)
        config = self.model.config
        out = inner.vision_tower(pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        layer = config.vision_feature_layer
        hidden = (
            out.hidden_states[layer]
            if isinstance(layer, int)
            else torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        )
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return inner.multi_modal_projector(hidden)

    def _geometry(self) -> tuple[list, int, int, str, int]:
        """The model's anyres settings as geometry.py takes them: pinpoints, tile size, patch size, feature
        strategy, positions the tower emits before its patches."""
        from ..configuration import tower_extra_positions

        config = self.model.config
        vision = config.vision_config
        return (
            config.image_grid_pinpoints,
            int(vision.image_size),
            int(vision.patch_size),
            config.vision_feature_select_strategy,
            tower_extra_positions(vision),
        )

    def image_tokens(self, height: int, width: int) -> int:
        """Tokens (and features) of one ``height x width`` image at full detail, from geometry.py."""
        from .. import geometry

        return geometry.num_image_tokens(height, width, *self._geometry())

    def base_view_tokens(self) -> int:
        """Tokens of one base view (what :meth:`base_view_features` returns per image)."""
        from .. import geometry

        _, tile, patch, strategy, extra = self._geometry()
        return geometry.base_token_count(tile, patch, strategy, extra)

    @torch.inference_mode()
    def prompt_embeddings(self, input_ids: torch.Tensor, image_features: list[torch.Tensor]) -> torch.Tensor:
        """``[L, hidden]``: the prompt's token embeddings with its images' features at the ``<image>`` tokens."""
        ids = input_ids.reshape(-1).to(self.device)
        embeds = self.embed_tokens(ids)
        if image_features:
            features = torch.cat(image_features).to(embeds.dtype)
            where = ids == self.image_token_id
            if int(where.sum()) != features.shape[0]:
                raise ValueError(
                    f"the prompt has {int(where.sum())} <image> tokens but its images give "
                    f"{features.shape[0]} features (image_sizes do not match the pixels)"
                )
            embeds = embeds.masked_scatter(where[:, None], features)
        return embeds

    # --- forwards
    def mask(self, position_ids: torch.Tensor, columns: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """``[R, 1, q, K]`` additive mask over ``columns [K]`` (``0 .. K-1``): each query sees its own row's columns
        up to its position (and within the sliding window, if the model has one). Where layers differ
        (:attr:`layer_types`), one mask per kind, by the names transformers' decoders take a mapping of."""
        visible = columns[None, None, :] <= position_ids[:, :, None]
        zero = torch.zeros((), dtype=self.dtype, device=position_ids.device)
        blocked = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=position_ids.device)
        if self.sliding_window is None:
            return torch.where(visible, zero, blocked)[:, None]
        in_window = visible & (columns[None, None, :] > position_ids[:, :, None] - self.sliding_window)
        if self.layer_types is None:
            return torch.where(in_window, zero, blocked)[:, None]
        return {
            "full_attention": torch.where(visible, zero, blocked)[:, None],
            "sliding_attention": torch.where(in_window, zero, blocked)[:, None],
        }

    def _plain(self, hooked: bool | None = None) -> bool:
        """Whether this forward runs the :class:`PlainDecoder` (a backbone it knows, no hook set; *hooked*: what
        :attr:`hooked` said already)."""
        return self.decoder is not None and not (self.hooked() if hooked is None else hooked)

    def _by_vocab(self, rows: int, plain: bool) -> bool:
        """Whether a decode step of *rows* rows computes the LM head vocabulary-major (head.py; else through the
        module)."""
        return plain and by_vocab(self.lm_head, rows)

    def _hidden(self, embeds, position_ids, write_index, last, rows, columns, plain, causal=False):
        """``[R, hidden]``: each row's final hidden state at its ``last`` query (``None``: its only one)."""
        if rows is None:  # the compiled decode step: slots [0, R)
            rows = slice(0, embeds.shape[0])
        cache = self.kv.view(rows, write_index, columns.shape[0])
        if plain and self.decoder is not None:
            # causal: every row's queries are its positions 0..q-1 over columns 0..q-1, which SDPA's is_causal says
            # without a mask (and, skipping the blocks above the diagonal, in half the time on a long prompt)
            mask = None if causal else self.mask(position_ids, columns)
            hidden = self.decoder(embeds, position_ids, mask, cache, self.layer_types)
        else:
            hidden = self.language_model(
                inputs_embeds=embeds,
                position_ids=position_ids,
                attention_mask=self.mask(position_ids, columns),
                use_cache=True,
                **{self.cache_arg: cache},
            ).last_hidden_state
        if last is None:  # a decode step: each row's one query
            return hidden[:, -1]
        return hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]

    def _decode_run(self, tokens, position_ids, write_index, rows, columns, plain, vocab_major):
        embeds = self.embed_tokens(tokens)  # in the compiled graph: one op fewer to launch per step
        hidden = self._hidden(embeds, position_ids, write_index, None, rows, columns, plain)
        if vocab_major:  # [vocab, R], its columns' first maxima, and the [R, vocab] view of it
            scores = logits_by_vocab(self.lm_head, hidden)
            top, index = first_max_by_vocab(scores)
            logits = scores.t()
        else:
            logits = self.lm_head(hidden).float()
            top, index = first_max(logits)
        # the greedy tokens and whether each row is usable, in one tensor: one transfer for all rows
        return logits, top, index, torch.stack([index, torch.isfinite(top).long()])

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        write_index: torch.Tensor,
        last: torch.Tensor,
        rows: slice | torch.Tensor,
        kv_len: int,
        *,
        fresh: bool = False,
    ) -> torch.Tensor:
        """Run ``R`` rows (see the module docstring); ``logits [R, vocab]`` (float32) at ``last``. Eager (prefill
        chunks have too many shapes to compile). *fresh*: every row starts at position 0 (``kv_len == q``), so
        the attention is plainly causal: no mask is built (unless a sliding window is shorter than the chunk)."""
        columns = torch.arange(kv_len, device=self.device)
        causal = fresh and (self.sliding_window is None or kv_len <= self.sliding_window)
        plain = self._plain()
        return self.lm_head(self._hidden(embeds, position_ids, write_index, last, rows, columns, plain, causal)).float()

    @torch.inference_mode()
    def decode(
        self, tokens: torch.Tensor, position_ids: torch.Tensor, write_index: torch.Tensor, rows: slice, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token for the slot rows *rows*: ``tokens [R]`` -> ``logits [R, vocab]`` (on a CPU, for 2+ rows, the
        transposed view of the head computed vocabulary-major: head.py), with each row's first maximum (``top [R]``,
        ``index [R]``, as :func:`~.sampler.first_max`) and ``greedy [2, R]`` (``index`` and whether ``top`` is finite,
        as :func:`~.sampler.greedy` gives them), computed in the same (compiled) step."""
        tokens, position_ids, write_index = tokens[:, None], position_ids[:, None], write_index[:, None]
        columns = torch.arange(kv_len, device=self.device)
        hooked = self.hooked()
        plain = self._plain(hooked)
        vocab_major = self._by_vocab(tokens.shape[0], plain)
        if not self.compiled or hooked:  # a hooked model runs eagerly: its hooks' Python runs at every step
            return self._decode_run(tokens, position_ids, write_index, rows, columns, plain, vocab_major)
        # Two graphs normally (one per kind below): one row, and any rows from 2 (slots [0, R)), dynamic in the
        # context length too, so neither joins and leaves nor growing contexts compile again. (CUDA graphs still
        # record one graph per shape: row_bucket and kv_bucket round both to a few.)
        if rows.start != 0:
            raise ValueError("the compiled decode step runs slot rows [0, R)")
        kind = (tokens.shape[0] > 1, plain, vocab_major)  # what its graph is specialised on
        if kind not in self._compiled_kinds:
            # this call compiles a graph: these dimensions are dynamic. (Marked only then: a graph compiled dynamic
            # takes unmarked tensors, and dynamo's guards check marked ones at every call, ~25 us a step on a CPU.)
            torch._dynamo.mark_dynamic(columns, 0, min=2, max=self.kv.max_len)
            if kind[0]:
                for tensor in (tokens, position_ids, write_index):
                    torch._dynamo.mark_dynamic(tensor, 0, min=2, max=self.kv.slots)
        graphs = _graphs_made()
        try:
            out = self._decode_forward(tokens, position_ids, write_index, None, columns, plain, vocab_major)
            if kind in self._compiled_kinds and _graphs_made() != graphs:
                # a graph was made for a kind that had one: something outside the kind changed (dynamo's global
                # state, a reset, the parameters' dtype); that one was compiled unmarked, so mark the next calls
                # again (a graph made elsewhere in the process costs one marked call, nothing more)
                self._compiled_kinds.clear()
            else:
                self._compiled_kinds.add(kind)
        except _COMPILE_FAILURES as exc:
            # dynamo could not (re)compile the step, e.g. past its recompile limit, shared by every engine of the
            # process (one code object): run eagerly from now on rather than fail every request
            self._give_up_compiling(f"it failed to compile ({exc})")
            return self._decode_run(tokens, position_ids, write_index, None, columns, plain, vocab_major)
        except torch.OutOfMemoryError:
            # e.g. recording a CUDA graph for a new length bucket, in a pool the KV slots left short: this step
            # eagerly, and compiled steps again after it (its OOM, if it has one too, is the batch's to handle)
            logger.warning("the compiled decode step ran out of memory: this step runs eagerly")
            return self._decode_run(tokens, position_ids, write_index, None, columns, plain, vocab_major)
        except Exception as exc:
            # anything else (a CUDA graph that cannot be recorded, a kernel inductor generated): the same step
            # eagerly. If that works, the compiled step was at fault: eager from now on; if it fails too, its error
            # is the step's (the batch then finds the request at fault) and the compiled step stays
            out = self._decode_run(tokens, position_ids, write_index, None, columns, plain, vocab_major)
            self._give_up_compiling(f"it raised {exc!r} where the eager step did not")
            return out
        return tuple(t.clone() for t in out) if self.graphs else out  # CUDA graphs reuse their output buffers

    def _give_up_compiling(self, reason: str) -> None:
        logger.warning("the compiled decode step is given up: %s; decoding eagerly from now on", reason)
        self._decode_forward = self._decode_run
        self.compiled = self.graphs = False
        self.compile_failure = reason

    # --- shapes of the decode step
    def buckets(self) -> list[int]:
        """Row counts the decode step is warmed up at: powers of two below the slot count, and the slot count."""
        sizes, size = [], 1
        while size < self.kv.slots:
            sizes.append(size)
            size *= 2
        return sizes + [self.kv.slots]

    def row_bucket(self, rows: int) -> int:
        """Rows a decode step runs: exact, except under CUDA graphs (one graph per row count): a bucket."""
        if not self.graphs:
            return rows
        return next(b for b in self.buckets() if b >= rows)

    def kv_bucket(self, columns: int) -> int:
        """Cache columns a step attends over: exact, except under CUDA graphs, which record one graph per length:
        there a :func:`length_bucket`. The compiled step's graph takes any length (it is dynamic in it): contexts
        that grow never recompile it."""
        return length_bucket(columns, self.kv.max_len) if self.graphs else columns

    @torch.inference_mode()  # the engine builds its inputs under inference mode too (dynamo guards on it)
    def warm_up(self, context: int = 1) -> float:
        """Run the decode step once per row bucket at a context of *context* tokens (compiles when compiling), and
        under CUDA graphs twice per row bucket at every length bucket up to that context's (records them); the
        seconds it took. Run it on the thread that runs the steps: CUDA graphs belong to the thread that records
        them (:meth:`.scheduler.Engine.warm_up` does)."""
        start = time.monotonic()
        lengths = [max(self.kv_bucket(context), 2)]
        if self.graphs:  # every length bucket up to the context's, each called twice: CUDA graph trees run a new
            # shape once eagerly (their warm-up) and record it at its second call
            lengths, size = [], 0
            while size < self.kv_bucket(context):
                size = self.kv_bucket(size + 1)
                lengths.append(size)
            lengths *= 2
        compiled = self.compiled
        for kv_len in lengths:
            if compiled and not self.compiled:
                break  # compiling was given up on the way: eager steps need no more warming
            for rows in self.buckets():
                inputs = torch.zeros((3, rows), dtype=torch.long)  # as the engine builds them: token, position, column
                inputs[2] = self.kv.scratch
                inputs = inputs.to(self.device)
                self.decode(inputs[0], inputs[1], inputs[2], slice(0, rows), kv_len)
        self.warmup_seconds = time.monotonic() - start
        return self.warmup_seconds
