"""The scheduler: the queue, admission, the engine thread's loop, and the engine's lifecycle and counters.

:class:`Engine` is the engine's public face. Callers prepare requests on their own threads (:mod:`.prepare`)
and submit them; the queue holds them until a KV slot is free (first come, first served; a full queue refuses
with :class:`OverloadedError`). One iteration of the loop, on the engine thread:

1. under the lock: end the requests cancelled while queued; give queued requests the free KV slots;
2. the joiners join the batch (:meth:`.batch.Batch.join`), cancelled running requests leave it;
3. one prefill chunk (:meth:`.batch.Batch.prefill_step`), then one decode step (:meth:`.batch.Batch.decode_step`).

A long prompt is thus prefilled a chunk at a time between decode steps, and running streams keep flowing.
Every request ends exactly once (:meth:`Engine._record_end`: counters, ``after_generate``, its handle), whether it
finished, failed, was cancelled, or the engine stopped under it.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import copy
import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from llava_next_sdk.errors import (
    ContextLengthExceededError,
    LlavaNextError,
    OverloadedError,
    RequestCancelledError,
    ServerError,
)

from ..hooks import call_one, get_plugin_manager, in_call_order
from .batch import Batch, Running
from .handle import RequestHandle
from .kv import KVSlots
from .openmp import release_idle_workers
from .prepare import Preparer
from .request import EngineResult, PreparedRequest, SamplingParams
from .reuse import FeatureCache, PrefixStore
from .step import ModelRunner

__all__ = ["Engine", "default_device"]

logger = logging.getLogger("llava_next_plugin.engine")

#: Engines whose thread was started (weakly: a dropped engine is not kept alive), stopped at interpreter exit.
_STARTED: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _stop_engines_at_exit() -> None:
    """Stop the engine threads still running when the interpreter exits (a shared engine of the SDK's local
    transport, an engine never shut down). They are daemon threads: left running, one could be inside torch's
    or OpenMP's native code while the process tears down, which aborted it now and then ("terminate called
    without an active exception", exit status -6). Runs after the program's non-daemon threads have ended."""
    for engine in list(_STARTED):
        try:
            engine.shutdown(drain=False, timeout=5.0)
        except Exception:  # exiting anyway: the rest still get stopped
            logger.debug("stopping an engine at exit failed", exc_info=True)


GiB = 1 << 30


def default_device() -> str:
    """Where an engine loads a model when no device is given: ``"cuda"`` when a GPU is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_problem(device: Any) -> str | None:
    """What makes *device* unusable in this process (the end of a sentence naming it), or ``None``: not a torch
    device, or CUDA on a torch that sees none. Fronts check it before a model loads."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        return f"is not a torch device (e.g. cpu, cuda, cuda:1): {exc}"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return "asks for CUDA, but this torch sees no CUDA device: use cpu"
    return None


def compiles_by_default(device: torch.device | str) -> bool:
    """Whether an engine on *device* compiles its decode step when ``compile`` is not given: on CUDA only."""
    return torch.device(device).type == "cuda"


#: What an observer hook may raise without stopping the engine: any error, and asyncio's CancelledError (a
#: BaseException, raised by an async client the hook drives whose task was cancelled); not SystemExit or
#: KeyboardInterrupt, which stop the engine thread as they would any other.
_OBSERVER_FAULTS = (Exception, asyncio.CancelledError)


