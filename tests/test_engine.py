"""The batching engine: its output equals ``model.generate``, batching changes nothing, streams are right,
cancellation, stop strings, sampling, limits and hooks behave as users rely on."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import anyio
import checkpoints
import pytest
import torch
import transformers
from checkpoints import ask, photo, reference_greedy, wait_for
from llava_next_sdk.errors import (
    BadRequestError,
    ContextLengthExceededError,
    OverloadedError,
    RequestCancelledError,
    ServerError,
)

from llava_next_plugin.engine import Engine, SamplingParams
from llava_next_plugin.engine.detokenizer import TextStream
from llava_next_plugin.hooks import get_plugin_manager, hookimpl

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def test_greedy_output_equals_model_generate_for_a_request_alone(engine, reference):
    model, processor = reference
    prepared = engine.prepare(
        ask("What is in the picture?"), [photo(80, 50)], SamplingParams(max_tokens=10, temperature=0)
    )
    result = engine.submit(prepared).result(timeout=120)
    expected = reference_greedy(model, prepared, 10)
    assert result.token_ids == expected
    assert result.text == processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert result.finish_reason in ("length", "stop")
    assert result.prompt_tokens == prepared.input_ids.shape[1]
    assert result.image_tokens == int((prepared.input_ids == checkpoints.IMAGE_TOKEN_ID).sum()) > 0
    assert result.completion_tokens == len(expected)
    assert 0 <= result.queue_seconds <= result.time_to_first_token <= result.total_seconds


def test_concurrent_requests_with_mixed_images_are_batched_and_match_their_solo_outputs(engine):
    requests = [
        (ask("What is this?"), [photo(80, 50)]),
        (ask("Describe it."), [photo(30, 90)]),
        ([{"role": "user", "content": [{"type": "text", "text": "Tell me a story about a cat"}]}], []),
        (ask("Compare them.", images=2), [photo(64, 64), photo(90, 30)]),
    ]
    solo = [engine.generate(m, i, GREEDY) for m, i in requests]
    steps_before = engine.stats["batched_steps"]
    prepared = [engine.prepare(m, i, GREEDY) for m, i in requests]
    handles = [engine.submit(p) for p in prepared]  # all waiting when a step starts: they join together
    together = [h.result(timeout=120) for h in handles]
    assert engine.stats["batched_steps"] > steps_before
    for alone, batched in zip(solo, together, strict=True):
        assert batched.token_ids == alone.token_ids
        assert batched.text == alone.text
        assert (batched.prompt_tokens, batched.image_tokens) == (alone.prompt_tokens, alone.image_tokens)


def test_a_request_joining_a_running_batch_gets_its_solo_output(engine):
    long = SamplingParams(max_tokens=24, temperature=0)
    alone_long = engine.generate(ask("A long answer please"), [photo(64, 64)], long)
    alone_short = engine.generate(ask("Short"), [photo(40, 90)], GREEDY)
    first = engine.submit(engine.prepare(ask("A long answer please"), [photo(64, 64)], long))
    stream = iter(first)  # kept: leaving a stream unfinished cancels its request
    next(stream)  # it is decoding now
    second = engine.submit(engine.prepare(ask("Short"), [photo(40, 90)], GREEDY))
    assert second.result(timeout=120).token_ids == alone_short.token_ids
    assert first.result(timeout=120).token_ids == alone_long.token_ids


def test_streamed_deltas_add_up_to_the_result_in_threads_asyncio_and_trio(engine):
    def prepared():
        return engine.prepare(ask("Stream this"), [photo(50, 50)], SamplingParams(max_tokens=12, temperature=0))

    handle = engine.submit(prepared())
    deltas = list(handle)
    assert "".join(deltas) == handle.result().text and len(deltas) > 1

    async def consume():
        h = engine.submit(prepared())
        parts = [d async for d in h]
        return parts, (await h.aresult()).text

    for backend in ("asyncio", "trio"):
        parts, text = anyio.run(consume, backend=backend)
        assert "".join(parts) == text == handle.result().text


def test_two_event_loops_in_two_threads_share_one_engine(engine):
    expected = engine.generate(ask("Shared"), [photo(50, 70)], GREEDY).text
    results = {}

    def run(backend):
        async def go():
            h = engine.submit(engine.prepare(ask("Shared"), [photo(50, 70)], GREEDY))
            return (await h.aresult()).text

        results[backend] = anyio.run(go, backend=backend)

    threads = [threading.Thread(target=run, args=(b,)) for b in ("asyncio", "trio")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {"asyncio": expected, "trio": expected}


def test_cancelling_a_request_drops_it_and_the_rest_of_the_batch_finishes(engine):
    other_alone = engine.generate(ask("Other"), [photo(60, 40)], GREEDY)
    doomed = engine.submit(
        engine.prepare(ask("Go on forever"), [photo(50, 50)], SamplingParams(max_tokens=400, temperature=0))
    )
    other = engine.submit(engine.prepare(ask("Other"), [photo(60, 40)], GREEDY))
    stream = iter(doomed)
    next(stream)
    doomed.cancel()
    with pytest.raises(RequestCancelledError):
        doomed.result(timeout=60)
    assert other.result(timeout=120).token_ids == other_alone.token_ids
    assert wait_for(lambda: engine.batch_size == 0)


def test_cancelling_the_async_reader_cancels_the_request(engine):
    async def main():
        h = engine.submit(engine.prepare(ask("Long"), [photo(50, 50)], SamplingParams(max_tokens=400, temperature=0)))
        with anyio.move_on_after(0.3):
            async for _ in h:
                pass
        return h

    handle = anyio.run(main)
    with pytest.raises(RequestCancelledError):
        handle.result(timeout=60)


def test_stop_strings_end_the_text_before_them_even_across_tokens(engine):
    full = engine.generate(ask("Say something"), [photo(70, 70)], SamplingParams(max_tokens=16, temperature=0))
    cut = len(full.text) // 2
    stop = full.text[cut : cut + 3]
    assert stop.strip() and stop not in full.text[:cut]
    handle = engine.submit(
        engine.prepare(
            ask("Say something"), [photo(70, 70)], SamplingParams(max_tokens=16, temperature=0, stop=("zzzz", stop))
        )
    )
    deltas = list(handle)
    result = handle.result()
    assert result.text == full.text[:cut] == "".join(deltas)
    assert result.finish_reason == "stop"


def test_incremental_detokenization_handles_multibyte_pieces(reference):
    tokenizer = reference[1].tokenizer
    text = "Café 東京 — 🐈‍⬛ naïve façade 😀!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stop=())
    deltas = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_the_detokenizers_direct_decode_gives_the_tokenizers_text_and_a_cleaning_tokenizer_keeps_its_own(reference):
    import copy
    import random

    from llava_next_plugin.engine.detokenizer import decoder_of

    tokenizer = reference[1].tokenizer
    decode = decoder_of(tokenizer)
    assert decode.func == tokenizer._tokenizer.decode  # the Rust tokenizer, called directly
    text = "[INST] <image>\nCafé 東京 — 🐈‍⬛ naïve, façade ; 😀 ! [/INST] Yes ."
    ids = tokenizer.encode(text, add_special_tokens=True)
    ids += [tokenizer.eos_token_id, tokenizer.unk_token_id, 32000]  # special tokens are skipped alike
    rng = random.Random(0)
    windows = [ids[a:b] for a in range(len(ids)) for b in range(a, len(ids) + 1)]
    windows += [[rng.randrange(32064) for _ in range(rng.randrange(1, 6))] for _ in range(300)]
    assert [decode(w) for w in windows] == [tokenizer.decode(w, skip_special_tokens=True) for w in windows]
    cleaning = copy.deepcopy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    assert decoder_of(cleaning).func == cleaning.decode  # its own decode (which cleans up) runs


def test_seeded_sampling_repeats_and_a_tiny_top_p_is_greedy(engine):
    def sample(seed):
        params = SamplingParams(max_tokens=8, temperature=1.5, seed=seed)
        return engine.generate(ask("Sample"), [photo(50, 50)], params).token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy = engine.generate(ask("Sample"), [photo(50, 50)], GREEDY).token_ids
    nucleus = engine.generate(
        ask("Sample"), [photo(50, 50)], SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=3)
    ).token_ids
    assert nucleus == greedy


def test_every_64_bit_seed_samples_and_repeats(engine):
    """The SDK takes seeds up to 2**64 - 1; those from 2**63 do not fit int64 as they are, and sample too."""

    def sample(seed):
        params = SamplingParams(max_tokens=8, temperature=1.5, seed=seed)
        return engine.generate(ask("Sample"), [photo(50, 50)], params).token_ids

    for seed in (2**63 - 1, 2**63, 2**64 - 1):
        assert sample(seed) == sample(seed)
    assert len({tuple(sample(seed)) for seed in (2**63 - 1, 2**63, 2**64 - 1)}) > 1


def test_sampling_params_are_checked_as_the_sdk_checks_them_and_none_means_the_default():
    assert SamplingParams(stop="END").stop == ("END",)  # one string is one stop, not its characters
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    none = SamplingParams(temperature=None, top_p=None, stop=None)
    assert (none.temperature, none.top_p, none.stop) == (1.0, 1.0, ())
    for bad, name in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
    ]:
        with pytest.raises(BadRequestError) as info:
            SamplingParams(**bad)
        assert info.value.param == name and name in str(info.value)


def test_unseeded_sampling_leaves_the_global_torch_rng_alone(engine):
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = engine.generate(ask("Sample"), [photo(50, 50)], SamplingParams(max_tokens=8, temperature=1.5))
    second = engine.generate(ask("Sample"), [photo(50, 50)], SamplingParams(max_tokens=8, temperature=1.5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(4), expected)
    assert first.token_ids != second.token_ids  # each unseeded request still gets a seed of its own


def test_max_tokens_beyond_the_context_is_refused_with_the_numbers(engine):
    with pytest.raises(ContextLengthExceededError, match="context length of 4096") as info:
        engine.prepare(ask("Hi"), [photo(50, 50)], SamplingParams(max_tokens=5000))
    assert info.value.param == "max_tokens" and info.value.status == 400


class Gate:
    """A plugin that holds the engine thread in ``before_generate`` until released, and records the hooks."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.started: list[dict] = []
        self.ended: list[dict] = []

    @hookimpl
    def llava_next_before_generate(self, request_id, request):
        self.started.append({"id": request_id, **request})
        self.open.wait(60)

    @hookimpl
    def llava_next_after_generate(self, request_id, result):
        self.ended.append({"id": request_id, **result})


