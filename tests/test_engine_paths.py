"""Every path of the engine gives ``model.generate``'s greedy tokens: chunked prefill, a reused prompt prefix
(a follow-up turn), reused image features; and a long prompt's chunks let running streams keep flowing."""

from __future__ import annotations

import threading
import time

import checkpoints
import pytest
import torch
import transformers
from checkpoints import ask, photo, reference_greedy
from llava_next_sdk.errors import RequestCancelledError

from llava_next_plugin.engine import Engine, SamplingParams
from llava_next_plugin.engine.reuse import prefix_key

GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def chunked(reference):
    engine = Engine(*reference, max_batch_size=4, prefill_chunk=7, idle_prefill=7).start()
    yield engine
    engine.shutdown(drain=False)


def test_chunked_prefill_alone_and_joining_a_batch_gives_model_generate_tokens(reference, chunked):
    model, _ = reference
    requests = [
        (ask("What is this?"), [photo(80, 50)]),
        (ask("Compare them.", images=2), [photo(64, 64), photo(30, 90)]),
        ([{"role": "user", "content": [{"type": "text", "text": "A story about a cat"}]}], []),
    ]
    prepared = [chunked.prepare(m, i, GREEDY) for m, i in requests]
    expected = [reference_greedy(model, p, 8) for p in prepared]
    assert [chunked.submit(p).result(timeout=120).token_ids for p in prepared] == expected
    handles = [chunked.submit(p) for p in prepared]  # together: chunks of several prompts share forwards
    assert [h.result(timeout=120).token_ids for h in handles] == expected
    assert chunked.stats_snapshot()["prefill_chunks"] > 3 * len(prepared)


def test_a_follow_up_turn_reuses_the_first_turns_prefix_and_image_and_gives_the_same_tokens(reference):
    model, processor = reference
    image = photo(90, 60)
    reusing = Engine(model, processor).start()
    plain = Engine(model, processor, reuse_memory=0).start()
    try:
        first = reusing.generate(ask("What is in the picture?"), [image], GREEDY)
        follow_up = ask("What is in the picture?") + [
            {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
            {"role": "user", "content": [{"type": "text", "text": "And what colour is it?"}]},
        ]
        before = reusing.stats_snapshot()
        prepared = reusing.prepare(follow_up, [image], GREEDY)
        second = reusing.submit(prepared).result(timeout=120)
        after = reusing.stats_snapshot()
        assert after.get("prefix_reused_tokens", 0) - before.get("prefix_reused_tokens", 0) >= first.prompt_tokens - 1
        assert after.get("image_features_reused", 0) > before.get("image_features_reused", 0)
        assert second.token_ids == plain.generate(follow_up, [image], GREEDY).token_ids
        assert second.token_ids == reference_greedy(model, prepared, 8)
        assert plain.stats_snapshot().get("prefix_reused_tokens", 0) == 0
        # the reuse budget, reported: a quarter of the KV slots (at least 64 MiB) by default, 0 when off
        assert reusing.reuse_bytes == max(reusing.kv_cache_bytes // 4, 64 << 20) and plain.reuse_bytes == 0
    finally:
        reusing.shutdown(drain=False)
        plain.shutdown(drain=False)


def test_after_the_weights_change_nothing_computed_with_the_old_ones_is_reused(tiny_checkpoint):
    """A prompt and image seen before, sent again after a weight update (a training step, an adapter loaded):
    the tokens are the new weights' ones, as model.generate gives them, not the cached prefix's."""
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = transformers.AutoProcessor.from_pretrained(tiny_checkpoint)
    engine = Engine(model, processor).start()
    try:
        prepared = engine.prepare(ask("Describe the picture in a few words."), [photo(80, 50)], GREEDY)
        assert engine.submit(prepared).result(timeout=120).token_ids == reference_greedy(model, prepared, 8)
        with torch.no_grad():  # in place, as an optimizer step writes them
            for layer in model.model.language_model.layers:
                layer.self_attn.k_proj.weight.mul_(3.0)
                layer.self_attn.v_proj.weight.mul_(-2.0)
            model.model.multi_modal_projector.linear_1.weight.mul_(2.0)
        before = engine.stats_snapshot()
        again = engine.submit(prepared).result(timeout=120).token_ids
        after = engine.stats_snapshot()
        assert again == reference_greedy(model, prepared, 8)
        assert after.get("prefix_reused_tokens", 0) == before.get("prefix_reused_tokens", 0)
        assert after.get("image_features_reused", 0) == before.get("image_features_reused", 0)
        assert after["reuse_cleared"] == before.get("reuse_cleared", 0) + 1
        # unchanged since: reused again
        assert engine.submit(prepared).result(timeout=120).token_ids == again
        assert engine.stats_snapshot()["prefix_reused_tokens"] > after.get("prefix_reused_tokens", 0)
        # a write through .data, which torch does not count: clear_reuse() says so
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.v_proj.weight.data.mul_(-0.5)
        engine.clear_reuse()
        cleared = engine.stats_snapshot()["reuse_cleared"]
        assert engine.submit(prepared).result(timeout=120).token_ids == reference_greedy(model, prepared, 8)
        assert engine.stats_snapshot()["reuse_cleared"] == cleared + 1
    finally:
        engine.shutdown(drain=False)


def test_the_weights_version_counts_real_changes_and_not_offloaded_parameters_brought_in_per_forward():
    from llava_next_plugin.engine.reuse import weights_version

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, device="meta"))
    first = weights_version(model)
    model[1].weight = torch.nn.Parameter(torch.empty(4, 4, device="meta"))  # as accelerate's offload hooks do
    assert weights_version(model) == first
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert weights_version(model) != first
    second = weights_version(model)
    model[0].bias = torch.nn.Parameter(torch.zeros(4))  # replaced
    assert weights_version(model) != second


