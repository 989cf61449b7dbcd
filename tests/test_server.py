"""``llava-next serve``: a real uvicorn server on loopback, spoken to by the official ``openai`` client and httpx."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import time
import urllib.parse

import checkpoints
import httpx
import openai
import pytest
import transformers
from starlette.responses import Response

from llava_next_plugin.engine import Engine, SamplingParams
from llava_next_plugin.server import create_app, serve_in_thread
from llava_next_plugin.validation import Limits

LIMITS = Limits(max_images_per_request=2, max_image_pixels=300 * 300, max_body_bytes=2_000_000)


def data_url(width: int, height: int, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    checkpoints.real_photo().convert("RGB").resize((width, height)).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint)
    engine = Engine(model, transformers.AutoProcessor.from_pretrained(tiny_checkpoint), model_name="tiny").start()
    yield engine
    engine.shutdown(drain=False)


@pytest.fixture(scope="module")
def server(engine):
    with serve_in_thread(create_app(engine, limits=LIMITS, shutdown_engine=False)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def expected_greedy(engine, text: str, sizes, max_tokens: int):
    from PIL import Image

    images = [
        Image.open(io.BytesIO(base64.b64decode(data_url(w, h).split(",", 1)[1]))).convert("RGB") for w, h in sizes
    ]
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    return engine.generate(messages, images, SamplingParams(max_tokens=max_tokens, temperature=0))


def test_openai_client_non_stream_gets_the_engines_greedy_answer_and_usage(client, engine):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=image_message("What is this?", data_url(80, 50)), max_tokens=9, temperature=0
    )
    assert raw.headers["x-request-id"]
    completion = raw.parse()
    expected = expected_greedy(engine, "What is this?", [(80, 50)], 9)
    assert completion.choices[0].message.content == expected.text
    assert completion.choices[0].finish_reason == expected.finish_reason
    assert completion.usage.prompt_tokens == expected.prompt_tokens
    assert completion.usage.completion_tokens == expected.completion_tokens == 9
    assert completion.usage.prompt_tokens_details.image_tokens == expected.image_tokens > 0
    assert completion.model == "tiny" and completion.id.startswith("chatcmpl-")


def test_openai_client_stream_yields_the_same_text_then_usage(client, engine):
    stream = client.chat.completions.create(
        model="tiny",
        messages=image_message("What is this?", data_url(80, 50)),
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = expected_greedy(engine, "What is this?", [(80, 50)], 9)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens


def test_unsupported_parameters_get_a_400_that_names_them(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny",
            messages=image_message("Hi", data_url(40, 40)),
            max_tokens=2,
            logprobs=True,
            frequency_penalty=0.5,
        )
    error = info.value.body
    assert error["code"] == "unsupported_parameter" and error["type"] == "invalid_request_error"
    assert "frequency_penalty" in error["message"] and "logprobs" in error["message"]


BAD_REQUESTS = {
    "invalid JSON": (b"{not json", "bad_request", "not valid JSON"),
    "too many images": (
        {"messages": image_message("x", *[data_url(32, 32)] * 3)},
        "bad_request",
        "at most 2 are allowed",
    ),
    "too many pixels": ({"messages": image_message("x", data_url(400, 400))}, "invalid_image", "400x400"),
    "a local file": ({"messages": image_message("x", "file:///etc/passwd")}, "invalid_image", "file://"),
    "a URL of a host not allowed": (
        {"messages": image_message("x", "http://169.254.169.254/latest")},
        "invalid_image",
        "--allow-url-domain",
    ),
    "a corrupt data URL": ({"messages": image_message("x", "data:image/png;base64,AAAA")}, "invalid_image", "image 0"),
    "a data URL not in base64": ({"messages": image_message("x", "data:image/png,abc")}, "invalid_image", "base64"),
    "max_tokens beyond the context": (
        {"messages": image_message("x", data_url(40, 40)), "max_tokens": 9999},
        "context_length_exceeded",
        "context length",
    ),
    "a temperature out of range": ({"messages": image_message("x"), "temperature": 7}, "bad_request", "temperature"),
    "no messages": ({"messages": []}, "bad_request", "messages"),
    "the image placeholder typed in the text": (
        {"messages": image_message("What does <image> mean in HTML?", data_url(40, 40))},
        "bad_request",
        "messages[0] has '<image>' in its text",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_an_openai_shaped_400_and_the_server_keeps_serving(server, client, case):
    body, code, says = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps({"model": "tiny", **body}).encode()
    response = httpx.post(
        server.url + "/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and says in error["message"]
    if code == "invalid_image":  # every image error points at the messages, a data URL's as any other's
        assert error["param"] == "messages"
    ok = client.chat.completions.create(
        model="tiny", messages=image_message("Still there?", data_url(40, 40)), max_tokens=2, temperature=0
    )
    assert ok.usage.completion_tokens == 2


def test_a_body_over_the_limit_gets_413(server):
    response = httpx.post(
        server.url + "/chat/completions",
        content=b"x" * (LIMITS.max_body_bytes + 1),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]


def test_a_refused_request_leaves_no_reference_cycle_holding_its_body(server):
    """A refused request's error, raised through the server's frames, must not keep them (and the request's body,
    up to ``--max-body-bytes``) alive in a cycle until the collector's next full pass: ten refused 30 MB prompts
    held ~370 MiB that way. The requests go through ``http.client``, which leaves no cycles of its own."""
    import gc
    import http.client
    import types

    refused = [
        {"model": "tiny", "messages": [{"role": "user", "content": "word " * 20_000}], "max_tokens": 2},  # too long
        {"model": "tiny", "messages": image_message("Hi", "data:image/png;base64,AAAA"), "max_tokens": 2},  # no image
        {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 3},  # unsupported
        b'{"messages": "' + b"x" * 1_500_000,  # not JSON, and large enough to be parsed on a worker thread
    ]
    host, port = server.host, server.port
    gc.collect()
    gc.disable()
    try:
        for body in refused:
            connection = http.client.HTTPConnection(host, port, timeout=60)
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            connection.request("POST", "/v1/chat/completions", content, {"content-type": "application/json"})
            response = connection.getresponse()
            assert response.status == 400, response.read()
            response.read()
            connection.close()
        time.sleep(0.2)  # the server's thread is done with them
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = sorted(
            f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"
            for frame in gc.garbage
            if isinstance(frame, types.FrameType) and "llava_next_plugin" in frame.f_code.co_filename
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == [], "\n".join(ours)


def test_every_response_carries_a_request_id_and_echoes_the_clients(server):
    base = server.url[: -len("/v1")]
    for url in (server.url + "/models", base + "/health", base + "/metrics", base + "/nowhere"):
        response = httpx.get(url, headers={"x-request-id": "trace-123"})
        assert response.headers["x-request-id"] == "trace-123"
        assert httpx.get(url).headers["x-request-id"].startswith("req-")  # chatcmpl- on the chat route
    missing = httpx.get(base + "/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    base = server.url[: -len("/v1")]
    health = httpx.get(base + "/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    before = httpx.get(base + "/metrics").text
    client.chat.completions.create(
        model="tiny", messages=image_message("Count me", data_url(40, 40)), max_tokens=3, temperature=0
    )
    after = httpx.get(base + "/metrics").text

    def value(text, prefix):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    assert (
        value(after, 'llava_next_http_requests_total{path="/v1/chat/completions",status="200"}')
        == value(before, 'llava_next_http_requests_total{path="/v1/chat/completions",status="200"}') + 1
    )
    assert value(after, "llava_next_completion_tokens_total") >= value(before, "llava_next_completion_tokens_total") + 3
    assert (
        value(after, "llava_next_request_duration_seconds_count")
        == value(before, "llava_next_request_duration_seconds_count") + 1
    )
    assert "llava_next_queue_depth 0" in after and "# TYPE llava_next_request_duration_seconds histogram" in after
    assert value(after, "llava_next_kv_slots_usable") >= 1
    assert value(after, "llava_next_prompt_tokens_total") > value(before, "llava_next_prompt_tokens_total")
    assert "# TYPE llava_next_prompt_tokens_reused_total counter" in after


def test_metrics_label_requests_by_route_so_random_or_forged_paths_add_no_series(server):
    base = server.url[: -len("/v1")]
    forged = '/x"} 1\nllava_next_forged_total 99\n#'
    with httpx.Client() as http:
        for i in range(50):
            http.get(base + f"/{os.urandom(6).hex()}/{i}")
        http.get(base + urllib.parse.quote(forged))  # uvicorn decodes the path: quote and newline reach the app
        http.get(base + "/v1/" + os.urandom(6).hex())  # unknown /v1 paths too
        text = http.get(base + "/metrics").text
    paths = {
        line.split('path="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("llava_next_http_requests_total{")
    }
    assert paths <= {"/v1/chat/completions", "/v1/models", "/health", "/metrics", "other"}
    assert 'llava_next_http_requests_total{path="other",status="404"}' in text
    assert "forged" not in text
    for line in text.splitlines():  # every line a comment or a sample of one of our metric families
        assert line.startswith("# ") or line.startswith("llava_next_") and "forged" not in line


def test_api_key_is_required_when_set(engine):
    app = create_app(engine, limits=LIMITS, api_key="s3cret", shutdown_engine=False)
    with serve_in_thread(app) as running:
        body = {"model": "tiny", "messages": image_message("Hi", data_url(40, 40)), "max_tokens": 2}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
            response = httpx.post(running.url + "/chat/completions", json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
            assert response.headers["x-request-id"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=running.url, api_key="s3cret").chat.completions.create(**body)
        assert ok.usage.completion_tokens == 2
        assert httpx.get(running.url[:-3] + "/health").status_code == 200


def test_a_full_queue_answers_429_with_retry_after(engine):
    refusing = Engine(engine.model, engine.processor, max_queue=0)
    with serve_in_thread(create_app(refusing, limits=LIMITS)) as running:
        response = httpx.post(
            running.url + "/chat/completions", json={"messages": image_message("Hi", data_url(40, 40)), "max_tokens": 2}
        )
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "overloaded"


def test_a_full_queue_answers_429_before_any_image_is_decoded(engine):
    refusing = Engine(engine.model, engine.processor, max_queue=0)
    not_an_image = "data:image/png;base64," + base64.b64encode(b"these bytes are no PNG").decode()
    body = {"messages": image_message("Hi", not_an_image), "max_tokens": 2}
    with serve_in_thread(create_app(refusing, limits=LIMITS)) as running:
        response = httpx.post(running.url + "/chat/completions", json=body)
    assert response.status_code == 429 and response.json()["error"]["code"] == "overloaded"  # not 400
    assert refusing.stats["requests_rejected"] == 1
    with serve_in_thread(create_app(engine, limits=LIMITS, shutdown_engine=False)) as running:
        assert httpx.post(running.url + "/chat/completions", json=body).status_code == 400  # with room: decoded


def test_image_urls_are_fetched_at_once_and_a_slow_host_holds_back_only_its_own_requests(engine, monkeypatch):
    """Image URLs are fetched apart from the CPU work: three requests whose host hangs are all fetching at once
    though one request may prepare at a time (max_preparing=1), and a text-only request is answered meanwhile.
    Once the host answers, the three are prepared one at a time and all answered."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from starlette.applications import Starlette
    from starlette.routing import Route

    png = base64.b64decode(data_url(40, 40).split(",", 1)[1])
    fetching, preparing, most_preparing = [0], [0], [0]
    release = threading.Event()
    lock = threading.Lock()

    async def hanging_png(request):
        import anyio

        with lock:
            fetching[0] += 1
        while not release.is_set():
            await anyio.sleep(0.01)
        return Response(png, media_type="image/png")

    prepare = engine.prepare

    def counted_prepare(*args, **kwargs):  # the engine's own prepare, counted
        with lock:
            preparing[0] += 1
            most_preparing[0] = max(most_preparing[0], preparing[0])
        try:
            time.sleep(0.05)
            return prepare(*args, **kwargs)
        finally:
            with lock:
                preparing[0] -= 1

    monkeypatch.setattr(engine, "prepare", counted_prepare)
    limits = Limits(max_image_pixels=300 * 300, allowed_url_domains=("127.0.0.1",))
    with (
        serve_in_thread(Starlette(routes=[Route("/cat.png", hanging_png)])) as image_host,
        serve_in_thread(create_app(engine, limits=limits, shutdown_engine=False, max_preparing=1)) as running,
        ThreadPoolExecutor(3) as pool,
    ):
        url = f"http://127.0.0.1:{image_host.port}/cat.png"
        body = {"messages": image_message("What?", url), "max_tokens": 1}
        slow = [pool.submit(httpx.post, running.url + "/chat/completions", json=body, timeout=60) for _ in range(3)]
        try:
            assert checkpoints.wait_for(lambda: fetching[0] == 3)
            text_only = httpx.post(
                running.url + "/chat/completions",
                json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1},
                timeout=60,
            )
            assert text_only.status_code == 200 and not any(f.done() for f in slow)
        finally:
            release.set()
        assert [f.result().status_code for f in slow] == [200, 200, 200]
    assert most_preparing[0] == 1