@contextlib.contextmanager
def one_slot_engine_held_on_its_running_request(reference):
    """An engine with one batch slot and a queue of 2, its slot taken by a request that waits on a
    :class:`Gate` hook until ``gate.open`` is set. Yields ``(engine, gate, make_request, running)``."""
    model, processor = reference
    engine = Engine(model, processor, max_batch_size=1, max_queue=2).start()
    gate = Gate()
    manager = get_plugin_manager()
    manager.register(gate)
    try:

        def request():
            return engine.prepare(ask("Queue"), [photo(40, 40)], SamplingParams(max_tokens=2, temperature=0))

        running = engine.submit(request())
        wait_for(lambda: gate.started)
        yield engine, gate, request, running
    finally:
        manager.unregister(gate)
        engine.shutdown()


def test_a_full_queue_refuses_work_as_overloaded_and_hooks_see_every_request(reference):
    with one_slot_engine_held_on_its_running_request(reference) as (engine, gate, request, running):
        queued = [engine.submit(request()), engine.submit(request())]
        assert engine.queue_depth == 2
        with pytest.raises(OverloadedError, match="queue is full") as info:
            engine.submit(request())
        assert info.value.status == 429 and info.value.retry_after
        gate.open.set()
        results = [h.result(timeout=120) for h in [running, *queued]]
    assert [s["id"] for s in gate.started] == [h.id for h in [running, *queued]]
    assert gate.started[0]["num_images"] == 1 and gate.started[0]["max_tokens"] == 2
    ended = {e["id"]: e for e in gate.ended}
    for handle, result in zip([running, *queued], results, strict=True):
        assert ended[handle.id]["error"] is None
        assert ended[handle.id]["completion_tokens"] == result.completion_tokens == 2