def test_another_image_of_the_same_size_reuses_no_prefix(reference):
    model, processor = reference
    engine = Engine(model, processor).start()
    try:
        cat = engine.generate(ask("Describe."), [photo(60, 60)], GREEDY)
        other_image = checkpoints.real_photo("astronaut.png").convert("RGB").resize((60, 60))
        prepared = engine.prepare(ask("Describe."), [other_image], GREEDY)
        other = engine.submit(prepared).result(timeout=120)
        # the prompts' token ids are equal (same geometry), their images are not: only the text before them is shared
        assert engine.stats_snapshot().get("prefix_reused_tokens", 0) < 8
        assert other.token_ids == reference_greedy(model, prepared, 8)
        assert cat.prompt_tokens == other.prompt_tokens
    finally:
        engine.shutdown(drain=False)


def test_a_prefix_key_marks_each_image_by_its_token_count_even_where_placeholders_touch():
    ids = torch.tensor([1, 2, 9, 9, 9, 9, 9, 3])  # 9: <image>; two images, 2 and 3 tokens, in one run
    a_b = prefix_key(ids, [(b"A" * 16, 2), (b"B" * 16, 3)], 9)
    assert prefix_key(ids, [(b"A" * 16, 2), (b"C" * 16, 3)], 9)[:4] == a_b[:4]  # the first image: shared
    assert prefix_key(ids, [(b"A" * 16, 2), (b"C" * 16, 3)], 9)[4:] != a_b[4:]  # the second: not
    assert a_b[:2] == (1, 2) and a_b[-1] == 3 and len(set(a_b[2:4])) == 1 and a_b[3] != a_b[4]
    with pytest.raises(ValueError, match="5 <image> tokens"):
        prefix_key(ids, [(b"A" * 16, 2)], 9)


