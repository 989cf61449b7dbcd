"""The batch: the requests that hold a KV slot, and the steps that advance them. Used by the engine thread (and,
once it has stopped or is stuck, by shutdown, which empties it with :meth:`Batch.take_all`).

A request in the batch (:class:`Running`) goes through:

1. **join** (:meth:`Batch.join`): its ``before_generate`` hook; its prompt embeddings ``[L, hidden]``, with its
   images' vision features reused by content hash or computed for all joiners in one tower call; the longest
   cached prefix of its prompt copied into its slot;
2. **prefill** (:meth:`Batch.prefill_step`), a chunk per engine step: at most ``prefill_chunk`` prompt tokens
   of the prefilling requests in join order, ``[R, q, hidden]`` in one forward (``idle_prefill`` tokens while
   nothing decodes: no stream can stall then, and fewer, larger forwards are faster); a request whose prompt
   is done samples its first token and offers its prompt's KV for reuse;
3. **decode** (:meth:`Batch.decode_step`): every decoding request's last token, rows ``[0, n)`` of the slots,
   ``tokens [n] -> logits [n, vocab]``; sampled on the device, one transfer to the host for all rows;
4. **stream and leave**: each token's text goes to the request's handle; a stop string, ``eos``, ``max_tokens``
   or the context's end finishes the request, which leaves: its slot is freed and its ending recorded.

A step that raises is re-run row by row (each row writes only its own slot, so re-running is harmless): the
row that fails alone ends its own request with a typed error; the others carry on.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from llava_next_sdk.errors import RequestCancelledError, ServerError

from .detokenizer import PieceTable, TextStream
from .handle import RequestHandle
from .kv import KVSlots
from .request import Image, generation_error
from .reuse import FeatureCache, PrefixStore, prefix_key, weights_version
from .sampler import greedy, row_params, sample
from .step import ModelRunner

__all__ = ["Batch", "Running"]

logger = logging.getLogger("llava_next_plugin.engine")


@dataclass
class Running:
    """A request that holds a KV slot (prefilling or decoding)."""

    handle: RequestHandle
    slot: int
    text: TextStream
    seed: int
    prompt_len: int
    started_at: float
    images: list[Image] = field(default_factory=list)
    embeds: torch.Tensor | None = None  # [L, hidden] until the prompt is prefilled
    prefix_key: tuple | None = None
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    finish_reason: str | None = None
    failed: bool = False  # it left with an error (its prompt is not kept for reuse, its slot is cleared)

    @property
    def decoding(self) -> bool:
        return bool(self.generated) and self.finish_reason is None

    @property
    def position(self) -> int:
        """The position of the last generated token (the one the next decode step feeds)."""
        return self.prompt_len + len(self.generated) - 1


_Piece = tuple[Running, torch.Tensor, int]  # a prefilling request, its prompt embeddings [L, hidden], tokens now
_Sampling = tuple[tuple[torch.Tensor, ...], "list[int] | torch.Tensor"]  # row_params, the top-p rows


class Firsts(NamedTuple):
    """What a decode step computed for its rows beside the logits: :func:`~.sampler.first_max`'s ``top [n]`` and
    ``argmax [n]``, and ``greedy [2, n]``: the greedy tokens and whether each row is usable (as int64)."""

    top: torch.Tensor
    argmax: torch.Tensor
    greedy: torch.Tensor

    def row(self, row: int) -> Firsts:
        return Firsts(self.top[row : row + 1], self.argmax[row : row + 1], self.greedy[:, row : row + 1])


class Batch:
    """The requests in KV slots (by slot, in join order) and the steps that advance them.

    :param runner: runs the forwards.
    :param kv: the slots; a leaving request's slot is released under *slot_lock* (the scheduler hands free
        slots out under it).
    :param detokenizer: the tokenizer the engine thread decodes with (its own copy).
    :param model_name: the name ``before_generate`` hooks are told.
    :param eos_token_ids: tokens that end a request.
    :param max_context: prompt + completion tokens at most.
    :param prefill_chunk: prompt tokens per step at most while requests decode.
    :param idle_prefill: prompt tokens per step at most while none decodes.
    :param prefixes: prompt prefixes' KV to reuse, or ``None``.
    :param features: images' vision features to reuse, or ``None``.
    :param count: adds to one of the engine's counters.
    :param call_hook: calls a plugin hook by name (an observer's failure is logged, never raised).
    :param record_end: records a request's ending (counters, ``after_generate``, its handle): called once for
        each request that leaves.
    """

    def __init__(
        self,
        runner: ModelRunner,
        kv: KVSlots,
        *,
        detokenizer,
        model_name: str,
        eos_token_ids: set[int],
        max_context: int,
        prefill_chunk: int,
        idle_prefill: int,
        prefixes: PrefixStore | None,
        features: FeatureCache | None,
        slot_lock: threading.Condition,
        count: Callable[..., None],
        call_hook: Callable[..., None],
        record_end: Callable[[RequestHandle, Running | None, BaseException | None], None],
    ) -> None:
        self.runner = runner
        self.kv = kv
        self.detokenizer = detokenizer
        self.pieces = PieceTable(detokenizer)  # shared by the streams: each token's text, found once
        self.model_name = model_name
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.idle_prefill = idle_prefill
        self.prefixes = prefixes
        self.features = features
        self.slot_lock = slot_lock
        self.count = count
        self.call_hook = call_hook
        self.record_end = record_end
        self.device = runner.device
        self.dtype = runner.dtype
        self.running: dict[int, Running] = {}  # by slot, in join order
        self._weights_version: int | None = None  # the model's weights the reuse caches were filled with
        self.forget_reuse = False  # set by Engine.clear_reuse (any thread): emptied before the next join

    def __len__(self) -> int:
        return len(self.running)

    # --- joins
    def join(self, joiners: list[tuple[RequestHandle, int]]) -> None:
        """Give each joiner its slot: hooks, its images' vision features (the ones not cached yet computed for
        all joiners together), prompt embeddings, a reused prefix. A failure ends its request alone."""
        self._forget_reuse_of_other_weights()
        admitted = [running for running in (self._admit(handle, slot) for handle, slot in joiners) if running]
        computed = self._vision_features(admitted) if len(admitted) > 1 else {}
        for running in admitted:
            prepared = running.handle.prepared
            try:
                features = self._image_features(running.images, computed)
                running.embeds = self.runner.prompt_embeddings(prepared.input_ids, features)
                if self.prefixes is not None:
                    images = [(key, int(f.shape[0])) for (key, *_), f in zip(running.images, features, strict=True)]
                    running.prefix_key = prefix_key(prepared.input_ids, images, self.runner.image_token_id)
                    found = self.prefixes.longest(running.prefix_key[:-1])  # at least one token left to prefill
                    if found is not None:
                        n, keys, values = found
                        self.kv.copy_in(running.slot, keys, values)
                        running.prefilled = n
                        self.count("prefix_reused_tokens", n)
            except Exception as exc:
                logger.exception("preparing the prefill of request %s failed", running.handle.id)
                self.leave(running, generation_error(exc))

    def _forget_reuse_of_other_weights(self) -> None:
        """Empty the vision features and prompt prefixes kept for reuse when the model's weights have changed since
        they were computed (trained, reloaded, an adapter loaded while the engine runs): reuse never changes results."""
        if self.features is None and self.prefixes is None:
            return
        version = weights_version(self.runner.model)
        changed = self._weights_version is not None and version != self._weights_version
        if changed or self.forget_reuse:
            self.forget_reuse = False
            for cache in (self.features, self.prefixes):
                if cache is not None:
                    cache.clear()
            self.count("reuse_cleared")
            if changed:
                logger.info("the model's weights changed: reused vision features and prompt prefixes are dropped")
        self._weights_version = version

    def _admit(self, handle: RequestHandle, slot: int) -> Running | None:
        """*handle* in its slot, its ``before_generate`` hook called and its images listed; ``None`` if it
        was cancelled or its images could not be read (it has ended then), or had ended already (a shutdown's
        timeout ends requests on their way to a slot: no hook runs for them after their end)."""
        if handle.done:
            self._release(slot)
            return None
        prepared = handle.prepared
        params = prepared.params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        running = Running(
            handle=handle,
            slot=slot,
            text=TextStream(self.detokenizer, params.stop, self.pieces),
            seed=seed - (1 << 64) if seed >= 1 << 63 else seed,  # 64 bits, as the sampler's int64 holds them
            prompt_len=prepared.prompt_tokens,
            started_at=time.monotonic(),
        )
        self.running[slot] = running
        if handle.cancelled:
            self.leave(running, RequestCancelledError(f"request {handle.id} was cancelled"))
            return None
        if not handle.started:
            handle.started = True
            self.call_hook(
                "llava_next_before_generate",
                request_id=handle.id,
                request={
                    "model": self.model_name,
                    "num_images": prepared.num_images,
                    "prompt_tokens": prepared.prompt_tokens,
                    "image_tokens": prepared.image_tokens,
                    "max_tokens": prepared.max_tokens,
                    "temperature": params.temperature,
                    "top_p": params.top_p,
                    "seed": params.seed,
                },
            )
        try:
            running.images = prepared.images
        except Exception as exc:
            logger.exception("reading the images of request %s failed", handle.id)
            self.leave(running, generation_error(exc))
            return None
        return running

    def _vision_features(self, joined: list[Running]) -> dict[bytes, torch.Tensor]:
        """Vision features of the joiners' images that are not cached, by key: the full-detail images in one
        batched tower call (their tiles padded to the most of any; the sizes say which are real), the
        low-detail base views in another. If a batched call fails, its images are left out: each request then
        runs its own alone in :meth:`_image_features`, so a bad image fails its own request only."""
        full: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        low: dict[bytes, torch.Tensor] = {}
        for running in joined:
            for key, pixels, size, is_low in running.images:
                if self.features is not None and self.features.get(key) is not None:
                    continue
                if is_low:
                    low[key] = pixels
                else:
                    full[key] = (pixels, size)
        computed: dict[bytes, torch.Tensor] = {}
        if len(full) > 1:
            try:  # the padding too: tiles of another size (a request prepared for another model) fail here
                tiles = max(pixels.shape[1] for pixels, _ in full.values())
                first = next(iter(full.values()))[0]
                # [N, tiles, 3, h, w], zero tiles after each image's own (a copy each: F.pad of 5-D tensors is slow)
                pixel_values = first.new_zeros((len(full), tiles, *first.shape[2:]))
                for row, (pixels, _) in enumerate(full.values()):
                    pixel_values[row, : pixels.shape[1]] = pixels[0]
                features = self.runner.image_features(pixel_values, torch.cat([size for _, size in full.values()]))
                computed.update(zip(full, features, strict=True))
                self.count("images_batched", len(full))
            except Exception:
                logger.warning("a vision call for %d images failed: each request runs its own", len(full))
        if len(low) > 1:
            try:
                computed.update(zip(low, self.runner.base_view_features(torch.cat(list(low.values()))), strict=True))
                self.count("images_batched", len(low))
            except Exception:
                logger.warning("a base-view call for %d images failed: each request runs its own", len(low))
        return computed

    def _image_features(self, images: list[Image], computed: dict[bytes, torch.Tensor]) -> list[torch.Tensor]:
        """``[n_tokens_i, hidden]`` per image: cached, *computed* for this step, or run now."""
        features = []
        for key, pixels, size, low in images:
            found = self.features.get(key) if self.features is not None else None
            if found is not None:
                self.count("image_features_reused")
            else:
                found = computed.get(key)
                if found is None:
                    found = (
                        self.runner.base_view_features(pixels) if low else self.runner.image_features(pixels, size)
                    )[0]
                if self.features is not None:
                    self.features.put(key, found)
            features.append(found)
        return features

    def leave_cancelled(self) -> None:
        """End the running requests whose callers cancelled them."""
        for running in [r for r in self.running.values() if r.handle.cancelled]:
            self.leave(running, RequestCancelledError(f"request {running.handle.id} was cancelled"))

    # --- prefill
    def prefill_step(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens of the prefilling requests (``idle_prefill`` if none is
        decoding), in join order, in one forward."""
        pieces: list[_Piece] = []
        budget = self.prefill_chunk if any(r.decoding for r in self.running.values()) else self.idle_prefill
        for running in self.running.values():
            if running.embeds is None or running.finish_reason or budget == 0:
                continue
            n = min(running.prompt_len - running.prefilled, budget)
            pieces.append((running, running.embeds, n))
            budget -= n
        if not pieces:
            return
        self.count("prefill_chunks")
        try:
            outcomes = [self._prefill(pieces)]
        except Exception as exc:  # the forward failed (nothing has advanced): find the culprit
            if isinstance(exc, torch.OutOfMemoryError):
                # smaller chunks need less memory for activations: carry on with them
                limit = max(16, sum(n for _, _, n in pieces) // 2)
                self.prefill_chunk, self.idle_prefill = min(self.prefill_chunk, limit), min(self.idle_prefill, limit)
                logger.warning("out of memory in a prefill chunk: chunks are now %d tokens at most", limit)
            if len(pieces) == 1:
                self._fail(pieces[0][0], exc)
                return
            outcomes = []
            for piece in pieces:  # each row writes only its own slot: re-running one alone is harmless
                try:
                    outcomes.append(self._prefill([piece]))
                except Exception as exc_alone:
                    self._fail(piece[0], exc_alone)
        for finished, logits, sampling in outcomes:
            for running in finished:
                running.embeds = None
            self._sample_and_advance(finished, logits, sampling)
            for running in finished:  # only prompts whose logits came out finite (a NaN prefix would be reused)
                if not running.failed:  # (a slot that has just been released is not handed out before the next join)
                    self._keep_prefix(running)

    def _keep_prefix(self, running: Running) -> None:
        """Offer a prefilled prompt's KV to the prefix store (best effort: a failure to copy it is logged)."""
        if self.prefixes is None or running.prefix_key is None:
            return
        if not self.prefixes.would_keep(running.prompt_len, self.kv.bytes_per_token * running.prompt_len):
            return
        try:
            self.prefixes.put(running.prefix_key, *self.kv.copy_out(running.slot, running.prompt_len))
        except Exception:  # e.g. out of memory for the copy: the request itself is fine
            logger.warning("request %s's prompt could not be kept for reuse", running.handle.id, exc_info=True)

    @torch.inference_mode()
    def _prefill(self, pieces: list[_Piece]) -> tuple[list[Running], torch.Tensor, _Sampling | None]:
        """One forward over *pieces*; each piece's ``prefilled`` advances. The requests whose prompts it completed,
        their rows of logits and sampling inputs (:meth:`_sample_and_advance`'s arguments)."""
        pieces = sorted(pieces, key=lambda piece: piece[0].slot)  # neighbouring slots are one slice of the cache
        width = max(n for _, _, n in pieces)
        hidden = pieces[0][1].shape[-1]
        embeds = torch.zeros((len(pieces), width, hidden), dtype=self.dtype, device=self.device)
        positions = torch.zeros((len(pieces), width), dtype=torch.long)
        write = torch.full((len(pieces), width), self.kv.scratch, dtype=torch.long)
        for row, (running, prompt, n) in enumerate(pieces):
            start = running.prefilled
            embeds[row, :n] = prompt[start : start + n]
            positions[row, :n] = torch.arange(start, start + n)
            write[row, :n] = positions[row, :n]
        last = torch.tensor([n - 1 for _, _, n in pieces])
        kv_len = max(r.prefilled + n for r, _, n in pieces)
        slots = [r.slot for r, _, _ in pieces]
        contiguous = slots[-1] - slots[0] + 1 == len(slots)  # then attention reads the slots, copying none
        rows = slice(slots[0], slots[-1] + 1) if contiguous else torch.tensor(slots, device=self.device)
        fresh = all(running.prefilled == 0 for running, _, _ in pieces)  # then kv_len == width: plainly causal
        # the rows whose prompts this forward completes, and their sampling inputs, before it is launched
        done = [row for row, (running, _, n) in enumerate(pieces) if running.prefilled + n == running.prompt_len]
        finished = [pieces[row][0] for row in done]
        sampling = self._sampling_inputs(finished)
        index = torch.tensor(done).to(self.device) if done else None
        logits = self.runner.forward(
            embeds, positions.to(self.device), write.to(self.device), last.to(self.device), rows, kv_len, fresh=fresh
        )
        for running, _, n in pieces:
            running.prefilled += n
        return finished, (logits if index is None else logits.index_select(0, index)), sampling

    # --- decode
    def decode_step(self) -> None:
        """One token for every decoding request, in one forward."""
        decoding = [r for r in self.running.values() if r.decoding]
        if not decoding:
            return
        if len(decoding) > 1:
            self.count("batched_steps")
        try:
            outcomes = [self._decode(decoding)]
        except Exception as exc:  # the forward failed (nothing has advanced): find the culprit
            if len(decoding) == 1:
                self._fail(decoding[0], exc)
                return
            outcomes = []
            for running in decoding:  # each row alone (it rewrites only its own column)
                try:
                    outcomes.append(self._decode([running]))
                except Exception as exc_alone:
                    self._fail(running, exc_alone)
        for rows, logits, sampling, first in outcomes:
            self._sample_and_advance(rows, logits, sampling, first)

    @torch.inference_mode()
    def _decode(self, decoding: list[Running]) -> tuple[list[Running], torch.Tensor, _Sampling | None, Firsts]:
        """One decode forward for *decoding*: :meth:`_sample_and_advance`'s arguments (the rows in slot order)."""
        decoding.sort(key=lambda r: r.slot)
        if len(decoding) == 1 and not self.runner.compiled:
            first, rows = decoding[0].slot, 1
        else:
            first, rows = 0, self.runner.row_bucket(decoding[-1].slot + 1)
        # token, position, write column per row; rows without a decoding request write to the scratch column
        tokens, positions, columns = [0] * rows, [0] * rows, [self.kv.scratch] * rows
        for running in decoding:
            row = running.slot - first
            tokens[row], positions[row], columns[row] = running.generated[-1], running.position, running.position
        inputs = torch.tensor([tokens, positions, columns], dtype=torch.long).to(self.device)
        # The rows of the decoding requests, when not all rows are theirs. Copied before the step is launched: on
        # CUDA a copy from pageable memory waits for the stream, so after the launch it would wait for the whole step.
        own = None
        if len(decoding) < rows:
            own = torch.tensor([r.slot - first for r in decoding]).to(self.device)
        sampling = self._sampling_inputs(decoding)  # before the launch too, for the same reason
        kv_len = self.runner.kv_bucket(max(positions) + 1)
        logits, top, index, greedy_rows = self.runner.decode(
            inputs[0], inputs[1], inputs[2], slice(first, first + rows), kv_len
        )
        if own is not None:  # else the rows are the slots first..first+rows-1, in order: all of them
            logits, top, index = (t.index_select(0, own) for t in (logits, top, index))
            greedy_rows = greedy_rows.index_select(1, own)
        return decoding, logits, sampling, Firsts(top, index, greedy_rows)

    # --- sampling and streaming
    def _sampling_inputs(self, batch: list[Running]) -> _Sampling | None:
        """The rows' sampling parameters and top-p rows on the device (:func:`~.sampler.sample`'s inputs), or
        ``None`` when every row is greedy."""
        params = [r.handle.prepared.params for r in batch]
        if not any(p.temperature > 0 for p in params):
            return None
        tensors = row_params(params, [len(r.generated) for r in batch], [r.seed for r in batch], self.device)
        top_p_rows = [i for i, p in enumerate(params) if p.temperature > 0 and p.top_p < 1]
        return tensors, torch.tensor(top_p_rows).to(self.device) if top_p_rows else []

    def _sample_and_advance(
        self,
        batch: list[Running],
        logits: torch.Tensor,
        sampling: _Sampling | None,
        first: Firsts | None = None,
    ) -> None:
        """Sample each request's next token from its row of ``logits [len(batch), vocab]`` (one transfer to
        the host for all), stream it, and end the requests that are done. *sampling*: the batch's
        :meth:`_sampling_inputs`, built before the forward was launched; *first*: what the step computed beside
        the logits, if it did (a decode step)."""
        if not batch:
            return
        try:
            if sampling is not None:
                tensors, top_p_rows = sampling
                maxima = None if first is None else (first.top, first.argmax)
                tokens, ok = sample(logits, *tensors, top_p_rows=top_p_rows, first=maxima)
                picked = torch.stack([tokens, ok.long()])
            elif first is not None:  # all greedy, and the step picked the tokens already
                picked = first.greedy
            else:  # all greedy: the first maximum, no per-row parameters to build
                picked = torch.stack([t.long() for t in greedy(logits)])
            tokens, ok = picked.tolist()
        except Exception as exc:  # the forward is done: find the culprit by sampling each row alone
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            for row, running in enumerate(batch):
                alone = None if first is None else first.row(row)
                self._sample_and_advance([running], logits[row : row + 1], self._sampling_inputs([running]), alone)
            return
        now = time.monotonic()
        for running, token, good in zip(batch, tokens, ok, strict=True):
            if not good:
                self.leave(
                    running,
                    ServerError(
                        f"generation failed: the model's logits for request {running.handle.id} are not finite "
                        "(NaN or inf)"
                    ),
                )
                continue
            try:
                self._advance(running, token, now)
            except Exception as exc:  # e.g. a token the tokenizer cannot decode: this request alone
                self._fail(running, exc)

    def _advance(self, running: Running, token: int, now: float) -> None:
        if running.first_token_at is None:
            running.first_token_at = now
        running.generated.append(token)
        running.handle._push(running.text.add(token))
        if running.text.stopped or token in self.eos_token_ids:
            running.finish_reason = "stop"
        elif len(running.generated) >= running.handle.prepared.max_tokens or running.position + 1 >= self.max_context:
            running.finish_reason = "length"
        if running.finish_reason:
            running.handle._push(running.text.flush())
            self.leave(running, None)

    # --- leaving
    def _fail(self, running: Running, exc: BaseException) -> None:
        logger.error("generation failed for request %s", running.handle.id, exc_info=exc)
        self.leave(running, generation_error(exc))

    def leave(self, running: Running, error: BaseException | None) -> None:
        """End a running request (*error* ``None``: it finished) and free its slot. A request that failed may have
        written NaN or inf into its slot, which the next requests there would read (an additive mask does not hide
        a NaN: ``0 * NaN`` is NaN): its columns are zeroed first."""
        try:
            if self.running.get(running.slot) is running:
                del self.running[running.slot]
                cancelled = isinstance(error, RequestCancelledError)
                running.failed = error is not None and not cancelled
                # a cancel mid-prompt may leave columns no sampled token has yet shown to be finite
                if running.failed or (cancelled and running.prefilled and not running.generated):
                    self._clear_then_release(running)
                else:
                    self._release(running.slot)
        finally:
            self.record_end(running.handle, running, error)

    def _clear_then_release(self, running: Running) -> None:
        """Zero the leaving request's columns, then free its slot; a slot that cannot be cleared (a device
        error) is never handed out again, rather than poison the requests that would get it."""
        try:
            self.kv.clear(running.slot, running.prompt_len + len(running.generated))
        except Exception:
            self.kv.retire(running.slot)
            logger.exception(
                "KV slot %d could not be cleared: it is retired (%d of %d slots left)",
                running.slot,
                self.kv.usable,
                self.kv.slots,
            )
            return
        self._release(running.slot)

    def _release(self, slot: int) -> None:
        with self.slot_lock:  # the scheduler hands free slots out under it
            self.kv.release(slot)

    def take_all(self) -> list[Running]:
        """Empty the batch (the engine is stopping): its requests, whose endings the caller records."""
        running, self.running = list(self.running.values()), {}
        return running