def test_cancelled_queued_requests_free_their_queue_places_at_once_and_end_cancelled(reference):
    with one_slot_engine_held_on_its_running_request(reference) as (engine, gate, request, running):
        queued = [engine.submit(request()), engine.submit(request())]
        for handle in queued:
            handle.cancel()
        assert engine.queue_depth == 0
        late = engine.submit(request())  # the batch's one slot is still taken: it waits in the queue
        gate.open.set()
        results = [running.result(timeout=120), late.result(timeout=120)]
        for handle in queued:
            with pytest.raises(RequestCancelledError):
                handle.result(timeout=1)
            handle.cancel()  # again: a no-op
    assert [s["id"] for s in gate.started] == [running.id, late.id]
    ended = [(e["id"], e["finish_reason"]) for e in gate.ended]
    assert sorted(ended) == sorted(
        [(h.id, "cancelled") for h in queued]
        + [(running.id, results[0].finish_reason), (late.id, results[1].finish_reason)]
    )
    assert engine.stats["requests_cancelled"] == 2 and engine.stats["requests_rejected"] == 0


def test_shutdown_drains_running_requests_then_refuses_new_ones(reference):
    model, processor = reference
    engine = Engine(model, processor).start()
    gate = Gate()
    manager = get_plugin_manager()
    manager.register(gate)
    try:
        handle = engine.submit(
            engine.prepare(ask("Drain"), [photo(40, 40)], SamplingParams(max_tokens=6, temperature=0))
        )
        wait_for(lambda: gate.started)
        drainer = threading.Thread(target=engine.shutdown, kwargs={"drain": True, "timeout": 60})
        drainer.start()
        wait_for(lambda: not engine.accepting)
        # draining: refusing work, yet not stopped (a local client must not replace an engine finishing requests)
        assert not engine.stopped and not handle.done
        gate.open.set()
        drainer.join(60)
    finally:
        gate.open.set()
        manager.unregister(gate)
    assert engine.stopped and not drainer.is_alive()
    assert handle.result(timeout=1).completion_tokens == 6
    with pytest.raises(OverloadedError, match="shutting down"):
        engine.submit(engine.prepare(ask("Late"), [photo(40, 40)], GREEDY))


