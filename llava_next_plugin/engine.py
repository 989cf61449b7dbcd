"""The batching engine: one decode loop over the model, shared by every request, on its own thread.

Requests are prepared (prompt built, images preprocessed, tokens counted and validated) in the caller's
thread, then queued. The engine thread runs steps; at the start of each step the requests waiting in the
queue join the running batch (continuous batching):

* joiners are prefilled together, left padded (``input_ids [J, Lj]``, ``pixel_values [n_images, patches,
  3, h, w]`` of every joiner's images, ``image_sizes [n_images, 2]``); their first token is sampled from
  the prefill's last logits;
* their KV cache (``[J, heads, Lj, head_dim]`` per layer) is left padded to the batch's length and stacked
  under the running batch's cache, and the 2-D attention mask ``[B, T]`` is stacked alike;
* every running request then decodes one token (``input_ids [B, 1]``, ``position_ids [B, 1]``);
* finished and cancelled requests are dropped from the batch (rows removed, all-padding columns trimmed).

Each request streams its text as tokens come (incremental detokenization that holds back incomplete
multi-byte pieces and partial stop strings). The model is used only through the standard transformers
interface ``forward(input_ids, attention_mask, pixel_values, image_sizes, position_ids, cache (or
past_key_values), use_cache) -> (logits, cache)``, so transformers' ``LlavaNextForConditionalGeneration`` and ours
both work.

Submission is thread-safe and loop-agnostic: :meth:`Engine.submit` returns a :class:`RequestHandle` that
can be iterated from a plain thread (``for text in handle``) or from asyncio or trio (``async for text in
handle``), and cancelled from anywhere.
"""

from __future__ import annotations

import collections
import copy
import inspect
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from llava_next_sdk.errors import (
    ContextLengthExceededError,
    LlavaNextError,
    OverloadedError,
    RequestCancelledError,
    ServerError,
)

from ._compat import cache_kwarg, output_cache
from .hooks import get_plugin_manager