def test_images_whose_placeholders_touch_are_told_apart_by_prefix_reuse(reference):
    """``<image><image>``: one run of image tokens for two images. A request whose second image differs (same
    size) reuses none of the first request's KV; the same two images again reuse all but the last token."""
    model, processor = reference
    engine = Engine(model, processor).start()
    prompt = "[INST] <image><image> Compare the two pictures. [/INST]"
    first, second = photo(60, 60), photo(50, 70)
    other = checkpoints.real_photo("astronaut.png").convert("RGB").resize((50, 70))
    try:
        engine.generate([], [first, second], GREEDY, prompt=prompt)
        prepared = engine.prepare([], [first, other], GREEDY, prompt=prompt)
        assert engine.submit(prepared).result(timeout=120).token_ids == reference_greedy(model, prepared, 8)
        assert engine.stats_snapshot().get("prefix_reused_tokens", 0) == 0
        again = engine.prepare([], [first, second], GREEDY, prompt=prompt)
        assert engine.submit(again).result(timeout=120).token_ids == reference_greedy(model, again, 8)
        assert engine.stats_snapshot()["prefix_reused_tokens"] == again.prompt_tokens - 1
    finally:
        engine.shutdown(drain=False)


def test_running_streams_get_tokens_while_a_long_prompt_is_prefilled_in_chunks(reference):
    model, processor = reference
    engine = Engine(model, processor, max_batch_size=2, prefill_chunk=16, reuse_memory=0).start()
    try:
        running = engine.submit(
            engine.prepare(ask("Talk", images=0), [], SamplingParams(max_tokens=300, temperature=0))
        )
        stream = iter(running)
        next(stream)
        arrivals: list[float] = []

        def read():
            try:
                for _ in stream:
                    arrivals.append(time.monotonic())
            except RequestCancelledError:  # the test cancels it once the long prompt has its first token
                pass

        reader = threading.Thread(target=read)
        reader.start()
        long_prompt = engine.prepare(
            ask("Describe all of it. " * 6, images=2),
            [photo(96, 32), photo(32, 96)],
            SamplingParams(max_tokens=1, temperature=0),
        )
        chunks = -(-long_prompt.prompt_tokens // 16)
        long = engine.submit(long_prompt)
        result = long.result(timeout=120)
        first_token_at = long.submitted_at + result.time_to_first_token
        running.cancel()
        reader.join(60)
        between = [t for t in arrivals if long.submitted_at <= t <= first_token_at]
        assert chunks >= 8
        assert len(between) >= chunks // 2  # the running stream kept getting tokens between the chunks
    finally:
        engine.shutdown(drain=False)


def test_low_detail_images_are_their_base_view_only_and_match_a_reference_built_from_the_models_pieces(reference):
    model, processor = reference
    engine = Engine(model, processor).start()
    try:
        images = [photo(96, 32), photo(64, 64)]
        high = engine.prepare(ask("Compare.", images=2), images, GREEDY)
        low = engine.prepare(ask("Compare.", images=2), images, GREEDY, image_detail=["low", "auto"])
        base = (checkpoints.TINY_TILE // checkpoints.TINY_PATCH) ** 2
        high_first = high.image_tokens - engine.prepare(ask("Compare."), images[1:], GREEDY).image_tokens
        assert low.image_tokens == high.image_tokens - high_first + base
        result = engine.submit(low).result(timeout=120)
        assert result.image_tokens == low.image_tokens

        # the reference: transformers' own vision tower and projector on the base view, its generate on embeddings
        with torch.no_grad():
            vision = model.model.vision_tower(low.pixel_values[0, :1], output_hidden_states=True)
            selected = vision.hidden_states[model.config.vision_feature_layer][:, 1:]  # default strategy: no CLS
            base_features = model.model.multi_modal_projector(selected)[0]
            second = model.get_image_features(low.pixel_values[1:2], low.image_sizes[1:2]).pooler_output
            second = torch.cat(list(second)) if isinstance(second, (list, tuple)) else second
            ids = low.input_ids
            embeds = model.get_input_embeddings()(ids)
            embeds[ids == checkpoints.IMAGE_TOKEN_ID] = torch.cat([base_features, second])
            out = model.generate(
                inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
            )
        assert result.token_ids == out[0].tolist()
    finally:
        engine.shutdown(drain=False)


def test_an_unknown_detail_is_refused_with_the_values_allowed(reference):
    from llava_next_sdk.errors import BadRequestError

    engine = Engine(*reference, max_batch_size=1)
    with pytest.raises(BadRequestError, match="'low', 'high' or 'auto'"):
        engine.prepare(ask("Hi"), [photo(40, 40)], GREEDY, image_detail=["medium"])
    with pytest.raises(BadRequestError, match="one per image"):
        engine.prepare(ask("Hi"), [photo(40, 40)], GREEDY, image_detail=["low", "low"])


@pytest.mark.parametrize("text", ["llama", "qwen2", "phi3"])
def test_other_text_backbones_run_in_the_slots_with_chunked_prefill_and_match_model_generate(
    tiny_checkpoint_factory, text
):
    folder = tiny_checkpoint_factory(text=text)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    engine = Engine(
        model, transformers.AutoProcessor.from_pretrained(folder), max_batch_size=2, prefill_chunk=16
    ).start()
    try:
        prepared = engine.prepare(ask("What is this?"), [photo(80, 50)], GREEDY)
        assert engine.submit(prepared).result(timeout=120).token_ids == reference_greedy(model, prepared, 8)
    finally:
        engine.shutdown(drain=False)


def test_the_same_prompt_again_reuses_all_but_its_last_token_and_gives_the_same_tokens(reference):
    """The stored prompt is longer than what the repeat may reuse (its own prompt less the last token, which
    must be prefilled to sample from): the store hands out the stored prefix cut to that length."""
    model, processor = reference
    engine = Engine(model, processor).start()
    try:
        messages, images = ask("Describe the picture in detail."), [photo(70, 40)]
        first = engine.generate(messages, images, GREEDY)
        before = engine.stats_snapshot().get("prefix_reused_tokens", 0)
        prepared = engine.prepare(messages, images, GREEDY)
        again = engine.submit(prepared).result(timeout=120)
        assert engine.stats_snapshot()["prefix_reused_tokens"] - before == first.prompt_tokens - 1
        assert again.token_ids == first.token_ids == reference_greedy(model, prepared, 8)
    finally:
        engine.shutdown(drain=False)


@pytest.mark.parametrize("model_class", ["reference", "ours"])
def test_joiners_images_go_through_the_vision_tower_together_and_each_gets_its_solo_tokens(
    reference, tiny_checkpoint, model_class
):
    model, processor = reference
    if model_class == "ours":  # our class gives one feature tensor per image; transformers' packs them in one
        model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
        assert type(model).__module__.startswith("llava_next_plugin")
    requests = [
        (ask("What is this?"), [photo(80, 50)], None),
        (ask("Compare them.", images=2), [photo(64, 64), photo(30, 90)], None),  # tiles differ: padded together
        (ask("And this?"), [photo(40, 96)], ["low"]),
        (ask("Small one"), [photo(50, 50)], ["low"]),
    ]
    alone = Engine(model, processor, max_batch_size=1, reuse_memory=0).start()
    try:
        solo = [alone.generate(m, i, GREEDY, image_detail=d).token_ids for m, i, d in requests]
    finally:
        alone.shutdown(drain=False)
    engine = Engine(model, processor, max_batch_size=4).start()
    try:
        prepared = [engine.prepare(m, i, GREEDY, image_detail=d) for m, i, d in requests]
        with engine._lock:  # the engine thread takes the queue under this lock: all four join in one step
            handles = [engine.submit(p) for p in prepared]
        assert [h.result(timeout=120).token_ids for h in handles] == solo
        assert engine.stats_snapshot()["images_batched"] == 5  # 3 full-detail images in one call, 2 base views
    finally:
        engine.shutdown(drain=False)


def test_a_joiner_whose_tiles_do_not_fit_the_tower_fails_alone_and_the_engine_goes_on(reference):
    """Two joiners' images go through the tower together; one whose tiles are of another size (a request
    prepared for another checkpoint) cannot be padded with the other's: it fails its own request only."""
    import dataclasses

    from llava_next_sdk.errors import LlavaNextError
    from torch.nn import functional as F

    model, processor = reference
    engine = Engine(model, processor, max_batch_size=4).start()
    try:
        good = engine.prepare(ask("What is this?"), [photo(70, 70)], GREEDY)
        other = engine.prepare(ask("Describe."), [photo(30, 90)], GREEDY)
        tile = other.pixel_values.shape[-1]
        bigger = F.interpolate(other.pixel_values[0], size=(tile + 16, tile + 16))[None]
        bad = dataclasses.replace(other, pixel_values=bigger)
        with engine._lock:  # both join in one step: one batched vision call
            handles = [engine.submit(good), engine.submit(bad)]
        assert handles[0].result(timeout=120).token_ids == reference_greedy(model, good, 8)
        with pytest.raises(LlavaNextError, match="generation failed"):
            handles[1].result(timeout=120)
        assert not engine.stopped
        again = engine.prepare(ask("What is this?"), [photo(60, 40)], GREEDY)
        assert engine.submit(again).result(timeout=120).token_ids == reference_greedy(model, again, 8)
    finally:
        engine.shutdown(drain=False)


def test_a_backbone_whose_lower_layers_attend_in_full_and_upper_ones_slide_gives_model_generate_tokens(
    tiny_checkpoint_factory,
):
    """Qwen2 with ``max_window_layers`` below its depth: layer 0 attends in full, layer 1 within a window of 8.
    Each layer gets its own kind's mask, by the plain decoder and by transformers' forward (a hook set)."""
    path = tiny_checkpoint_factory(text="qwen2")
    config = transformers.AutoConfig.from_pretrained(path)
    text = config.text_config.to_dict()
    text.update(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None)
    for key in ("model_type", "transformers_version"):
        text.pop(key, None)
    config.text_config = transformers.Qwen2Config(**text)
    assert config.text_config.layer_types == ["full_attention", "sliding_attention"]
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(path, config=config).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    engine = Engine(model, processor, max_batch_size=2, prefill_chunk=5, reuse_memory=0).start()
    try:
        prepared = engine.prepare(ask("What is in the picture?"), [photo(80, 50)], GREEDY)
        expected = reference_greedy(model, prepared, 8)
        assert engine.submit(prepared).result(timeout=120).token_ids == expected
        hook = model.model.language_model.register_forward_hook(lambda *args: None)
        try:
            assert engine.submit(prepared).result(timeout=120).token_ids == expected
        finally:
            hook.remove()
    finally:
        engine.shutdown(drain=False)


def test_a_mistral_config_carrying_layer_types_slides_every_layer_as_its_model_does(tiny_checkpoint):
    """MistralConfig keeps a ``layer_types`` key it was given (with a warning) but MistralModel slides every layer:
    the engine reads each layer's kind from the built attention modules, not from the config."""
    from llava_next_plugin.engine.kv import KVSlots
    from llava_next_plugin.engine.step import ModelRunner

    config = transformers.AutoConfig.from_pretrained(tiny_checkpoint)
    config.text_config.sliding_window = 8
    config.text_config.layer_types = ["full_attention", "sliding_attention"]
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint, config=config).eval()
    text = model.config.text_config
    kv = KVSlots(
        layers=text.num_hidden_layers,
        slots=2,
        kv_heads=text.num_key_value_heads,
        head_dim=text.hidden_size // text.num_attention_heads,
        max_len=64,
        dtype=torch.float32,
        device="cpu",
    )
    runner = ModelRunner(model, kv, image_token_id=model.config.image_token_id)
    assert runner.sliding_window == 8 and runner.layer_types is None


def test_with_nothing_decoding_a_prompt_is_prefilled_in_idle_prefill_sized_forwards(reference):
    model, _ = reference
    engine = Engine(*reference, max_batch_size=2, prefill_chunk=16, reuse_memory=0).start()
    try:
        assert engine.idle_prefill == 8 * 16
        prepared = engine.prepare(ask("What is this?"), [photo(80, 50)], GREEDY)
        assert 16 < prepared.prompt_tokens <= engine.idle_prefill
        before = engine.stats_snapshot().get("prefill_chunks", 0)
        assert engine.submit(prepared).result(timeout=120).token_ids == reference_greedy(model, prepared, 8)
        assert engine.stats_snapshot()["prefill_chunks"] == before + 1  # nothing to stall: one forward
    finally:
        engine.shutdown(drain=False)


def test_an_idle_engine_lets_a_burst_arrive_and_starts_it_with_one_vision_call_and_one_prefill(reference):
    """Requests arriving at an idle engine within ``burst_window`` of each other start together: one batched
    vision call, one prefill forward, and each gets its solo tokens. With ``burst_window=0`` the first starts
    alone and the others join later."""
    model, _ = reference
    for window in (0.25, 0.0):
        engine = Engine(*reference, max_batch_size=4, reuse_memory=0, burst_window=window).start()
        try:
            prepared = [engine.prepare(ask(f"Picture {i}?"), [photo(40 + 8 * i, 48)], GREEDY) for i in range(3)]
            handles = []
            for request in prepared:
                handles.append(engine.submit(request))
                time.sleep(0.05)  # arrivals 50 ms apart: within the window, far beyond a start
            results = [h.result(timeout=120).token_ids for h in handles]
            stats = engine.stats_snapshot()
        finally:
            engine.shutdown(drain=False)
        if window:
            assert stats["prefill_chunks"] == 1 and stats["images_batched"] == 3, stats
            assert results == [reference_greedy(model, p, GREEDY.max_tokens) for p in prepared]
        else:
            assert stats["prefill_chunks"] >= 2 and stats.get("images_batched", 0) < 3, stats


@pytest.mark.parametrize("window", [-0.001, float("inf"), float("nan")])
def test_a_burst_window_that_is_not_a_finite_number_of_seconds_is_refused(reference, window):
    with pytest.raises(ValueError, match="burst_window must be a finite number of seconds >= 0"):
        Engine(*reference, burst_window=window)


def test_the_burst_wait_ends_once_no_more_requests_could_start_with_the_burst(reference):
    """The slots are full (2 requests, 2 slots), or the queue is (2 requests, a queue of 2): the engine starts at
    once, however long its ``burst_window``."""
    for slots, queue in ((2, 8), (4, 2)):
        engine = Engine(*reference, max_batch_size=slots, max_queue=queue, burst_window=60, reuse_memory=0).start()
        try:
            prepared = [engine.prepare(ask(f"Hi {i}?", images=0), [], GREEDY) for i in range(2)]
            with engine._lock:  # both queued before the engine thread looks
                handles = [engine.submit(p) for p in prepared]
            assert [h.result(timeout=30).completion_tokens for h in handles] == [GREEDY.max_tokens] * 2
        finally:
            engine.shutdown(drain=False)


def test_one_lazily_opened_image_shared_by_requests_prepared_on_many_threads_gives_each_the_same_pixels(reference):
    """``Image.open`` decodes on first use, and PIL's decode is not thread-safe: six requests preparing one opened
    image at once got wrong pixels or a false "truncated" error, unless its decode is done once."""
    from concurrent.futures import ThreadPoolExecutor

    engine = Engine(*reference, max_batch_size=2)
    expected = engine.prepare(ask("x"), [checkpoints.real_photo().convert("RGB")], GREEDY).pixel_values
    for _ in range(4):
        shared = checkpoints.real_photo()  # opened, not decoded
        with ThreadPoolExecutor(6) as pool:
            prepared = list(pool.map(lambda image: engine.prepare(ask("x"), [image], GREEDY), [shared] * 6))
        assert all(torch.equal(p.pixel_values, expected) for p in prepared)