def test_a_request_with_several_image_urls_fetches_them_together_and_names_the_first_bad_one(engine):
    import threading

    from starlette.applications import Starlette
    from starlette.routing import Route

    png = base64.b64decode(data_url(40, 40).split(",", 1)[1])
    arrived = threading.Barrier(2, timeout=30)  # both fetches must be in flight at once to get past it

    async def together(request):
        import anyio

        await anyio.to_thread.run_sync(arrived.wait)
        return Response(png, media_type="image/png")

    release = threading.Event()

    async def hanging(request):
        import anyio

        await anyio.to_thread.run_sync(release.wait, 30)
        return Response(png, media_type="image/png")

    routes = [
        Route("/a.png", together),
        Route("/b.png", together),
        Route("/gone.png", lambda r: Response(status_code=404)),
        Route("/hangs.png", hanging),
    ]
    limits = Limits(max_images_per_request=3, max_image_pixels=300 * 300, allowed_url_domains=("127.0.0.1",))
    with (
        serve_in_thread(Starlette(routes=routes)) as image_host,
        serve_in_thread(create_app(engine, limits=limits, shutdown_engine=False, max_preparing=1)) as running,
    ):
        origin = f"http://127.0.0.1:{image_host.port}"
        both = httpx.post(
            running.url + "/chat/completions",
            json={"messages": image_message("What?", origin + "/a.png", origin + "/b.png"), "max_tokens": 1},
            timeout=60,
        )
        assert both.status_code == 200, both.text
        bad = httpx.post(
            running.url + "/chat/completions",
            json={
                "messages": image_message("What?", data_url(40, 40), origin + "/gone.png", origin + "/gone.png"),
                "max_tokens": 1,
            },
            timeout=60,
        )
        error = bad.json()["error"]
        assert bad.status_code == 400 and error["message"].startswith("image 1: ") and "404" in error["message"]
        assert error["param"] == "messages"
        try:  # the first image fails at once: the answer does not wait for the second, still hanging
            first_bad = httpx.post(
                running.url + "/chat/completions",
                json={"messages": image_message("What?", origin + "/gone.png", origin + "/hangs.png"), "max_tokens": 1},
                timeout=60,
            )
            assert first_bad.status_code == 400 and not release.is_set()
            assert first_bad.json()["error"]["message"].startswith("image 0: ")
        finally:
            release.set()