class Engine:
    """Continuous-batching text generation over a LLaVA-NeXT model, on its own thread.

    :param model: a ``LlavaNextForConditionalGeneration`` (ours or transformers'), in eval mode.
    :param processor: its ``LlavaNextProcessor`` (tokenizer + image processor + chat template).
    :param max_batch_size: requests holding a KV slot at most (prefilling or decoding); more wait in the queue.
    :param max_queue: requests waiting at most; beyond it :meth:`submit` raises :class:`OverloadedError`. Every
        request passes through the queue, so ``0`` refuses them all (the server commands ask for 1 or more).
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
    :param burst_window: seconds an idle engine waits, once a request arrives, for more to arrive with it (each
        arrival waits again, ``4 * burst_window`` in all), so that a burst of requests starts together: one vision
        call and one prefill forward for all, instead of its first request starting alone and the others joining
        a step later. 0: start at once.
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
        burst_window: float = 0.001,
    ) -> None:
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be at least 1")
        if not (math.isfinite(burst_window) and burst_window >= 0):
            raise ValueError(f"burst_window must be a finite number of seconds >= 0, got {burst_window!r}")
        self.burst_window = float(burst_window)
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
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
        self.kv = self._allocate_kv(text_config, kv_memory)
        reuse = reuse_memory if reuse_memory is not None else max(self.kv.nbytes // 4, 64 << 20)
        #: Bytes reused prompt prefixes and vision features hold at most, half each (0: reuse is off).
        self.reuse_bytes = max(int(reuse), 0)
        if self.reuse_bytes:
            logger.info("reuse: up to %.1f MiB of prompt prefixes and vision features", self.reuse_bytes / (1 << 20))
        if compile is None:
            compile = compiles_by_default(self.device)
        self.runner = ModelRunner(model, self.kv, image_token_id=self.image_token_id, compile=compile)
        # Tokenizers must not encode in two threads at once: each preparing thread gets its own copy of the
        # processor (no lock shared between requests); the engine thread decodes with its own copy.
        self.preparer = Preparer(
            processor,
            config,
            max_context=self.max_context,
            default_max_tokens=default_max_tokens,
            image_token_id=self.image_token_id,
            base_view_tokens=self.runner.base_view_tokens,
        )

        self._lock = threading.Condition()
        self._start_lock = threading.Lock()
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._withdrawn: list[RequestHandle] = []  # cancelled while queued: the engine thread ends them
        self._joining: list[tuple[RequestHandle, int]] = []  # taken from the queue by the step now joining them
        self._warm_ups: list[tuple[int, concurrent.futures.Future]] = []  # (context, its seconds): run on the thread
        self._batch = Batch(
            self.runner,
            self.kv,
            detokenizer=copy.deepcopy(self.tokenizer),
            model_name=self.model_name,
            eos_token_ids=self.eos_token_ids,
            max_context=self.max_context,
            prefill_chunk=prefill_chunk,
            idle_prefill=max(idle_prefill or 8 * prefill_chunk, prefill_chunk),
            prefixes=PrefixStore(self.reuse_bytes // 2) if self.reuse_bytes else None,
            features=FeatureCache(self.reuse_bytes // 2) if self.reuse_bytes else None,
            slot_lock=self._lock,
            count=self._count,
            call_hook=self._call_hook,
            record_end=self._record_end,
        )
        self._accepting = True
        self._stopping = False
        #: Why the engine stopped by itself (a fault), for the requests it refuses from then on; "" otherwise
        self._stop_reason = ""
        self._thread: threading.Thread | None = None
        # requests_<outcome> (ok, cancelled, server_error...), requests_rejected, prompt_tokens and image_tokens
        # (of requests that started: not of those that ended in the queue), completion_tokens, batched_steps
        # (decode steps with more than one request), prefill_chunks, prefix_reused_tokens, image_features_reused,
        # images_batched (vision features computed for several joiners in one call), reuse_cleared
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
    def prefill_chunk(self) -> int:
        """Prompt tokens prefilled per step at most while requests decode (lowered by an out-of-memory)."""
        return self._batch.prefill_chunk

    @property
    def idle_prefill(self) -> int:
        """Prompt tokens prefilled per step at most while none decodes (lowered by an out-of-memory)."""
        return self._batch.idle_prefill

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the static KV slots take (allocated at construction)."""
        return self.kv.nbytes

    def warm_up(self, context: int = 1) -> float:
        """Run the decode step for every batch-size bucket at a context of *context* tokens, on the engine thread
        (started here if it is not yet); its seconds, logged.

        Compiling makes two graphs here (one row; any rows), dynamic in the row count and the context length:
        nothing compiles later. Under CUDA graphs every bucket up to *context* is also recorded here, on the
        thread that replays them (torch keeps CUDA graphs per thread); a longer context's length bucket is
        recorded on first use (a capture, not a compile)."""
        self.start()
        done: concurrent.futures.Future = concurrent.futures.Future()
        if threading.current_thread() is self._thread:  # asked by a hook, on the engine thread itself
            self._warm_up_here(context, done)
            return done.result()
        with self._lock:
            if self._stopping or not self._accepting:
                raise ServerError("the engine is shutting down or stopped: it cannot warm up", status=503)
            self._warm_ups.append((context, done))
            self._lock.notify_all()
        return done.result()

    def _warm_up_here(self, context: int, done: concurrent.futures.Future) -> None:
        """The engine thread's part of :meth:`warm_up`."""
        try:
            seconds = self.runner.warm_up(context)
        except Exception as exc:  # the caller hears it; the engine thread carries on
            done.set_exception(exc)
            return
        logger.info("decode step warm-up (%s): %.1f s", "compiled" if self.runner.compiled else "eager", seconds)
        done.set_result(seconds)

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
        """Start the engine thread (once, however many threads call this at the same time).

        The thread that starts it lets its idle OpenMP workers go (:mod:`.openmp`): on CPU the engine thread's
        own then keep spinning between ops instead of sleeping. (Only then: :meth:`submit` calls this for every
        request, and a submitting thread's next parallel op would have to start its workers again.)"""
        if self._thread is not None:
            return self
        with self._start_lock:
            if self._thread is None and not self._stopping:
                release_idle_workers()
                thread = threading.Thread(target=self._run, name="llava-next-engine", daemon=True)
                thread.start()  # may raise ("can't start new thread"): then a later call tries again
                self._thread = thread
                _STARTED.add(self)
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work; with *drain*, let queued and running requests finish first. *timeout* bounds
        the whole call (``None``: no bound). Whatever is still running when the engine stops is ended. Called
        on the engine thread (by a plugin hook) it does not wait, since only that thread could end the work."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        with self._lock:
            self._accepting = False
            # drained: nothing queued, joining or running; not waited for on the engine thread (a hook), which
            # alone could empty the batch
            if drain and threading.current_thread() is not self._thread:
                while self._pending or self._joining or self._batch.running:
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
                + [(r.handle, r) for r in self._batch.take_all()]
                + [(h, None) for h, _ in self._joining]  # those that joined are in the batch: ended once, above
            )
            self._joining = []
            self._pending.clear()
            self._withdrawn = []
            warm_ups, self._warm_ups = self._warm_ups, []
            self._lock.notify_all()  # wakes a shutdown waiting for the queue to drain: it is empty now
        for _, done in warm_ups:
            done.set_exception(error)
        for handle, running in leftovers:
            self._record_end(
                handle,
                running,
                RequestCancelledError(f"request {handle.id} was cancelled") if handle.cancelled else error,
            )

    @property
    def stop_reason(self) -> str:
        """Why the engine stopped by itself (no usable KV slot, its thread failed), or ``""``: not stopped, or
        shut down."""
        return self._stop_reason

    @property
    def accepting(self) -> bool:
        """Whether :meth:`submit` takes new work (False once shutting down)."""
        return self._accepting

    @property
    def stopped(self) -> bool:
        """Whether the engine has stopped for good: shut down (after its drain), stopped by a fault
        (:attr:`stop_reason`), or its thread ended. An engine still draining is not stopped: it holds its model and
        finishes its requests."""
        thread = self._thread
        return self._stopping or bool(self._stop_reason) or (thread is not None and not thread.is_alive())

    @property
    def queue_depth(self) -> int:
        """Requests waiting to join the batch."""
        return len(self._pending)

    @property
    def batch_size(self) -> int:
        """Requests holding a KV slot now (prefilling or decoding)."""
        return len(self._batch)

    @property
    def usable_slots(self) -> int:
        """KV slots in use or free: all of them (``max_batch_size``) but those retired because their memory could
        not be cleared after a device error; at 0 the engine stops (:attr:`stop_reason`)."""
        return self.kv.usable

    @property
    def stats(self) -> collections.Counter:
        """A copy of the engine's counters (see :meth:`stats_snapshot`)."""
        with self._stats_lock:
            return collections.Counter(self._stats)

    def clear_reuse(self) -> None:
        """Forget the vision features and prompt prefixes kept for reuse, before the next request starts. The
        engine empties them by itself when the model's weights change as torch records it (see
        :func:`~.reuse.weights_version`); call this after changes it cannot see, such as writes through
        ``parameter.data``. Safe from any thread."""
        self._batch.forget_reuse = True

    def stats_snapshot(self) -> dict[str, int]:
        """The engine's counters, copied under their lock (safe from any thread): ``requests_<outcome>``,
        ``requests_rejected``, ``prompt_tokens``, ``completion_tokens``, ``image_tokens``, ``batched_steps``,
        ``prefill_chunks``, ``prefix_reused_tokens``, ``image_features_reused``, ``images_batched``,
        ``reuse_cleared`` (the reuse caches emptied after the weights changed)."""
        with self._stats_lock:
            return {key: int(value) for key, value in self._stats.items()}

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    # --- submission
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

        The calling thread's idle OpenMP workers are let go afterwards (see :meth:`start`).
        """
        try:
            return self.preparer(messages, images, params or SamplingParams(), prompt, image_detail)
        finally:
            release_idle_workers()  # a large image's tensors ran on OpenMP workers of this thread: let them go

    @property
    def max_prompt_chars(self) -> int:
        """The most prompt characters the context could hold: a longer prompt is refused before it is tokenized,
        by :meth:`prepare` and by the fronts' validation."""
        return self.preparer.max_prompt_chars

    def submit(self, prepared: PreparedRequest, request_id: str | None = None) -> RequestHandle:
        """Queue a prepared request; returns its handle at once. Thread-safe.

        :raises OverloadedError: the queue is full (retry later) or the engine is shutting down.
        :raises ContextLengthExceededError: *prepared* (by another engine) does not fit this engine's context.
        :raises ServerError: the engine thread could not start (the request is not queued).
        """
        if prepared.prompt_tokens + prepared.max_tokens > self.max_context:  # prepared by another engine
            raise ContextLengthExceededError(
                f"the prompt ({prepared.prompt_tokens} tokens) plus max_tokens ({prepared.max_tokens}) exceeds this "
                f"engine's context of {self.max_context} tokens; prepare the request with this engine",
                param="messages",
            )
        handle = RequestHandle(request_id or f"chatcmpl-{uuid.uuid4().hex}", prepared, self)
        try:
            self.start()
        except RuntimeError as exc:  # no thread to run it: refuse it rather than queue it for nobody
            raise ServerError(f"the engine thread could not start ({exc}); retry later") from exc
        with self._lock:
            self._refuse_if_full()
            self._pending.append(handle)
            self._lock.notify_all()
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
            if self._stop_reason:  # stopped by a fault: unavailable for good (another replica may serve it)
                raise ServerError(self._stop_reason, status=503)
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
            # what requests are told (clients may see it): the error itself is in the log only
            self._stop_reason = "the engine stopped after an unexpected error (in its log); restart it"
            self._end_leftovers(ServerError(f"the engine stopped: {exc!r}"))
            raise
        self._end_leftovers(ServerError("the engine shut down before this request finished", status=503))

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._pending or self._batch.running or self._withdrawn or self._warm_ups):
                    self._lock.wait()
                self._let_a_burst_arrive()
                if self._stopping:
                    return
                warm_ups, self._warm_ups = self._warm_ups, []
                withdrawn, self._withdrawn = self._withdrawn, []
                joiners = []
                while self._pending and self.kv.free:
                    joiners.append((self._pending.popleft(), self.kv.allocate()))
                self._joining = joiners  # out of the queue, not yet in the batch: a drain waits for them too
            for context, done in warm_ups:
                self._warm_up_here(context, done)
            for handle in withdrawn:
                self._end_cancelled(handle)
            self._batch.join(joiners)
            self._joining = []
            self._batch.leave_cancelled()
            self._batch.prefill_step()
            self._batch.decode_step()
            if not self.kv.usable:
                # every slot is retired (device errors): nothing could ever run again, and queued requests would
                # wait forever. Stop, as a dead engine thread does: they end with this error, /health turns 503
                # and Ray Serve's health check replaces the replica
                self._stop_reason = (
                    f"the engine stopped: all {self.kv.slots} KV slots are retired (their memory could not be "
                    "cleared after failed requests, a device error; see the log); restart it"
                )
                logger.error(self._stop_reason)
                self._end_leftovers(ServerError(self._stop_reason, status=503))
                return
            if not self._batch.running and not self._pending:
                # idle, likely until the next request: let this thread's OpenMP workers go too, so that they
                # do not slow the application's own CPU work (engine/openmp.py); the next step starts them again
                release_idle_workers()
            with self._lock:
                self._lock.notify_all()  # wakes shutdown(drain=True)

    def _let_a_burst_arrive(self) -> None:  # on the engine thread, with self._lock held
        """When an idle engine has requests to start: wait until ``burst_window`` has passed since the last one
        arrived (``4 * burst_window`` since the first at most), or no more can be admitted, or the engine stops."""
        if self.burst_window <= 0 or self._batch.running or not self._pending:
            return
        cap = self._pending[0].submitted_at + 4 * self.burst_window
        while not self._stopping and self._pending and len(self._pending) < min(self.kv.free, self.max_queue):
            left = min(self._pending[-1].submitted_at + self.burst_window, cap) - time.monotonic()
            if left <= 0:
                return
            self._lock.wait(left)  # submit notifies

    # --- endings
    def _end_cancelled(self, handle: RequestHandle) -> None:
        self._record_end(handle, None, RequestCancelledError(f"request {handle.id} was cancelled"))

    def _record_end(self, handle: RequestHandle, running: Running | None, error: BaseException | None) -> None:
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
            if running is not None:  # it started: its prompt was (or began to be) prefilled, or reused
                self._stats["prompt_tokens"] += result.prompt_tokens
                self._stats["image_tokens"] += result.image_tokens
            self._stats["completion_tokens"] += result.completion_tokens
        try:
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
        finally:  # an observer raising what no Exception handler takes (SystemExit...) still ends the request
            handle._finish(result if error is None else None, error)

    def _call_hook(self, name: str, **kwargs: Any) -> None:
        """Call every plugin's *name* observer, each on its own: one that raises is logged, and neither generation
        nor the other observers are affected (pluggy's own call would stop at the first that raises)."""
        hook = getattr(get_plugin_manager().hook, name)  # asked each time: refresh=True replaces the manager
        implementations = in_call_order(hook)
        if implementations is None:  # a wrapper: pluggy's own call
            try:
                hook(**kwargs)
            except _OBSERVER_FAULTS:
                logger.exception("plugin hook %s failed", name)
            return
        for impl in implementations:
            try:
                call_one(impl, kwargs)
            except _OBSERVER_FAULTS:  # an observer must not break generation
                logger.exception("plugin %s's hook %s failed", impl.plugin_name, name)