def test_our_model_class_runs_in_the_engine_and_matches_the_reference(tiny_checkpoint, engine):
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)  # ours after import
    assert type(model).__module__.startswith("llava_next_plugin")
    ours = Engine(model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint)).start()
    try:
        requests = [(ask("One"), [photo(80, 50)]), (ask("Two"), [photo(30, 90)])]
        handles = [ours.submit(ours.prepare(m, i, GREEDY)) for m, i in requests]
        got = [h.result(timeout=120).token_ids for h in handles]
        expected = [engine.generate(m, i, GREEDY).token_ids for m, i in requests]
        assert got == expected
    finally:
        ours.shutdown()


def test_a_request_the_model_rejects_fails_alone_and_the_engine_keeps_serving(engine):
    from llava_next_sdk.errors import ServerError

    good_alone = engine.generate(ask("Fine"), [photo(60, 60)], GREEDY)
    prepared = engine.prepare(ask("Broken"), [photo(80, 50)], GREEDY)
    # image tokens no longer match the image's features
    bad = dataclasses.replace(prepared, image_sizes=torch.tensor([[500, 20]]))
    handles = [engine.submit(bad), engine.submit(engine.prepare(ask("Fine"), [photo(60, 60)], GREEDY))]
    with pytest.raises(ServerError, match="generation failed"):
        handles[0].result(timeout=120)
    assert handles[1].result(timeout=120).token_ids == good_alone.token_ids
    assert engine.generate(ask("Fine"), [photo(60, 60)], GREEDY).token_ids == good_alone.token_ids


def test_prepare_hashes_the_images_on_the_callers_thread_and_equal_pixels_get_equal_keys(engine):
    from llava_next_plugin.engine.reuse import image_key

    prepared = engine.prepare(ask("Two", images=3), [photo(60, 40), photo(60, 40), photo(40, 60)], GREEDY)
    assert "images" in vars(prepared)  # computed by prepare: the engine thread only reads it
    keys = [key for key, *_ in prepared.images]
    assert keys[0] == keys[1] != keys[2]
    assert keys[2] == image_key(prepared.pixel_values[2:3], prepared.image_sizes[2].tolist() + [False])


