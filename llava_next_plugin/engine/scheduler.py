"""The engine: the queue, admission, joins and leaves, and the loop that runs steps on its own thread.

One iteration of the loop (on the engine thread):

1. under the lock: end the requests cancelled while queued; move queued requests into free KV slots;
2. start each joiner: ``before_generate`` hook, its prompt embeddings (vision features reused by image
   content hash; the joiners' other images through the vision tower in one call), the longest cached prefix
   of its prompt copied into its slot;
3. one prefill chunk: at most ``prefill_chunk`` prompt tokens, from the joiners in join order (``idle_prefill``
   when no request is decoding: nothing can stall then, and fewer, larger forwards are faster); a joiner
   whose prompt is done samples its first token;
4. one decode step: every running request with a token gets its next one (rows ``[0, n)`` of the slots);
5. tokens are streamed, stop strings and ``eos`` checked, finished requests leave (their slot is free).

A long prompt is thus prefilled a chunk at a time between decode steps, and running streams keep flowing.
Sampling is done on the device for all rows at once; one transfer per step brings the tokens to the host.
A step that raises is re-run row by row (each row writes only its own slot, so re-running is harmless); a
request whose row fails alone is ended with a typed error, the others carry on.
"""

from __future__ import annotations

import collections
import copy
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from llava_next_sdk.errors import (
    ContextLengthExceededError,
    LlavaNextError,
    OverloadedError,
    RequestCancelledError,
    ServerError,
)

from ..errors import InputError, as_api_error
from ..hooks import get_plugin_manager
from .detokenizer import TextStream
from .handle import RequestHandle
from .kv import KVSlots, PrefixStore
from .request import EngineResult, Image, PreparedRequest, SamplingParams, generation_error
from .sampler import greedy, row_params, sample
from .step import FeatureCache, ModelRunner

__all__ = ["Engine", "default_device"]

logger = logging.getLogger("llava_next_plugin.engine")

GiB = 1 << 30