__all__ = ["Engine", "SamplingParams", "PreparedRequest", "RequestHandle", "EngineResult", "get_shared_engine",
           "default_device"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` means greedy (argmax)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class PreparedRequest:
    """A request ready for the engine: tokens and pixels, counted and checked.

    ``input_ids [1, L]`` (image placeholders already expanded to ``image_tokens`` positions),
    ``pixel_values [num_images, patches, 3, h, w]`` or ``None``, ``image_sizes [num_images, 2]`` or ``None``.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    params: SamplingParams
    max_tokens: int
    num_images: int
    image_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[-1])


@dataclass
class EngineResult:
    """The outcome of one request: its text, why it ended, its token counts and timings (seconds)."""

    id: str
    text: str
    finish_reason: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    queue_seconds: float
    time_to_first_token: float
    total_seconds: float

    def to_generation_result(self, model: str | None = None):
        """The SDK's :class:`~llava_next_sdk.types.GenerationResult` for this outcome (what both fronts return)."""
        from llava_next_sdk.types import GenerationResult, Timings, Usage

        return GenerationResult(
            text=self.text, finish_reason=self.finish_reason,
            usage=Usage(self.prompt_tokens, self.completion_tokens, self.image_tokens),
            timings=Timings(self.queue_seconds, self.time_to_first_token, self.total_seconds),
            model=model, id=self.id)


# --------------------------------------------------------------------------------------------------
# The handle: one request's stream of text, readable from threads, asyncio and trio.


def _loop_waker():
    """A function that, called from any thread, wakes the current event loop's waiting task (and an event)."""
    import anyio
    import sniffio

    event = anyio.Event()
    library = sniffio.current_async_library()
    if library == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        return event, lambda: token.run_sync_soon(event.set)
    import asyncio

    loop = asyncio.get_running_loop()
    return event, lambda: loop.call_soon_threadsafe(event.set)


class RequestHandle:
    """One submitted request. Iterate it for text deltas; :meth:`result` / :meth:`aresult` for the end.

    Thread-safe: the engine thread pushes, any thread or event loop reads, anyone may :meth:`cancel`.
    When the request fails, iteration and ``result`` raise the error (an ``llava_next_sdk.errors`` class);
    a cancelled request raises :class:`RequestCancelledError`.
    """

    def __init__(self, request_id: str, prepared: PreparedRequest, engine: "Engine") -> None:
        self.id = request_id
        self.prepared = prepared
        self._engine = engine
        self._cond = threading.Condition()
        self._deltas: collections.deque[str] = collections.deque()
        self._result: EngineResult | None = None
        self._error: BaseException | None = None
        self._wakers: list = []
        self.cancelled = False
        self.submitted_at = time.monotonic()

    # --- engine side
    def _notify(self) -> None:
        self._cond.notify_all()
        wakers, self._wakers = self._wakers, []
        for wake in wakers:
            try:
                wake()
            except RuntimeError:  # that event loop is closed: nobody is waiting there any more
                pass

    def _push(self, text: str) -> None:
        if not text:
            return
        with self._cond:
            self._deltas.append(text)
            self._notify()

    def _finish(self, result: EngineResult | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self.done:  # the first ending stands (shutdown may race the engine thread)
                return
            self._result, self._error = result, error
            self._notify()

    # --- consumer side
    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def cancel(self) -> None:
        """Stop this request: a queued one leaves the queue now (ending cancelled), a running one leaves the
        batch at the engine's next step."""
        if not self.done:
            self.cancelled = True
            self._engine._withdraw(self)

    def _take(self) -> tuple[list[str], bool]:
        deltas = list(self._deltas)
        self._deltas.clear()
        return deltas, self.done

    def __iter__(self) -> Iterator[str]:
        """Blocking iteration over text deltas (for plain threads)."""
        while True:
            with self._cond:
                while not self._deltas and not self.done:
                    self._cond.wait()
                deltas, done = self._take()
            yield from deltas
            if done:
                if self._error is not None:
                    raise self._error
                return

    def result(self, timeout: float | None = None) -> EngineResult:
        """Block until the request ends; the :class:`EngineResult` (or raise its error)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    async def _wait(self) -> None:
        with self._cond:
            if self._deltas or self.done:
                return
            event, wake = _loop_waker()
            self._wakers.append(wake)
        await event.wait()

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        """Text deltas without blocking the event loop (asyncio or trio); cancelling the reader cancels the request."""
        try:
            while True:
                await self._wait()
                with self._cond:
                    deltas, done = self._take()
                for delta in deltas:
                    yield delta
                if done:
                    if self._error is not None:
                        raise self._error
                    return
        except BaseException:
            self.cancel()
            raise

    async def aresult(self) -> EngineResult:
        """Wait for the end without blocking the event loop; cancelling the waiter cancels the request."""
        try:
            while not self.done:
                await self._wait()
                with self._cond:
                    self._deltas.clear()
        except BaseException:
            self.cancel()
            raise
        if self._error is not None:
            raise self._error
        return self._result


# --------------------------------------------------------------------------------------------------
# Text: incremental detokenization and stop strings.


class _TextStream:
    """Turns generated token ids into text deltas, holding back incomplete characters and partial stops."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is context already turned into text
        self.read_offset = 0
        self.text = ""  # all stable text so far
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Take one token; return the text that became safe to show (may be empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: whatever text remains (after a stop string is cut off)."""
        if not self.stopped:
            full = self._decode(self.ids)
            if full.startswith(self.text):
                self.text = full
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stop:
            start = max(0, self.sent - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self._hand_out(len(self.text))
            if not final:
                held = max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
                return self._hand_out(len(self.text) - held)
        return self._hand_out(len(self.text))

    def _hand_out(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta


# --------------------------------------------------------------------------------------------------
# The engine.


@dataclass
class _Slot:
    """A running request: one row of the batch."""

    handle: RequestHandle
    text: _TextStream
    generator: torch.Generator | None
    position: int  # the position id of the next token fed to the model
    started_at: float
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None
    first_token_at: float | None = None
    finish_reason: str | None = None


class Engine:
    """Continuous-batching text generation over a LLaVA-NeXT model, on its own thread.

    Args:
        model: a ``LlavaNextForConditionalGeneration`` (ours or transformers'), in eval mode.
        processor: its ``LlavaNextProcessor`` (tokenizer + image processor + chat template).
        max_batch_size: requests decoded together at most; more wait in the queue.
        max_queue: requests waiting at most; beyond it :meth:`submit` raises :class:`OverloadedError`.
        max_context: prompt + completion tokens at most (default: the text model's
            ``max_position_embeddings``).
        default_max_tokens: completion tokens when a request gives no ``max_tokens`` (capped by the context).
        model_name: the name reported to clients.
    """

    def __init__(self, model, processor, *, max_batch_size: int = 8, max_queue: int = 64,
                 max_context: int | None = None, default_max_tokens: int = 512,
                 model_name: str | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Tokenizers are not safe to share between threads that encode and decode at once: callers'
        # threads prepare (one at a time), the engine thread decodes with its own copy.
        self._prepare_lock = threading.Lock()
        self._detokenizer = copy.deepcopy(self.tokenizer)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_context = max_context or int(getattr(text_config, "max_position_embeddings", 4096))
        self.model_name = model_name or str(getattr(config, "_name_or_path", "") or "llava-next")
        self.image_token_id = int(getattr(config, "image_token_id", None) or getattr(config, "image_token_index"))
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id or 0
        self.eos_token_ids = self._eos_ids()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        forward_params = inspect.signature(model.forward).parameters
        self._accepts_logits_to_keep = "logits_to_keep" in forward_params
        self._cache_arg = cache_kwarg(model.forward)  # "cache" or "past_key_values", by transformers version

        self._lock = threading.Condition()
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._slots: list[_Slot] = []
        self._cache = None  # the batch's KV cache: per layer keys/values [B, heads, T, head_dim]
        self._mask: torch.Tensor | None = None  # [B, T], 1 where a real token is cached
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        # requests_<outcome> (ok, cancelled, server_error...), requests_rejected, prompt_tokens,
        # completion_tokens, image_tokens, batched_steps (decode steps with more than one request)
        self.stats: collections.Counter = collections.Counter()

    @classmethod
    def from_pretrained(cls, path: str, *, device: str | None = None, dtype: torch.dtype | str | None = None,
                        **kwargs: Any) -> "Engine":
        """Load the model and processor from a folder or hub id with the Auto classes and start the engine.

        Importing this package registered our classes with the Auto classes, so they are ours. *device*
        defaults to :func:`default_device` (the local client and ``llava-next serve`` both load through here).
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or "auto")
        model = model.to(device or default_device())
        kwargs.setdefault("model_name", str(path))
        return cls(model, processor, **kwargs).start()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif eos:
                ids.update(int(i) for i in eos)
        return ids

    # --- lifecycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llava-next-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work; with *drain*, let queued and running requests finish first (up to *timeout* s).

        Whatever is still running when the engine stops is cancelled.
        """
        with self._lock:
            self._accepting = False
            deadline = None if timeout is None else time.monotonic() + timeout
            if drain:
                while self._pending or self._slots:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._lock.wait(left if left is not None else 0.5)
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        # The engine thread ends what it left when it stops; these are left only if it never ran or is stuck.
        self._end_leftovers(ServerError("the engine shut down before this request finished", status=503))

    def _end_leftovers(self, error: LlavaNextError) -> None:
        """End every queued and running request with *error* (each caller and after_generate hook hears it)."""
        with self._lock:
            self._accepting = False
            leftovers = [(h, None) for h in self._pending] + [(s.handle, s) for s in self._slots]
            self._pending.clear()
            self._slots, self._cache, self._mask = [], None, None
        for handle, slot in leftovers:
            if not handle.done:
                self._record_end(handle, slot, RequestCancelledError(f"request {handle.id} was cancelled")
                                 if handle.cancelled else error)

    @property
    def accepting(self) -> bool:
        """Whether :meth:`submit` takes new requests (False once :meth:`shutdown` began)."""
        return self._accepting

    def stats_snapshot(self) -> dict[str, int]:
        """A copy of :attr:`stats`, taken under the engine's lock (safe to iterate from any thread)."""
        with self._lock:
            return dict(self.stats)

    @property
    def queue_depth(self) -> int:
        """Requests waiting to join the batch."""
        return len(self._pending)

    @property
    def batch_size(self) -> int:
        """Requests decoding now."""
        return len(self._slots)

    # --- submission
    def prepare(self, messages: list[dict], images: Sequence[Any] = (), params: SamplingParams | None = None,
                *, prompt: str | None = None) -> PreparedRequest:
        """Build the prompt, preprocess the images and count tokens (run in the caller's thread).

        Args:
            messages: a chat in transformers' format: ``[{"role", "content": [{"type": "text", "text"},
                {"type": "image"}]}]`` (one ``{"type": "image"}`` part per image, in order).
            images: PIL images, one per image part.
            params: sampling parameters.
            prompt: an already formatted prompt (then *messages* is ignored).

        Raises:
            ContextLengthExceededError: the prompt (plus ``max_tokens``) does not fit the context.
        """
        params = params or SamplingParams()
        if prompt is None:
            from .prompts import build_prompt

            prompt = build_prompt(messages, self.processor, self.model.config, num_images=len(images))
        with self._prepare_lock:
            inputs = self.processor(images=list(images) or None, text=prompt, return_tensors="pt")
        input_ids = inputs["input_ids"]
        prompt_tokens = int(input_ids.shape[-1])
        room = self.max_context - prompt_tokens
        if room < 1:
            raise ContextLengthExceededError(
                f"the prompt is {prompt_tokens} tokens (images included) but the model's context is "
                f"{self.max_context} tokens; use fewer or smaller images or a shorter prompt", param="messages")
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthExceededError(
                f"the prompt is {prompt_tokens} tokens and max_tokens is {params.max_tokens}, which exceeds the "
                f"model's context length of {self.max_context} tokens; ask for at most {room} tokens",
                param="max_tokens")
        max_tokens = params.max_tokens if params.max_tokens is not None else min(self.default_max_tokens, room)
        pixel_values = inputs.get("pixel_values")
        image_sizes = inputs.get("image_sizes")
        return PreparedRequest(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, params=params,
            max_tokens=max_tokens, num_images=len(images),
            image_tokens=int((input_ids == self.image_token_id).sum()))

    def submit(self, prepared: PreparedRequest, request_id: str | None = None) -> RequestHandle:
        """Queue a prepared request; returns its handle at once. Thread-safe.

        Raises:
            OverloadedError: the queue is full (retry later) or the engine is shutting down.
        """
        handle = RequestHandle(request_id or f"chatcmpl-{uuid.uuid4().hex}", prepared, self)
        with self._lock:
            self._refuse_if_full()
            self._pending.append(handle)
            self._lock.notify_all()
        self.start()
        return handle

    def check_admission(self) -> None:
        """Raise now what :meth:`submit` would raise (queue full, shutting down); cheap and thread-safe.

        Fronts call it before :meth:`prepare`, so an overloaded engine does not decode images it would
        refuse anyway; :meth:`submit` checks again.
        """
        with self._lock:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:  # with self._lock held
        if not self._accepting:
            raise OverloadedError("the engine is shutting down and takes no new requests", status=503,
                                  retry_after=1.0)
        if len(self._pending) >= self.max_queue:
            self.stats["requests_rejected"] += 1
            raise OverloadedError(
                f"the engine's queue is full ({self.max_queue} requests waiting); retry later", retry_after=1.0)

    def generate(self, messages: list[dict], images: Sequence[Any] = (), params: SamplingParams | None = None,
                 **kwargs: Any) -> EngineResult:
        """Prepare, submit and wait (blocking): a convenience for scripts and tests."""
        return self.submit(self.prepare(messages, images, params, **kwargs)).result()

    def _withdraw(self, handle: RequestHandle) -> None:
        """Take a cancelled *handle* out of the queue, so its place is free at once, and end it (cancelled).

        A handle no longer queued (in the batch, or ended) is left to the engine thread, which drops it at
        its next step; whoever removes a handle from the queue under the lock is the one that ends it.
        """
        with self._lock:
            try:
                self._pending.remove(handle)
                withdrawn = True
            except ValueError:
                withdrawn = False
            self._lock.notify_all()
        if withdrawn:
            self._end_cancelled(handle)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # --- the loop
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug in the loop itself: no request may wait forever
            logger.exception("the engine thread stopped")
            self._end_leftovers(ServerError(f"the engine stopped: {exc!r}"))
            raise
        self._end_leftovers(ServerError("the engine shut down before this request finished", status=503))

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._pending and not self._slots:
                    self._lock.wait()
                if self._stopping:
                    return
                joiners = []
                while self._pending and len(self._slots) + len(joiners) < self.max_batch_size:
                    handle = self._pending.popleft()
                    if handle.cancelled:
                        self._end_cancelled(handle)
                    else:
                        joiners.append(handle)
            try:
                self._step(joiners)
            except Exception as exc:  # the model failed: fail this batch, keep serving
                logger.exception("engine step failed")
                error = _generation_error(exc)
                for handle in joiners + [s.handle for s in self._slots]:
                    if not handle.done:
                        self._record_end(handle, None, error)
                self._slots, self._cache, self._mask = [], None, None
            with self._lock:
                self._lock.notify_all()  # wakes shutdown(drain=True)

    def _step(self, joiners: list[RequestHandle]) -> None:
        self._drop([s for s in self._slots if s.handle.cancelled], "cancelled")
        if joiners:
            self._prefill_isolating_failures(joiners)
        if self._slots:
            self._decode()

    def _prefill_isolating_failures(self, joiners: list[RequestHandle]) -> None:
        """Prefill the joiners together; if that fails, one by one, so only a request that fails alone fails.

        A failure after the joiners were merged into the batch propagates (the batch's state is suspect).
        """
        try:
            self._prefill(joiners)
            return
        except Exception as exc:
            if any(slot.handle in joiners for slot in self._slots):
                raise
            if len(joiners) == 1:
                logger.exception("prefill failed for request %s", joiners[0].id)
                error = _generation_error(exc)
                self._record_end(joiners[0], None, error)
                return
        for handle in joiners:
            self._prefill_isolating_failures([handle])

    @torch.inference_mode()
    def _prefill(self, handles: list[RequestHandle]) -> None:
        """Run the joiners' prompts together (left padded) and stack their cache under the batch's."""
        now = time.monotonic()
        lengths = [h.prepared.prompt_tokens for h in handles]
        width = max(lengths)
        input_ids = torch.full((len(handles), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(handles), width), dtype=torch.long)
        for row, (handle, length) in enumerate(zip(handles, lengths)):
            input_ids[row, width - length:] = handle.prepared.input_ids[0]
            mask[row, width - length:] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        pixel_values, image_sizes = self._stack_images([h.prepared for h in handles])
        from transformers import DynamicCache

        kwargs: dict[str, Any] = {}
        if self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=position_ids.to(self.device), pixel_values=pixel_values, image_sizes=image_sizes,
            use_cache=True, **{self._cache_arg: DynamicCache()}, **kwargs)
        new_slots = []
        for handle, length in zip(handles, lengths):
            params = handle.prepared.params
            generator = None
            if params.temperature > 0:
                generator = torch.Generator(device=self.device)
                # unseeded: a fresh seed of our own (torch.seed() would reseed the process's global RNG)
                generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
            new_slots.append(_Slot(handle=handle, text=_TextStream(self._detokenizer, params.stop),
                                   generator=generator, position=length, started_at=now))
            self._call_hook("llava_next_before_generate", request_id=handle.id, request={
                "model": self.model_name, "num_images": handle.prepared.num_images,
                "prompt_tokens": handle.prepared.prompt_tokens, "image_tokens": handle.prepared.image_tokens,
                "max_tokens": handle.prepared.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "seed": params.seed})
        self._merge(new_slots, _cache_tensors(output_cache(out)), mask.to(self.device))
        self._advance(new_slots, out.logits[:, -1, :])

    @torch.inference_mode()
    def _decode(self) -> None:
        """One token for every running request."""
        if len(self._slots) > 1:
            self.stats["batched_steps"] += 1
        input_ids = torch.tensor([[s.next_token] for s in self._slots], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([[s.position] for s in self._slots], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._slots), 1))], dim=1)
        out = self.model(input_ids=input_ids, attention_mask=self._mask, position_ids=position_ids,
                         use_cache=True, **{self._cache_arg: self._cache})
        self._cache = output_cache(out)
        for slot in self._slots:
            slot.position += 1
        self._advance(list(self._slots), out.logits[:, -1, :])

    def _stack_images(self, prepared: list[PreparedRequest]):
        with_images = [p for p in prepared if p.pixel_values is not None and p.num_images]
        if not with_images:
            return None, None
        patches = max(p.pixel_values.shape[1] for p in with_images)
        pixel_values = torch.cat([
            torch.nn.functional.pad(p.pixel_values, (0, 0, 0, 0, 0, 0, 0, patches - p.pixel_values.shape[1]))
            if p.pixel_values.dim() == 5 else p.pixel_values for p in with_images])
        image_sizes = torch.cat([p.image_sizes for p in with_images])
        return pixel_values.to(self.device, self.dtype), image_sizes.to(self.device)

    # --- batch bookkeeping
    def _merge(self, slots: list[_Slot], layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Stack new rows (their cache ``[J, H, Tj, D]`` and mask ``[J, Tj]``) under the batch, left padding."""
        if not self._slots:
            self._slots, self._cache, self._mask = slots, _make_cache(layers), mask
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        self._cache = _make_cache([
            (torch.cat([left_pad(k0, 2), left_pad(k1, 2)]), torch.cat([left_pad(v0, 2), left_pad(v1, 2)]))
            for (k0, v0), (k1, v1) in zip(_cache_tensors(self._cache), layers)])
        self._mask = torch.cat([left_pad(self._mask, 1), left_pad(mask, 1)])
        self._slots = self._slots + slots

    def _drop(self, slots: list[_Slot], reason: str | None = None) -> None:
        """Remove rows from the batch and trim the columns that only padding is left in."""
        if not slots:
            return
        for slot in slots:
            if reason == "cancelled":
                self._end_cancelled(slot.handle, slot)
        keep = [i for i, s in enumerate(self._slots) if s not in slots]
        self._slots = [self._slots[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])  # leading columns that every remaining row pads
        self._mask = mask[:, first:]
        self._cache = _make_cache([(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                                   for k, v in _cache_tensors(self._cache)])

    def _advance(self, slots: list[_Slot], logits: torch.Tensor) -> None:
        """Sample each slot's next token from its row of ``logits [len(slots), vocab]``, stream, and finish."""
        tokens = self._sample(slots, logits.float())
        now = time.monotonic()
        finished = []
        for slot, token in zip(slots, tokens):
            if slot.first_token_at is None:
                slot.first_token_at = now
            slot.generated.append(token)
            slot.next_token = token
            slot.handle._push(slot.text.add(token))
            if slot.text.stopped:
                slot.finish_reason = "stop"
            elif token in self.eos_token_ids:
                slot.finish_reason = "stop"
            elif len(slot.generated) >= slot.handle.prepared.max_tokens or slot.position + 1 >= self.max_context:
                slot.finish_reason = "length"
            if slot.finish_reason:
                slot.handle._push(slot.text.flush())
                finished.append(slot)
        for slot in finished:
            self._record_end(slot.handle, slot, None)
        self._drop(finished)

    def _sample(self, slots: list[_Slot], logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for row, slot in enumerate(slots):
            params = slot.handle.prepared.params
            if params.temperature <= 0:
                tokens.append(greedy[row])
                continue
            probs = torch.softmax(logits[row] / params.temperature, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest prefix whose mass reaches top_p (always at least the top token)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens.append(int(torch.multinomial(probs, 1, generator=slot.generator)))
        return tokens

    # --- endings
    def _end_cancelled(self, handle: RequestHandle, slot: _Slot | None = None) -> None:
        self._record_end(handle, slot, RequestCancelledError(f"request {handle.id} was cancelled"))

    def _record_end(self, handle: RequestHandle, slot: _Slot | None, error: BaseException | None) -> None:
        now = time.monotonic()
        prepared = handle.prepared
        started = slot.started_at if slot else now
        result = EngineResult(
            id=handle.id, text=slot.text.text if slot else "", finish_reason=(slot.finish_reason if slot else None)
            or ("cancelled" if isinstance(error, RequestCancelledError) else "error"),
            token_ids=list(slot.generated) if slot else [], prompt_tokens=prepared.prompt_tokens,
            completion_tokens=len(slot.generated) if slot else 0, image_tokens=prepared.image_tokens,
            queue_seconds=started - handle.submitted_at,
            time_to_first_token=((slot.first_token_at or now) - handle.submitted_at) if slot else 0.0,
            total_seconds=now - handle.submitted_at)
        outcome = "ok" if error is None else getattr(error, "code", "error")
        self.stats[f"requests_{outcome}"] += 1
        self.stats["prompt_tokens"] += result.prompt_tokens
        self.stats["completion_tokens"] += result.completion_tokens
        self.stats["image_tokens"] += result.image_tokens
        self._call_hook("llava_next_after_generate", request_id=handle.id, result={
            "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "image_tokens": result.image_tokens,
            "queue_seconds": result.queue_seconds, "time_to_first_token": result.time_to_first_token,
            "total_seconds": result.total_seconds, "error": None if error is None else str(error)})
        handle._finish(result if error is None else None, error)

    def _call_hook(self, name: str, **kwargs: Any) -> None:
        try:  # asked each time: get_plugin_manager caches it, and refresh=True replaces it
            getattr(get_plugin_manager().hook, name)(**kwargs)
        except Exception:  # an observer must not break generation
            logger.exception("plugin hook %s failed", name)


def default_device() -> str:
    """Where an engine loads a model when no device is given: ``"cuda"`` when a GPU is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _generation_error(exc: Exception) -> LlavaNextError:
    """The typed error a request's caller gets when the model raised *exc* while generating it."""
    if isinstance(exc, LlavaNextError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return OverloadedError(f"the device ran out of memory while generating ({exc}); retry later, or with "
                               "fewer or smaller images or a smaller max_tokens", status=503, retry_after=1.0)
    return ServerError(f"generation failed: {exc!r}")


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)``, each ``[B, heads, T, head_dim]``, of a transformers cache (or legacy tuple)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(k, v) for k, v, *_ in cache]


def _make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers ``DynamicCache`` holding these per-layer ``(keys, values)``."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


_SHARED: dict[tuple, Engine] = {}
_SHARED_LOCK = threading.Lock()


def get_shared_engine(path: str, **kwargs: Any) -> Engine:
    """One engine per (model path, options) in this process, shared by every client and event loop."""
    key = (str(path),) + tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    with _SHARED_LOCK:
        engine = _SHARED.get(key)
        if engine is None or engine._stopping:
            engine = _SHARED[key] = Engine.from_pretrained(str(path), **kwargs)
        return engine