class Recorder:
    """A plugin that records the before/after hooks it sees."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.ended: list[dict] = []

    @hookimpl
    def llava_next_before_generate(self, request_id, request):
        self.started.append(request_id)

    @hookimpl
    def llava_next_after_generate(self, request_id, result):
        self.ended.append({"id": request_id, **result})


def test_a_plugin_registered_on_a_refreshed_manager_observes_a_running_engine(engine):
    engine.generate(ask("Warm"), [photo(40, 40)], GREEDY)  # the engine has called its hooks already
    recorder = Recorder()
    manager = get_plugin_manager(refresh=True)
    manager.register(recorder)
    try:
        handle = engine.submit(engine.prepare(ask("Seen"), [photo(40, 40)], GREEDY))
        result = handle.result(timeout=120)
    finally:
        manager.unregister(recorder)
    assert recorder.started == [handle.id]
    assert [(e["id"], e["error"], e["completion_tokens"]) for e in recorder.ended] == [
        (handle.id, None, result.completion_tokens)
    ]


class Broken:
    """An observer whose hooks raise."""

    @hookimpl
    def llava_next_before_generate(self, request_id, request):
        raise KeyError("broken before")

    @hookimpl
    def llava_next_after_generate(self, request_id, result):
        raise KeyError("broken after")


def test_an_observer_that_raises_neither_fails_the_request_nor_silences_the_other_observers(engine, caplog):
    recorder, broken = Recorder(), Broken()
    manager = get_plugin_manager()
    manager.register(recorder)
    manager.register(broken)  # registered last: pluggy calls it first
    try:
        handle = engine.submit(engine.prepare(ask("Observed"), [photo(40, 40)], GREEDY))
        result = handle.result(timeout=120)
    finally:
        manager.unregister(broken)
        manager.unregister(recorder)
    assert result.finish_reason in ("stop", "length")
    assert recorder.started == [handle.id] and [e["id"] for e in recorder.ended] == [handle.id]
    assert "broken before" in caplog.text and "broken after" in caplog.text


def raise_oom_on_decode_at(model, position: int) -> None:
    """Make *model*'s language model raise like a CUDA OOM on any decode step (one new token per row) in which
    a row is at *position*."""

    def check(module, args, kwargs):
        embeds, position_ids = kwargs.get("inputs_embeds"), kwargs.get("position_ids")
        if embeds is not None and embeds.shape[1] == 1 and bool((position_ids == position).any()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.model.language_model.register_forward_pre_hook(check, with_kwargs=True)


def test_a_decode_step_that_raises_fails_its_batch_with_a_typed_error_and_the_engine_keeps_serving(
    tiny_checkpoint, engine
):
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    failing = Engine(model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint), max_batch_size=1).start()
    recorder = Recorder()
    manager = get_plugin_manager()
    manager.register(recorder)
    try:

        def request(max_tokens):
            return failing.prepare(ask("Same"), [photo(40, 40)], SamplingParams(max_tokens=max_tokens, temperature=0))

        long = request(8)
        raise_oom_on_decode_at(model, long.prompt_tokens + 3)  # the long request's 4th decode step raises
        handles = [failing.submit(long), failing.submit(request(2)), failing.submit(request(2))]
        with pytest.raises(OverloadedError, match="ran out of memory") as info:
            handles[0].result(timeout=120)
        assert info.value.status == 503
        expected = engine.generate(ask("Same"), [photo(40, 40)], SamplingParams(max_tokens=2, temperature=0))
        assert [h.result(timeout=120).token_ids for h in handles[1:]] == [expected.token_ids] * 2
        assert failing._thread.is_alive()
        assert (
            failing.generate(ask("Same"), [photo(40, 40)], SamplingParams(max_tokens=2, temperature=0)).token_ids
            == expected.token_ids
        )
    finally:
        manager.unregister(recorder)
        failing.shutdown(drain=False)
    ended = {e["id"]: e for e in recorder.ended}
    assert "out of memory" in ended[handles[0].id]["error"]
    assert [ended[h.id]["error"] for h in handles[1:]] == [None, None]


def test_shutdown_without_drain_ends_queued_and_running_requests_with_a_typed_error(reference):
    model, processor = reference
    engine = Engine(model, processor, max_batch_size=1).start()
    gate = Gate()
    manager = get_plugin_manager()
    manager.register(gate)
    try:

        def request():
            return engine.prepare(ask("Stop"), [photo(40, 40)], SamplingParams(max_tokens=50, temperature=0))

        running = engine.submit(request())
        wait_for(lambda: gate.started)
        handles = [running, engine.submit(request()), engine.submit(request())]
        stopper = threading.Thread(target=engine.shutdown, kwargs={"drain": False})
        stopper.start()
        wait_for(lambda: not engine.accepting)
        gate.open.set()  # the running request's prefill ends; the engine then stops
        stopper.join(60)
    finally:
        gate.open.set()
        manager.unregister(gate)
    assert not stopper.is_alive() and not engine._thread.is_alive()
    for handle in handles:
        with pytest.raises(ServerError, match="shut down before this request finished") as info:
            handle.result(timeout=1)
        assert info.value.status == 503
    ended = {e["id"]: e for e in gate.ended}
    assert sorted(ended) == sorted(h.id for h in handles)
    assert all("shut down" in e["error"] for e in ended.values())
    with pytest.raises(OverloadedError, match="shutting down"):
        engine.submit(request())


def test_a_row_that_fails_in_a_batched_decode_step_ends_alone_and_the_others_continue(tiny_checkpoint, engine):
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    failing = Engine(model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint), max_batch_size=4).start()
    try:
        long_text = "Please describe every single detail of this picture, the colours, the shapes and the mood"
        requests = [(ask(long_text), [photo(40, 40)]), (ask("Same", images=0), []), (ask(long_text), [photo(60, 40)])]
        params = SamplingParams(max_tokens=8, temperature=0)
        prepared = [failing.prepare(m, i, params) for m, i in requests]
        culprit = prepared[1]
        assert min(p.prompt_tokens for p in prepared[::2]) > culprit.prompt_tokens + 8
        raise_oom_on_decode_at(model, culprit.prompt_tokens + 3)  # only the short prompt's row gets there
        handles = [failing.submit(p) for p in prepared]  # they join together and decode in one batch
        with pytest.raises(OverloadedError, match="ran out of memory") as info:
            handles[1].result(timeout=120)
        assert info.value.status == 503 and info.value.retry_after
        for handle, (messages, images) in zip(handles[::2], requests[::2], strict=True):
            assert handle.result(timeout=120).token_ids == engine.generate(messages, images, params).token_ids
        assert failing.stats_snapshot()["batched_steps"] > 0
    finally:
        failing.shutdown(drain=False)


def nan_in_prefill_of(prompt_tokens: int):
    """A forward hook for a decoder layer that fills its output with NaN in the prefill of a *prompt_tokens* prompt
    (every later layer, and the logits, are NaN then)."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] == prompt_tokens:
            hidden.fill_(float("nan"))

    return hook