def default_device() -> str:
    """Where an engine loads a model when no device is given: ``"cuda"`` when a GPU is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class _Running:
    """A request that holds a KV slot."""

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

    @property
    def decoding(self) -> bool:
        return bool(self.generated) and self.finish_reason is None

    @property
    def position(self) -> int:
        """The position of the last generated token (the one the next decode step feeds)."""
        return self.prompt_len + len(self.generated) - 1


_Piece = tuple[_Running, torch.Tensor, int]  # a prefilling request, its prompt embeddings [L, hidden], tokens now


class Engine:
    """Continuous-batching text generation over a LLaVA-NeXT model, on its own thread.

    :param model: a ``LlavaNextForConditionalGeneration`` (ours or transformers'), in eval mode.
    :param processor: its ``LlavaNextProcessor`` (tokenizer + image processor + chat template).
    :param max_batch_size: requests holding a KV slot at most (prefilling or decoding); more wait in the queue.
    :param max_queue: requests waiting at most; beyond it :meth:`submit` raises :class:`OverloadedError`.
    :param max_context: prompt + completion tokens at most (default: the text model's
        ``max_position_embeddings``, lowered if the KV slots would not fit *kv_memory*).
    :param default_max_tokens: completion tokens when a request gives no ``max_tokens`` (capped by the context).
    :param model_name: the name reported to clients.
    :param compile: ``torch.compile`` the decode step (default: on for CUDA, off on CPU). An SDPA model then
        runs :func:`~.step.slot_attention` (the same arithmetic, grouped-query heads not repeated).
    :param prefill_chunk: prompt tokens prefilled per step at most (between two decode steps).
    :param idle_prefill: prompt tokens prefilled per step at most while no request is decoding (default: 8
        chunks). An out-of-memory in a prefill lowers both to half the tokens of the forward that failed.
    :param kv_memory: bytes the KV slots may take (default: 40% of free CUDA memory; 8 GiB on CPU).
    :param reuse_memory: bytes for reused prompt prefixes' KV and images' vision features (default: a quarter
        of the KV slots' size, at least 64 MiB); 0 switches reuse off.
    """

    def __init__(
        self,
        model,
        processor,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
        default_max_tokens: int = 512,
        model_name: str | None = None,
        compile: bool | None = None,
        prefill_chunk: int = 512,
        idle_prefill: int | None = None,
        kv_memory: int | None = None,
        reuse_memory: int | None = None,
    ) -> None:
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be at least 1")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Tokenizers must not encode in two threads at once: each preparing thread gets its own copy of the
        # processor (no lock shared between requests); the engine thread decodes with its own copy.
        self._local = threading.local()
        self._detokenizer = copy.deepcopy(self.tokenizer)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self.prefill_chunk = prefill_chunk
        self.idle_prefill = max(idle_prefill or 8 * prefill_chunk, prefill_chunk)
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_context = max_context or int(getattr(text_config, "max_position_embeddings", 4096))
        self.model_name = model_name or str(getattr(config, "_name_or_path", "") or "llava-next")
        self.image_token_id = int(getattr(config, "image_token_id", None) or config.image_token_index)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id or 0
        self.eos_token_ids = self._eos_ids()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        #: The most prompt characters the context could hold (its length times the longest token's text): a
        #: longer prompt is refused before it is tokenized, here and by the fronts' validation.
        self.max_prompt_chars = self.max_context * _longest_token_chars(self.tokenizer)

        self.kv = self._allocate_kv(text_config, kv_memory)
        reuse = reuse_memory if reuse_memory is not None else max(self.kv.nbytes // 4, 64 << 20)
        self.prefixes = PrefixStore(reuse // 2) if reuse else None
        self.features = FeatureCache(reuse // 2) if reuse else None
        if compile is None:
            compile = self.device.type == "cuda"
        self.runner = ModelRunner(model, self.kv, image_token_id=self.image_token_id, compile=compile)

        self._lock = threading.Condition()
        self._start_lock = threading.Lock()
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._withdrawn: list[RequestHandle] = []  # cancelled while queued: the engine thread ends them
        self._running: dict[int, _Running] = {}  # by slot, in join order
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        # requests_<outcome> (ok, cancelled, server_error...), requests_rejected, prompt_tokens,
        # completion_tokens, image_tokens, batched_steps (decode steps with more than one request),
        # prefill_chunks, prefix_reused_tokens, image_features_reused, images_batched (vision features computed
        # for several joiners in one call)
        self._stats: collections.Counter = collections.Counter()
        self._stats_lock = threading.Lock()

    # --- construction
    @classmethod
    def from_pretrained(
        cls, path: str, *, device: str | None = None, dtype: torch.dtype | str | None = None, **kwargs: Any
    ) -> Engine:
        """Load the model and processor from a folder or hub id with the Auto classes and start the engine.

        Importing this package registered our classes with the Auto classes, so they are ours. *device*
        defaults to :func:`default_device` (the local client and ``llava-next serve`` both load through here).
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or "auto")
        # transformers wraps PreTrainedModel.to with functools.wraps, which typeshed types as an unbound function
        model = model.to(device or default_device())  # type: ignore[arg-type]
        kwargs.setdefault("model_name", str(path))
        engine = cls(model, processor, **kwargs)
        if engine.runner.compiled:
            engine.warm_up()
        return engine.start()

    def _allocate_kv(self, text_config, kv_memory: int | None) -> KVSlots:
        heads = int(text_config.num_attention_heads)
        geometry = dict(
            layers=int(text_config.num_hidden_layers),
            slots=self.max_batch_size,
            kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads),
        )
        if kv_memory is None:
            if self.device.type == "cuda":
                kv_memory = int(0.4 * torch.cuda.mem_get_info(self.device)[0])
            else:
                kv_memory = 8 * GiB
        per_token = KVSlots.bytes_needed(max_len=1, dtype=self.dtype, **geometry) // 2
        fits = kv_memory // per_token - 1
        if fits < self.max_context:
            if fits < 64:
                raise ValueError(
                    f"{kv_memory} bytes of KV memory hold {fits} tokens per slot for "
                    f"{self.max_batch_size} slots; give more kv_memory or a smaller max_batch_size"
                )
            logger.warning(
                "KV slots: lowering the context from %d to %d tokens to fit %.2f GiB",
                self.max_context,
                fits,
                kv_memory / GiB,
            )
            self.max_context = int(fits)
        kv = KVSlots(max_len=self.max_context, dtype=self.dtype, device=self.device, **geometry)
        logger.info(
            "KV slots: %d slots x %d tokens x %d layers, %.1f MiB on %s",
            kv.slots,
            kv.max_len,
            geometry["layers"],
            kv.nbytes / (1 << 20),
            self.device,
        )
        return kv

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the static KV slots take (allocated at construction)."""
        return self.kv.nbytes

    def warm_up(self, context: int = 1) -> float:
        """Run the decode step once per batch-size bucket at a context of *context* tokens; its seconds, logged.

        Compiling makes two graphs here (one row; any rows), dynamic in the row count and the context length:
        nothing compiles later. Under CUDA graphs each bucket is also recorded here; a longer context's length
        bucket is recorded on first use (a capture, not a compile)."""
        seconds = self.runner.warm_up(self._buckets(), self._kv_bucket(context))
        logger.info("decode step warm-up (%s): %.1f s", "compiled" if self.runner.compiled else "eager", seconds)
        return seconds

    def _buckets(self) -> list[int]:
        sizes, size = [], 1
        while size < self.max_batch_size:
            sizes.append(size)
            size *= 2
        return sizes + [self.max_batch_size]

    def _row_bucket(self, rows: int) -> int:
        """Rows a decode step runs: exact, except under CUDA graphs (one graph per row count): a power of two."""
        if not self.runner.graphs:
            return rows
        return next(b for b in self._buckets() if b >= rows)

    def _kv_bucket(self, columns: int) -> int:
        """Cache columns a step attends over: exact, except under CUDA graphs, which record one graph per length:
        there a power of two (>= 512), so a few lengths serve every context. The compiled step's graph takes
        any length (it is dynamic in it): contexts that grow never recompile it."""
        if not self.runner.graphs:
            return columns
        size = 512
        while size < columns:
            size *= 2
        return min(size, self.kv.max_len)

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
    def start(self) -> Engine:
        """Start the engine thread (once, however many threads call this at the same time)."""
        with self._start_lock:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="llava-next-engine", daemon=True)
                self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work; with *drain*, let queued and running requests finish first. *timeout* bounds
        the whole call (``None``: no bound). Whatever is still running when the engine stops is ended."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        with self._lock:
            self._accepting = False
            if drain:
                while self._pending or self._running:
                    if left() == 0.0:
                        break
                    self._lock.wait(left() if deadline is not None else 0.5)
            self._stopping = True
            self._lock.notify_all()
        with self._start_lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=left())
        # The engine thread ends what it left when it stops; these are left only if it never ran or is stuck.
        self._end_leftovers(ServerError("the engine shut down before this request finished", status=503))

    def _end_leftovers(self, error: LlavaNextError) -> None:
        """End every queued and running request with *error* (each caller and after_generate hook hears it once)."""
        with self._lock:
            self._accepting = False
            leftovers = (
                [(h, None) for h in self._withdrawn]
                + [(h, None) for h in self._pending]
                + [(r.handle, r) for r in self._running.values()]
            )
            self._pending.clear()
            self._withdrawn = []
            self._running = {}
        for handle, running in leftovers:
            self._record_end(
                handle,
                running,
                RequestCancelledError(f"request {handle.id} was cancelled") if handle.cancelled else error,
            )

    @property
    def accepting(self) -> bool:
        """Whether :meth:`submit` takes new work (False once shutting down)."""
        return self._accepting

    @property
    def queue_depth(self) -> int:
        """Requests waiting to join the batch."""
        return len(self._pending)

    @property
    def batch_size(self) -> int:
        """Requests holding a KV slot now (prefilling or decoding)."""
        return len(self._running)

    @property
    def stats(self) -> collections.Counter:
        """A copy of the engine's counters (see :meth:`stats_snapshot`)."""
        with self._stats_lock:
            return collections.Counter(self._stats)

    def stats_snapshot(self) -> dict[str, int]:
        """The engine's counters, copied under their lock (safe from any thread): ``requests_<outcome>``,
        ``requests_rejected``, ``prompt_tokens``, ``completion_tokens``, ``image_tokens``, ``batched_steps``,
        ``prefill_chunks``, ``prefix_reused_tokens``, ``image_features_reused``."""
        with self._stats_lock:
            return {key: int(value) for key, value in self._stats.items()}

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    # --- submission
    def _processor(self):
        """This thread's own copy of the processor (tokenizers are not safe to share between threads)."""
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = self._local.processor = copy.deepcopy(self.processor)
        return processor

    def prepare(
        self,
        messages: list[dict],
        images: Sequence[Any] = (),
        params: SamplingParams | None = None,
        *,
        prompt: str | None = None,
        image_detail: Sequence[str] | None = None,
    ) -> PreparedRequest:
        """Build the prompt, preprocess the images and count tokens (run in the caller's thread; requests
        prepared in different threads do not wait for each other).

        :param messages: a chat in transformers' format: ``[{"role", "content": [{"type": "text", "text"},
            {"type": "image"}]}]`` (one ``{"type": "image"}`` part per image, in order).
        :param images: PIL images, one per image part.
        :param params: sampling parameters.
        :param prompt: an already formatted prompt (then *messages* is ignored).
        :param image_detail: per image, OpenAI's ``detail``: ``"low"`` (the base view only, one tile's tokens),
            ``"high"`` or ``"auto"`` (full anyres, the default).
        :raises ContextLengthExceededError: the prompt (plus ``max_tokens``) does not fit the context.
        :raises BadRequestError: an unknown *image_detail* value, or not one per image.
        """
        params = params or SamplingParams()
        detail = _image_detail(image_detail, len(images))
        try:
            return self._prepare(messages, images, params, prompt, detail)
        except InputError as exc:  # the model package's error: the serving layer's typed (HTTP 400) one
            raise as_api_error(exc) from exc

    def _prepare(
        self,
        messages: list[dict],
        images: Sequence[Any],
        params: SamplingParams,
        prompt: str | None,
        detail: tuple[str, ...],
    ) -> PreparedRequest:
        if prompt is None:
            from ..prompts import build_prompt

            prompt = build_prompt(messages, self._processor(), self.model.config, num_images=len(images))
        if len(prompt) > self.max_prompt_chars:  # certainly too long: refuse before tokenizing it all
            raise ContextLengthExceededError(
                f"the prompt is {len(prompt)} characters, more than the model's context of {self.max_context} "
                f"tokens can hold; shorten it",
                param="messages",
            )
        inputs = self._processor()(images=list(images) or None, text=prompt, return_tensors="pt")
        input_ids = inputs["input_ids"]
        if "low" in detail:
            input_ids = self._base_view_placeholders(input_ids, detail)
        prompt_tokens = int(input_ids.shape[-1])
        room = self.max_context - prompt_tokens
        if room < 1:
            raise ContextLengthExceededError(
                f"the prompt is {prompt_tokens} tokens (images included) but the model's context is "
                f"{self.max_context} tokens; use fewer or smaller images or a shorter prompt",
                param="messages",
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthExceededError(
                f"the prompt is {prompt_tokens} tokens and max_tokens is {params.max_tokens}, which exceeds the "
                f"model's context length of {self.max_context} tokens; ask for at most {room} tokens",
                param="max_tokens",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else min(self.default_max_tokens, room)
        prepared = PreparedRequest(
            input_ids=input_ids,
            pixel_values=inputs.get("pixel_values"),
            image_sizes=inputs.get("image_sizes"),
            params=params,
            max_tokens=max_tokens,
            num_images=len(images),
            image_tokens=int((input_ids == self.image_token_id).sum()),
            image_detail=detail,
        )
        prepared.images  # noqa: B018  (hashed here, on the caller's thread; the engine thread reads the result)
        return prepared

    def _base_view_placeholders(self, input_ids: torch.Tensor, detail: tuple[str, ...]) -> torch.Tensor:
        """*input_ids* with each ``low`` image's run of ``<image>`` tokens shortened to one base view's."""
        ids = input_ids[0].tolist()
        runs, start = [], None  # (start, end) of each run of image tokens, in order
        for i, token in enumerate(ids + [None]):
            if token == self.image_token_id and start is None:
                start = i
            elif token != self.image_token_id and start is not None:
                runs.append((start, i))
                start = None
        if len(runs) != len(detail):
            from llava_next_sdk.errors import BadRequestError

            raise BadRequestError(
                f"detail='low' needs each image's placeholder apart from the others; the prompt "
                f"has {len(runs)} runs of image tokens for {len(detail)} images",
                param="messages",
            )
        base = self.runner.base_view_tokens()
        out, previous = [], 0
        for (begin, end), level in zip(runs, detail, strict=True):
            out += ids[previous:begin] + [self.image_token_id] * (base if level == "low" else end - begin)
            previous = end
        out += ids[previous:]
        return torch.tensor([out], dtype=input_ids.dtype)

    def submit(self, prepared: PreparedRequest, request_id: str | None = None) -> RequestHandle:
        """Queue a prepared request; returns its handle at once. Thread-safe.

        :raises OverloadedError: the queue is full (retry later) or the engine is shutting down.
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
            raise OverloadedError("the engine is shutting down and takes no new requests", status=503, retry_after=1.0)
        if len(self._pending) >= self.max_queue:
            self._count("requests_rejected")
            raise OverloadedError(
                f"the engine's queue is full ({self.max_queue} requests waiting); retry later", retry_after=1.0
            )

    def generate(
        self, messages: list[dict], images: Sequence[Any] = (), params: SamplingParams | None = None, **kwargs: Any
    ) -> EngineResult:
        """Prepare, submit and wait (blocking): a convenience for scripts and tests."""
        return self.submit(self.prepare(messages, images, params, **kwargs)).result()

    def _withdraw(self, handle: RequestHandle) -> None:
        """Take a cancelled *handle* out of the queue, so its place is free at once; the engine thread ends it
        (its hooks run there). A handle no longer queued is dropped by the engine thread at its next step."""
        with self._lock:
            try:
                self._pending.remove(handle)
            except ValueError:
                return
            alive = self._thread is not None and self._thread.is_alive() and not self._stopping
            if alive:
                self._withdrawn.append(handle)
                self._lock.notify_all()
        if not alive:  # no engine thread (yet, or any more) to end it: end it here
            self._end_cancelled(handle)

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
                while not (self._stopping or self._pending or self._running or self._withdrawn):
                    self._lock.wait()
                if self._stopping:
                    return
                withdrawn, self._withdrawn = self._withdrawn, []
                joiners = []
                while self._pending and self.kv.free:
                    joiners.append((self._pending.popleft(), self.kv.allocate()))
            for handle in withdrawn:
                self._end_cancelled(handle)
            self._join(joiners)
            for running in [r for r in self._running.values() if r.handle.cancelled]:
                self._leave(running, RequestCancelledError(f"request {running.handle.id} was cancelled"))
            self._prefill_chunk()
            self._decode_step()
            with self._lock:
                self._lock.notify_all()  # wakes shutdown(drain=True)

    def _join(self, joiners: list[tuple[RequestHandle, int]]) -> None:
        """Give each joiner its slot: hooks, its images' vision features (the ones not cached yet computed for
        all joiners together), prompt embeddings, a reused prefix. A failure ends its request alone."""
        admitted = [running for running in (self._admit(handle, slot) for handle, slot in joiners) if running]
        computed = self._vision_features(admitted) if len(admitted) > 1 else {}
        for running in admitted:
            prepared = running.handle.prepared
            try:
                features = self._image_features(running.images, computed)
                running.embeds = self.runner.prompt_embeddings(prepared.input_ids, features)
                if self.prefixes is not None:
                    running.prefix_key = self._prefix_key(prepared.input_ids, [key for key, *_ in running.images])
                    found = self.prefixes.longest(running.prefix_key[:-1])  # at least one token left to prefill
                    if found is not None:
                        n, keys, values = found
                        self.kv.copy_in(running.slot, keys, values)
                        running.prefilled = n
                        self._count("prefix_reused_tokens", n)
            except Exception as exc:
                logger.exception("preparing the prefill of request %s failed", running.handle.id)
                self._leave(running, generation_error(exc))

    def _admit(self, handle: RequestHandle, slot: int) -> _Running | None:
        """*handle* in its slot, its ``before_generate`` hook called and its images listed; ``None`` if it
        was cancelled or its images could not be read (it has ended then)."""
        prepared = handle.prepared
        params = prepared.params
        running = _Running(
            handle=handle,
            slot=slot,
            text=TextStream(self._detokenizer, params.stop),
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            prompt_len=prepared.prompt_tokens,
            started_at=time.monotonic(),
        )
        self._running[slot] = running
        if handle.cancelled:
            self._leave(running, RequestCancelledError(f"request {handle.id} was cancelled"))
            return None
        if not handle.started:
            handle.started = True
            self._call_hook(
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
            self._leave(running, generation_error(exc))
            return None
        return running

    def _vision_features(self, joined: list[_Running]) -> dict[bytes, torch.Tensor]:
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
            tiles = max(pixels.shape[1] for pixels, _ in full.values())
            first = next(iter(full.values()))[0]
            # [N, tiles, 3, h, w], zero tiles after each image's own (a copy each: F.pad of 5-D tensors is slow)
            pixel_values = first.new_zeros((len(full), tiles, *first.shape[2:]))
            for row, (pixels, _) in enumerate(full.values()):
                pixel_values[row, : pixels.shape[1]] = pixels[0]
            try:
                features = self.runner.image_features(pixel_values, torch.cat([size for _, size in full.values()]))
                computed.update(zip(full, features, strict=True))
                self._count("images_batched", len(full))
            except Exception:
                logger.warning("a vision call for %d images failed: each request runs its own", len(full))
        if len(low) > 1:
            try:
                computed.update(zip(low, self.runner.base_view_features(torch.cat(list(low.values()))), strict=True))
                self._count("images_batched", len(low))
            except Exception:
                logger.warning("a base-view call for %d images failed: each request runs its own", len(low))
        return computed

    def _image_features(self, images: list[Image], computed: dict[bytes, torch.Tensor]) -> list[torch.Tensor]:
        """``[n_tokens_i, hidden]`` per image: cached, *computed* for this step, or run now."""
        features = []
        for key, pixels, size, low in images:
            found = self.features.get(key) if self.features is not None else None
            if found is not None:
                self._count("image_features_reused")
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

    def _prefix_key(self, input_ids: torch.Tensor, image_keys: list[bytes]) -> tuple:
        """The prompt's ids with each image's tokens replaced by a number standing for its content."""
        ids = input_ids.reshape(-1).tolist()
        if image_keys:
            marks = iter(-1 - int.from_bytes(k[:8], "little") for k in image_keys)
            mark, previous = None, False
            for i, token in enumerate(ids):
                is_image = token == self.image_token_id
                if is_image and not previous:
                    mark = next(marks, mark)
                if is_image:
                    ids[i] = mark
                previous = is_image
        return tuple(ids)

    # --- prefill
    def _prefill_chunk(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens of the prefilling requests (``idle_prefill`` if none is
        decoding), in join order, in one forward."""
        pieces: list[_Piece] = []
        budget = self.prefill_chunk if any(r.decoding for r in self._running.values()) else self.idle_prefill
        for running in self._running.values():
            if running.embeds is None or running.finish_reason or budget == 0:
                continue
            n = min(running.prompt_len - running.prefilled, budget)
            pieces.append((running, running.embeds, n))
            budget -= n
        if not pieces:
            return
        self._count("prefill_chunks")
        try:
            self._prefill(pieces)
        except Exception as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                # smaller chunks need less memory for activations: carry on with them
                limit = max(16, sum(n for _, _, n in pieces) // 2)
                self.prefill_chunk, self.idle_prefill = min(self.prefill_chunk, limit), min(self.idle_prefill, limit)
                logger.warning("out of memory in a prefill chunk: chunks are now %d tokens at most", limit)
            if len(pieces) == 1:
                self._fail_step(pieces[0][0], exc)
                return
            for piece in pieces:  # each row writes only its own slot: re-running one alone is harmless
                try:
                    self._prefill([piece])
                except Exception as exc_alone:
                    self._fail_step(piece[0], exc_alone)

    @torch.inference_mode()
    def _prefill(self, pieces: list[_Piece]) -> None:
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
        logits = self.runner.forward(
            embeds, positions.to(self.device), write.to(self.device), last.to(self.device), rows, kv_len
        )
        done = []
        for row, (running, _, n) in enumerate(pieces):
            running.prefilled += n
            if running.prefilled == running.prompt_len:
                done.append(row)
        if not done:
            return
        finished = [pieces[row][0] for row in done]
        for running in finished:
            running.embeds = None
            if self.prefixes is not None and running.prefix_key is not None:
                self.prefixes.put(running.prefix_key, *self.kv.copy_out(running.slot, running.prompt_len))
        index = torch.tensor(done, device=self.device)
        self._sample_and_advance(finished, logits.index_select(0, index))

    # --- decode
    def _decode_step(self) -> None:
        decoding = [r for r in self._running.values() if r.decoding]
        if not decoding:
            return
        if len(decoding) > 1:
            self._count("batched_steps")
        try:
            self._decode(decoding)
        except Exception as exc:
            if len(decoding) == 1:
                self._fail_step(decoding[0], exc)
                return
            for running in decoding:  # find the culprit: each row alone (it rewrites only its own column)
                try:
                    self._decode([running])
                except Exception as exc_alone:
                    self._fail_step(running, exc_alone)

    @torch.inference_mode()
    def _decode(self, decoding: list[_Running]) -> None:
        decoding.sort(key=lambda r: r.slot)
        if len(decoding) == 1 and not self.runner.compiled:
            first, rows = decoding[0].slot, 1
        else:
            first, rows = 0, self._row_bucket(decoding[-1].slot + 1)
        # token, position, write column per row; rows without a decoding request write to the scratch column
        tokens, positions, columns = [0] * rows, [0] * rows, [self.kv.scratch] * rows
        for running in decoding:
            row = running.slot - first
            tokens[row], positions[row], columns[row] = running.generated[-1], running.position, running.position
        inputs = torch.tensor([tokens, positions, columns], dtype=torch.long).to(self.device)
        kv_len = self._kv_bucket(max(positions) + 1)
        logits = self.runner.decode(inputs[0], inputs[1], inputs[2], slice(first, first + rows), kv_len)
        if len(decoding) < rows:  # else the rows are the slots first..first+rows-1, in order: all of them
            logits = logits.index_select(0, torch.tensor([r.slot - first for r in decoding], device=self.device))
        self._sample_and_advance(decoding, logits)

    def _sample_and_advance(self, batch: list[_Running], logits: torch.Tensor) -> None:
        """Sample each request's next token from its row of ``logits [len(batch), vocab]`` (one transfer to
        the host for all), stream it, and end the requests that are done."""
        params = [r.handle.prepared.params for r in batch]
        if any(p.temperature > 0 for p in params):
            tensors = row_params(params, [len(r.generated) for r in batch], [r.seed for r in batch], self.device)
            top_p_rows = [i for i, p in enumerate(params) if p.temperature > 0 and p.top_p < 1]
            tokens, ok = sample(logits, *tensors, top_p_rows=top_p_rows)
        else:  # all greedy: one argmax, no per-row parameters to build
            tokens, ok = greedy(logits)
        tokens, ok = torch.stack([tokens, ok.long()]).tolist()
        now = time.monotonic()
        for running, token, good in zip(batch, tokens, ok, strict=True):
            if not good:
                self._leave(
                    running,
                    ServerError(
                        f"generation failed: the model's logits for request {running.handle.id} are not finite "
                        "(NaN or inf)"
                    ),
                )
                continue
            self._advance(running, token, now)

    def _advance(self, running: _Running, token: int, now: float) -> None:
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
            self._leave(running, None)

    # --- endings
    def _fail_step(self, running: _Running, exc: BaseException) -> None:
        logger.error("generation failed for request %s", running.handle.id, exc_info=exc)
        self._leave(running, generation_error(exc))

    def _leave(self, running: _Running, error: BaseException | None) -> None:
        """End a running request and free its slot."""
        if self._running.get(running.slot) is running:
            del self._running[running.slot]
            with self._lock:
                self.kv.release(running.slot)
        self._record_end(running.handle, running, error)

    def _end_cancelled(self, handle: RequestHandle) -> None:
        self._record_end(handle, None, RequestCancelledError(f"request {handle.id} was cancelled"))

    def _record_end(self, handle: RequestHandle, running: _Running | None, error: BaseException | None) -> None:
        """Count the request's ending, call ``after_generate`` and end its handle: once per request."""
        with self._stats_lock:
            if handle._recorded:  # ended already (shutdown may race the engine thread)
                return
            handle._recorded = True
        now = time.monotonic()
        prepared = handle.prepared
        started = running.started_at if running else now
        reason = (running.finish_reason if running and error is None else None) or (
            "cancelled" if isinstance(error, RequestCancelledError) else "error"
        )
        generated = list(running.generated) if running else []
        result = EngineResult(
            id=handle.id,
            text=running.text.text if running else "",
            finish_reason=reason,
            token_ids=generated,
            prompt_tokens=prepared.prompt_tokens,
            completion_tokens=len(generated),
            image_tokens=prepared.image_tokens,
            queue_seconds=started - handle.submitted_at,
            time_to_first_token=((running.first_token_at or now) - handle.submitted_at) if running else 0.0,
            total_seconds=now - handle.submitted_at,
        )
        outcome = "ok" if error is None else getattr(error, "code", "error")
        with self._stats_lock:
            self._stats[f"requests_{outcome}"] += 1
            self._stats["prompt_tokens"] += result.prompt_tokens
            self._stats["completion_tokens"] += result.completion_tokens
            self._stats["image_tokens"] += result.image_tokens
        self._call_hook(
            "llava_next_after_generate",
            request_id=handle.id,
            result={
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "image_tokens": result.image_tokens,
                "queue_seconds": result.queue_seconds,
                "time_to_first_token": result.time_to_first_token,
                "total_seconds": result.total_seconds,
                "error": None if error is None else str(error),
            },
        )
        handle._finish(result if error is None else None, error)

    def _call_hook(self, name: str, **kwargs: Any) -> None:
        try:  # asked each time: get_plugin_manager caches it, and refresh=True replaces it
            getattr(get_plugin_manager().hook, name)(**kwargs)
        except Exception:  # an observer must not break generation
            logger.exception("plugin hook %s failed", name)


def _image_detail(detail: Sequence[str] | None, count: int) -> tuple[str, ...]:
    """One ``"low"`` / ``"high"`` per image (``"auto"`` is high)."""
    from llava_next_sdk.errors import BadRequestError

    if detail is None:
        return ()
    detail = tuple(detail)
    if len(detail) != count:
        raise BadRequestError(
            f"image_detail has {len(detail)} values for {count} images; give one per image", param="messages"
        )
    for value in detail:
        if value not in ("low", "high", "auto"):
            raise BadRequestError(f"image detail must be 'low', 'high' or 'auto', got {value!r}", param="messages")
    return tuple("low" if value == "low" else "high" for value in detail)


def _longest_token_chars(tokenizer) -> int:
    """Characters one token can stand for at most: its vocabulary string's length (a bound for refusing
    prompts before tokenizing them)."""
    try:
        return max((len(token) for token in tokenizer.get_vocab() if isinstance(token, str)), default=1) or 1
    except Exception:
        return 64