def test_fetched_images_waiting_for_a_preparing_turn_are_bounded_in_bytes_with_a_429(engine, monkeypatch):
    """Fetched bytes wait for a preparing turn apart from the preparing places: at most as many as the places
    could hold (max_preparing x images per request x image bytes); a request that would pass that gets 429."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from starlette.applications import Starlette
    from starlette.routing import Route

    png = base64.b64decode(data_url(40, 40).split(",", 1)[1])
    served, release = [0], threading.Event()

    async def cat(request):
        served[0] += 1
        return Response(png, media_type="image/png")

    prepare = engine.prepare

    def held_prepare(*args, **kwargs):  # the engine's own prepare, once the test lets it go
        release.wait(60)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(engine, "prepare", held_prepare)
    limits = Limits(
        max_images_per_request=1,
        max_image_bytes=len(png) + 10,  # room for one fetched image waiting, not two
        max_image_pixels=300 * 300,
        allowed_url_domains=("127.0.0.1",),
    )
    with (
        serve_in_thread(Starlette(routes=[Route("/cat.png", cat)])) as image_host,
        serve_in_thread(create_app(engine, limits=limits, shutdown_engine=False, max_preparing=1)) as running,
        ThreadPoolExecutor(2) as pool,
    ):
        url = running.url + "/chat/completions"
        fetched = {"messages": image_message("What?", f"http://127.0.0.1:{image_host.port}/cat.png"), "max_tokens": 1}
        try:
            inline = pool.submit(  # holds the one preparing place
                httpx.post, url, json={"messages": image_message("Hi", data_url(40, 40)), "max_tokens": 1}, timeout=60
            )
            assert checkpoints.wait_for(
                lambda: (
                    "llava_next_image_pixels_in_flight 1600.0"
                    in httpx.get(running.url.removesuffix("/v1") + "/metrics").text
                )
            )
            waiting = pool.submit(httpx.post, url, json=fetched, timeout=60)  # fetched, then waits its turn
            assert checkpoints.wait_for(lambda: served[0] == 1)
            refused = httpx.post(url, json=fetched, timeout=60)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert "fetched images waiting to be prepared" in refused.json()["error"]["message"]
        finally:
            release.set()
        assert inline.result().status_code == 200 and waiting.result().status_code == 200


def test_a_stream_ended_by_an_error_event_is_counted_with_that_events_status(engine):
    app = create_app(engine, limits=LIMITS, shutdown_engine=False)
    with serve_in_thread(app) as running:

        def count(status: str) -> float:
            text = httpx.get(running.url.removesuffix("/v1") + "/metrics").text
            line = f'llava_next_http_requests_total{{path="/v1/chat/completions",status="{status}"}} '
            return sum(float(row[len(line) :]) for row in text.splitlines() if row.startswith(line))

        body = {"messages": image_message("Go on"), "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.stream("POST", running.url + "/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            drain = app.state.drain
            drain.begin()
            drain.wait(0.0, grace=0.0)  # cuts the stream at once: an error event, then [DONE]
            events = [line for line in lines if line.startswith("data: ")]
        assert "server shutting down" in events[-2] and events[-1] == "data: [DONE]"
        assert checkpoints.wait_for(lambda: count("503") == 1)
        assert count("200") == 0 and count("499") == 0


def test_a_body_sent_slowly_holds_its_bytes_not_a_place_others_wait_for(reference):
    """Bodies being received are bounded by the bytes they hold (--max-queue times --max-body-bytes), not by
    their count: while a slow client dribbles its body, other requests are read and served (a slow client held
    a place until --body-timeout, and 16 of them refused every good request). A body whose bytes would pass
    the bound is refused at once with 429 and Retry-After; once the slow one is in, there is room again."""
    import threading

    body = json.dumps({"messages": image_message("What?", data_url(40, 40)), "max_tokens": 1}).encode()
    headers = {"content-type": "application/json"}

    def slow_then_others(max_body_bytes: int) -> tuple[list[httpx.Response], httpx.Response]:
        engine = Engine(*reference, max_queue=1)
        sent_half, others_done = threading.Event(), threading.Event()

        def slowly():
            yield body[: len(body) // 2]
            sent_half.set()
            others_done.wait(30)
            yield body[len(body) // 2 :]

        with serve_in_thread(create_app(engine, limits=Limits(max_body_bytes=max_body_bytes))) as running:
            url = running.url + "/chat/completions"
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                slow = pool.submit(httpx.post, url, content=slowly(), headers=headers, timeout=60)
                assert sent_half.wait(30)
                time.sleep(0.3)  # the server has the first half
                others = [httpx.post(url, content=body, headers=headers, timeout=60) for _ in range(3)]
                assert not slow.done()
                others_done.set()
                assert slow.result().status_code == 200
            after = httpx.post(url, content=body, headers=headers, timeout=60)
        return others, after

    # room for two bodies: the slow half and one whole body at a time
    others, after = slow_then_others(max_body_bytes=2 * len(body))
    assert [r.status_code for r in others] == [200, 200, 200], [r.text for r in others]
    assert after.status_code == 200
    # room for one body: the slow half leaves too little for another whole one
    others, after = slow_then_others(max_body_bytes=len(body) + 10)
    assert [r.status_code for r in others] == [429, 429, 429], [r.text for r in others]
    assert others[0].headers["retry-after"] == "1"
    message = others[0].json()["error"]["message"]
    assert "bytes of request bodies being received" in message and "retry later" in message, message
    assert after.status_code == 200


def test_a_large_body_is_parsed_like_a_small_one(server, engine):
    body = {"messages": image_message("What?", data_url(290, 290)), "max_tokens": 3, "temperature": 0}
    assert len(json.dumps(body)) > 150_000  # well over the size parsed on the event loop
    response = httpx.post(server.url + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == expected_greedy(engine, "What?", [(290, 290)], 3).text
    broken = httpx.post(
        server.url + "/chat/completions", content=json.dumps(body)[:-1], headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_its_generation(server, engine, stream):
    cancelled = engine.stats["requests_cancelled"]
    body = {
        "model": "tiny",
        "messages": image_message("Go on", data_url(40, 40)),
        "max_tokens": 2000,
        "temperature": 0,
        "stream": stream,
    }
    with httpx.Client(timeout=httpx.Timeout(30, read=0.5 if not stream else 30)) as http:
        if stream:
            with http.stream("POST", server.url + "/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                assert checkpoints.wait_for(lambda: engine.batch_size == 1)
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(server.url + "/chat/completions", json=body)
    assert checkpoints.wait_for(lambda: engine.stats["requests_cancelled"] == cancelled + 1)
    assert checkpoints.wait_for(lambda: engine.batch_size == 0)


def test_image_urls_are_fetched_only_from_allowed_hosts_and_redirects_are_not_followed(engine):
    from starlette.applications import Starlette
    from starlette.responses import RedirectResponse
    from starlette.routing import Route

    png = base64.b64decode(data_url(40, 40).split(",", 1)[1])
    images = Starlette(
        routes=[
            Route("/cat.png", lambda request: Response(png, media_type="image/png")),
            Route("/elsewhere", lambda request: RedirectResponse("http://169.254.169.254/cat.png")),
        ]
    )
    limits = Limits(max_images_per_request=2, max_image_pixels=300 * 300, allowed_url_domains=("127.0.0.1",))
    with (
        serve_in_thread(images) as image_host,
        serve_in_thread(create_app(engine, limits=limits, shutdown_engine=False)) as running,
    ):
        origin = f"http://127.0.0.1:{image_host.port}"

        def ask_about(url):
            return httpx.post(
                running.url + "/chat/completions",
                json={"messages": image_message("What?", url), "max_tokens": 2, "temperature": 0},
            )

        fetched = ask_about(origin + "/cat.png")
        inline = ask_about(data_url(40, 40))
        assert fetched.status_code == 200 and fetched.json()["usage"] == inline.json()["usage"]
        assert fetched.json()["choices"][0]["message"] == inline.json()["choices"][0]["message"]
        redirected = ask_about(origin + "/elsewhere")
        assert redirected.status_code == 400 and "HTTP 307" in redirected.json()["error"]["message"]
        other_host = ask_about(f"http://localhost:{image_host.port}/cat.png")
        assert other_host.status_code == 400 and "allowed hosts: 127.0.0.1" in other_host.json()["error"]["message"]


def test_each_app_counts_in_its_own_registry_and_reports_latency_ttft_and_queue_wait(engine):
    body = {"messages": image_message("Hi", data_url(40, 40)), "max_tokens": 2, "temperature": 0}
    with (
        serve_in_thread(create_app(engine, limits=LIMITS, shutdown_engine=False)) as first,
        serve_in_thread(create_app(engine, limits=LIMITS, shutdown_engine=False)) as second,
    ):
        for _ in range(3):
            assert httpx.post(first.url + "/chat/completions", json=body, timeout=60).status_code == 200
        texts = [httpx.get(s.url[: -len("/v1")] + "/metrics").text for s in (first, second)]

    def value(text, name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    for histogram in (
        "llava_next_request_duration_seconds",
        "llava_next_time_to_first_token_seconds",
        "llava_next_queue_wait_seconds",
    ):
        assert f"# TYPE {histogram} histogram" in texts[0]
        assert value(texts[0], histogram + "_count") == 3 and value(texts[1], histogram + "_count") == 0
    ok = 'llava_next_http_requests_total{path="/v1/chat/completions",status="200"}'
    assert value(texts[0], ok) == 3 and value(texts[1], ok) == 0