def test_a_request_whose_cache_went_nan_fails_alone_and_leaves_neither_its_slot_nor_the_prefix_store_poisoned(
    tiny_checkpoint, engine
):
    """A NaN in a slot's stale columns is not hidden by the additive mask (0 * NaN): the failed request's columns
    are zeroed when it leaves, and a prompt whose logits came out non-finite is not kept for reuse."""
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with torch.inference_mode():  # its KV slots are inference tensors, which only inference mode may write
        poisoned = Engine(model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint), max_batch_size=2)
    poisoned.start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0)
        faulty = poisoned.prepare(ask("word " * 60, images=0), [], params)

        hook = model.model.language_model.layers[0].register_forward_hook(nan_in_prefill_of(faulty.prompt_tokens))
        try:
            with pytest.raises(ServerError, match="not finite"):
                poisoned.submit(faulty).result(timeout=120)
        finally:
            hook.remove()
        assert poisoned.stats_snapshot().get("prefix_reused_tokens", 0) == 0
        short, long = (ask("hi", images=0), []), (ask("story " * 80, images=0), [])
        # the short one takes the failed request's slot and decodes next to a longer one, reading its old columns
        handles = [poisoned.submit(poisoned.prepare(m, i, params)) for m, i in (short, long)]
        for handle, (messages, images) in zip(handles, (short, long), strict=True):
            assert handle.result(timeout=120).token_ids == engine.generate(messages, images, params).token_ids
        again = poisoned.generate(ask("word " * 60, images=0), [], params)  # the same prompt: not a NaN prefix
        assert again.token_ids == engine.generate(ask("word " * 60, images=0), [], params).token_ids
    finally:
        poisoned.shutdown(drain=False)


def test_slots_that_cannot_be_cleared_are_retired_and_an_engine_left_with_none_stops_with_a_clear_error(
    tiny_checkpoint, engine
):
    """A failed request's slot that cannot be zeroed (a device error) is never handed out again; the other slots
    keep serving. Once every slot is retired the engine stops rather than hold its queue forever: queued and new
    requests get a 503 ServerError that says why (another replica may serve them), and ``stopped`` turns true
    (``/health`` and Ray Serve's health check see it). The fault: layer 0's keys lose the scratch column, so
    zeroing a slot raises (IndexError)."""
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with torch.inference_mode():  # its KV slots are inference tensors, which only inference mode may write
        fragile = Engine(model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint), max_batch_size=2)
    fragile.kv.keys[0] = fragile.kv.keys[0][:, :, :-1]  # the same memory, without column max_len
    params = SamplingParams(max_tokens=4, temperature=0)
    faulty = fragile.prepare(ask("word " * 60, images=0), [], params)

    def error_of(submit) -> ServerError:
        with pytest.raises(ServerError) as info:  # refused at once, or ended once queued
            submit().result(timeout=120)
        return info.value

    hook = model.model.language_model.layers[0].register_forward_hook(nan_in_prefill_of(faulty.prompt_tokens))
    fragile.start()
    try:
        with pytest.raises(ServerError, match="not finite"):
            fragile.submit(faulty).result(timeout=120)
        assert fragile.usable_slots == 1 and not fragile.stopped
        normal = (ask("hi", images=0), [])
        assert fragile.generate(*normal, params).token_ids == engine.generate(*normal, params).token_ids
        again = fragile.prepare(ask("word " * 60, images=0), [], params)
        waiting = fragile.prepare(*normal, params)
        first = fragile.submit(again)
        queued = error_of(lambda: fragile.submit(waiting))  # behind it: the one slot left is its
        with pytest.raises(ServerError, match="not finite"):
            first.result(timeout=120)
        assert "all 2 KV slots are retired" in str(queued) and "restart" in str(queued)
        assert wait_for(lambda: fragile.stopped)
        late = error_of(lambda: fragile.submit(fragile.prepare(*normal, params)))
        assert "all 2 KV slots are retired" in str(late) and late.status == 503 and fragile.stop_reason
    finally:
        hook.remove()
        fragile.shutdown(drain=False)


def test_a_request_cancelled_between_prefill_chunks_leaves_its_slot_clean(tiny_checkpoint, engine):
    """A request cancelled after some of its prompt is in its slot has written columns that no sampled token has
    shown to be finite: they are zeroed when it leaves, so the next request in that slot reads no NaN there."""
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = transformers.AutoProcessor.from_pretrained(tiny_checkpoint)
    with torch.inference_mode():  # its KV slots are inference tensors, which only inference mode may write
        chunked = Engine(model, processor, max_batch_size=2, prefill_chunk=64, idle_prefill=64, reuse_memory=0)
    chunked.start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0)
        doomed = chunked.prepare(ask("word " * 150, images=0), [], params)
        assert doomed.prompt_tokens > 2 * 64
        handles = []

        def nan_in_its_first_chunk_then_cancel(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if handles and not handles[0].cancelled and hidden.shape[1] == 64:
                hidden.fill_(float("nan"))  # the next layer's keys and values in the slot's first 64 columns
                handles[0].cancel()  # the request leaves before its next chunk

        hook = model.model.language_model.layers[0].register_forward_hook(nan_in_its_first_chunk_then_cancel)
        try:
            handles.append(chunked.submit(doomed))
            with pytest.raises(RequestCancelledError):
                handles[0].result(timeout=120)
        finally:
            hook.remove()
        assert chunked.stats_snapshot()["prefill_chunks"] == 1
        short, long = (ask("hi", images=0), []), (ask("story " * 40, images=0), [])
        # the short one takes the cancelled request's slot and, both prompts in one chunk, decodes next to a longer
        # one, reading over its old columns
        later = [chunked.submit(chunked.prepare(m, i, params)) for m, i in (short, long)]
        for handle, (messages, images) in zip(later, (short, long), strict=True):
            assert handle.result(timeout=120).token_ids == engine.generate(messages, images, params).token_ids
    finally:
        chunked.shutdown(drain=False)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-30, 1e-8])
def test_tiny_temperatures_sample_safely_next_to_other_requests(engine, temperature):
    """Every temperature the validator accepts samples (as greedy, barring exact ties) and never fails a batch."""
    greedy = engine.generate(ask("Tiny"), [photo(50, 50)], GREEDY).token_ids
    others = [
        engine.submit(
            engine.prepare(ask("Other"), [photo(40, 60)], SamplingParams(max_tokens=8, temperature=1.0, seed=i))
        )
        for i in range(2)
    ]
    tiny = engine.submit(
        engine.prepare(ask("Tiny"), [photo(50, 50)], SamplingParams(max_tokens=8, temperature=temperature))
    )
    assert tiny.result(timeout=120).token_ids == greedy
    assert all(len(h.result(timeout=120).token_ids) == 8 for h in others)


def test_running_out_of_memory_in_a_prefill_fails_that_request_with_503_and_halves_the_chunk(tiny_checkpoint, engine):
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    failing = Engine(
        model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint), prefill_chunk=64, idle_prefill=64
    ).start()
    try:

        def oom_on_long_chunks(module, args, kwargs):
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None and embeds.shape[1] > 32:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

        model.model.language_model.register_forward_pre_hook(oom_on_long_chunks, with_kwargs=True)
        victim = failing.submit(failing.prepare(ask("Too big"), [photo(60, 60)], GREEDY))
        with pytest.raises(OverloadedError, match="ran out of memory") as info:
            victim.result(timeout=120)
        assert info.value.status == 503 and info.value.retry_after
        assert failing.prefill_chunk == failing.idle_prefill == 32  # half the forward that failed
        expected = engine.generate(ask("Fits now"), [photo(60, 60)], GREEDY).token_ids
        assert failing.generate(ask("Fits now"), [photo(60, 60)], GREEDY).token_ids == expected
    finally:
        failing.shutdown(drain=False)


def test_a_request_prepared_by_an_engine_with_a_longer_context_is_refused_by_a_shorter_one(reference, engine):
    short = Engine(*reference, max_batch_size=1, max_context=32)
    prepared = engine.prepare(ask("word " * 24, images=0), [], SamplingParams(max_tokens=3, temperature=0))
    assert prepared.prompt_tokens + 3 > 32
    with pytest.raises(ContextLengthExceededError, match="this engine's context of 32 tokens"):
        short.submit(prepared)
    assert short.queue_depth == 0


def test_an_engine_thread_that_cannot_start_refuses_the_request_and_the_next_submit_starts_it(reference, monkeypatch):
    fresh = Engine(*reference, max_batch_size=1)
    start = threading.Thread.start

    def fails_once(thread):
        if thread.name == "llava-next-engine" and not fails_once.failed:
            fails_once.failed = True
            raise RuntimeError("can't start new thread")
        return start(thread)

    fails_once.failed = False
    monkeypatch.setattr(threading.Thread, "start", fails_once)
    prepared = fresh.prepare(ask("Hello", images=0), [], SamplingParams(max_tokens=2, temperature=0))
    try:
        with pytest.raises(ServerError, match="engine thread could not start"):
            fresh.submit(prepared)
        assert fresh.queue_depth == 0
        assert fresh.submit(prepared).result(timeout=120).completion_tokens == 2
    finally:
        fresh.shutdown(drain=False)


def test_awaiting_the_result_leaves_the_text_to_a_reader_of_the_stream(engine):
    handle = engine.submit(engine.prepare(ask("Tell", images=0), [], SamplingParams(max_tokens=40, temperature=0)))
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.extend(handle))
    reader.start()

    async def wait():
        return await handle.aresult()

    result = anyio.run(wait)
    reader.join(60)
    assert "".join(read) == result.text


def test_requests_a_shutdown_timeout_ends_on_their_way_to_a_slot_get_no_before_generate_after_their_end(reference):
    events: list[tuple[str, str]] = []
    gate = threading.Event()

    class Observer:
        @hookimpl
        def llava_next_before_generate(self, request_id, request):
            events.append(("before", request_id))
            if request_id == "first":
                gate.wait(30)  # the engine thread is held while "second" waits to join, taken from the queue

        @hookimpl
        def llava_next_after_generate(self, request_id, result):
            events.append(("after", request_id))

    manager = get_plugin_manager()
    observer = Observer()
    manager.register(observer)
    stopping = Engine(*reference, max_batch_size=2, burst_window=0.05).start()
    try:
        params = SamplingParams(max_tokens=2, temperature=0)
        first = stopping.submit(stopping.prepare(ask("one", images=0), [], params), request_id="first")
        second = stopping.submit(stopping.prepare(ask("two", images=0), [], params), request_id="second")
        assert wait_for(lambda: ("before", "first") in events)
        stopping.shutdown(drain=True, timeout=0.3)  # ends both: the engine thread is held in a hook
        gate.set()
        for handle in (first, second):
            with pytest.raises(ServerError):
                handle.result(timeout=30)
        stopping._thread.join(30)
    finally:
        gate.set()
        manager.unregister(observer)
    assert ("before", "second") not in events
    assert events.index(("before", "first")) < events.index(("after", "first"))
