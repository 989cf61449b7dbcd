"""``llava-next serve`` under hostile and careless input: every refusal is the right OpenAI error, nothing
internal leaks, one request never hurts another, and the connection stays usable after any error.

One real server subprocess for the module (``tests/faulty_serve.py``: the real server, whose model fails on a
marker in the prompt), spoken to over HTTP on 127.0.0.1; a second local app serves hostile "images".
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import anyio
import checkpoints
import faulty_serve
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served import ServerProcess
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llava_next_plugin.server import serve_in_thread

TESTS = Path(__file__).resolve().parent
MAX_IMAGE_PIXELS = 300 * 300
MAX_REQUEST_PIXELS = 120_000
MAX_IMAGE_BYTES = 400_000
URL_TIMEOUT = 2.0


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    checkpoints.real_photo().convert("RGB").resize((width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(width, height)).decode()


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


class Served(ServerProcess):
    """A ``llava-next serve`` subprocess run by *script* (default: ``faulty_serve.py``, the real server whose model
    fails on a marker in the prompt); its log goes to a file the tests read."""

    def __init__(self, args: list[str], log: Path, script: str = "faulty_serve.py") -> None:
        path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
        super().__init__([sys.executable, str(TESTS / script), *args], log, env={"PYTHONPATH": path}, seconds=120)


@pytest.fixture(scope="module")
def hostile_host():
    """Answers that are no images: another service's metrics, a byte every 0.5 s, more bytes than allowed."""

    async def metrics(request):
        return Response("# HELP llava_next_secret internal\nllava_next_secret 1\n", media_type="text/plain")

    async def octets(request):
        return Response(b"SECRET-INTERNAL-BYTES " * 4, media_type="application/octet-stream")

    async def drip(request):
        async def body():
            yield png(40, 40)[:8]
            for _ in range(40):  # 20 s at most, far beyond the server's overall URL timeout
                await anyio.sleep(0.5)
                yield b"\0"

        return StreamingResponse(body(), media_type="image/png")

    async def huge(request):
        async def body():  # no Content-Length: only counting while reading catches it
            for _ in range(4):
                yield b"\0" * MAX_IMAGE_BYTES

        return StreamingResponse(body(), media_type="image/png")

    app = Starlette(
        routes=[Route("/metrics", metrics), Route("/octets", octets), Route("/drip", drip), Route("/huge.png", huge)]
    )
    with serve_in_thread(app) as running:
        yield f"http://127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def header_dripper():
    """An HTTP host that answers its status line, then one byte of a header every 0.5 s for 20 s: no single
    read times out, and no body ever starts."""
    import socketserver
    import threading

    class Drip(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            try:
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n")
                for _ in range(40):
                    time.sleep(0.5)
                    self.request.sendall(b"X")
            except OSError:
                pass  # the client hung up, as it should

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow-headers.png"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    server = Served(
        [
            "--model",
            str(tiny_checkpoint),
            "--log-level",
            "info",
            "--max-images-per-request",
            "2",
            "--max-image-pixels",
            str(MAX_IMAGE_PIXELS),
            "--max-request-pixels",
            str(MAX_REQUEST_PIXELS),
            "--max-pixels-in-flight",
            str(MAX_REQUEST_PIXELS),
            "--max-image-bytes",
            str(MAX_IMAGE_BYTES),
            "--url-timeout",
            str(URL_TIMEOUT),
            "--allow-url-domain",
            "127.0.0.1",
            "--body-timeout",
            "2",
            "--max-messages",
            "50",
        ],
        tmp_path_factory.mktemp("served") / "server.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def name(tiny_checkpoint) -> str:
    return Path(tiny_checkpoint).name


def post(served: Served, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        served.url + "/chat/completions",
        content=content,
        timeout=kwargs.pop("timeout", 120),
        headers={"content-type": "application/json", **kwargs.pop("headers", {})},
        **kwargs,
    )


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    if code is not None:
        assert error["code"] == code, error
    return error


def still_serving(served: Served) -> None:
    ok = post(served, {"messages": user("Still there?"), "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


# --------------------------------------------------------------------------------------------- a clean install


def test_a_server_whose_code_can_import_only_what_pyproject_declares_answers_chat(tiny_checkpoint, tmp_path):
    """As after ``pip install "llava-next-plugin[serve]"``: an undeclared import (sniffio once) would fail here."""
    server = Served(["--model", str(tiny_checkpoint)], tmp_path / "server.log", script="declared_only_serve.py")
    try:
        answer = post(server, {"messages": user("Hi", data_url(40, 40)), "max_tokens": 2, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2, answer.text
        body = {"messages": user("Hi"), "max_tokens": 2, "stream": True}
        with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as stream:
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("error" not in event for event in events)
        assert httpx.get(server.base + "/metrics").status_code == 200
    finally:
        server.stop()
    assert "ModuleNotFoundError" not in server.log()


def test_the_declared_only_server_refuses_our_code_a_module_only_the_dev_extra_brings():
    """The check itself: hypothesis (dev extra, installed and loaded here) cannot be imported by our code there,
    while the libraries we declare may import what they like."""
    check = (
        "import hypothesis, declared_only_serve; declared_only_serve.block_undeclared_imports()\n"
        "exec('import torch, anyio, starlette', {'__name__': 'llava_next_plugin.engine'})\n"
        "try:\n    exec('import hypothesis', {'__name__': 'llava_next_plugin.engine'})\n"
        "except ModuleNotFoundError as error:\n    print(error)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "llava_next_plugin.engine imports 'hypothesis'" in out.stdout and "declare it" in out.stdout


# --------------------------------------------------------------------------------------------- the right errors


def test_a_model_failure_is_a_500_naming_only_the_request_id_and_is_logged_once_with_it(served):
    response = post(served, {"messages": user(faulty_serve.RUNTIME_MARKER), "max_tokens": 2})
    error = assert_openai_error(response, 500, "server_error")
    request_id = response.headers["x-request-id"]
    assert error["message"] == f"internal error, request id {request_id}"
    assert "RuntimeError" not in response.text and "secret" not in response.text
    assert checkpoints.wait_for(lambda: faulty_serve.INTERNAL_DETAIL in served.log(), 10)
    lines = [line for line in served.log().splitlines() if request_id in line]
    assert len(lines) == 1 and "failed" in lines[0] and lines[0].startswith("ERROR")
    assert "ExceptionGroup" not in served.log()
    still_serving(served)


def test_a_server_whose_engine_stopped_says_so_on_health_and_still_answers_every_request(tiny_checkpoint, tmp_path):
    """The engine thread ends (the fault no request handler catches): the request in flight gets a 500 naming only
    its request id, every later one a 503 saying the engine stopped (another replica may take it; no detail of
    the error), ``/health`` answers 503 ``stopped`` (a load balancer or Ray Serve's health check replaces the
    process), and the server itself keeps answering."""
    server = Served(["--model", str(tiny_checkpoint)], tmp_path / "server.log")
    try:
        assert httpx.get(server.base + "/health").json()["status"] == "ok"
        response = post(server, {"messages": user(faulty_serve.STOP_MARKER), "max_tokens": 2})
        error = assert_openai_error(response, 500, "server_error")
        assert error["message"] == f"internal error, request id {response.headers['x-request-id']}"
        for _ in range(2):
            response = post(server, {"messages": user("Are you there?"), "max_tokens": 2})
            error = assert_openai_error(response, 503, "server_error")
            assert "the engine stopped after an unexpected error" in error["message"] and "restart" in error["message"]
        assert "secret" not in response.text and "Killer" not in response.text
        health = httpx.get(server.base + "/health")
        assert health.status_code == 503 and health.json()["status"] == "stopped"
        assert httpx.get(server.url + "/models").status_code == 200
        assert checkpoints.wait_for(lambda: "the engine thread stopped" in server.log(), 10)
    finally:
        server.stop()


def test_running_out_of_device_memory_is_a_503_with_retry_after(served):
    response = post(served, {"messages": user(faulty_serve.OOM_MARKER), "max_tokens": 2})
    assert_openai_error(response, 503, "overloaded")
    assert response.headers["retry-after"] == "1"


def test_a_stream_that_fails_ends_with_an_error_event_naming_only_the_request_id(served):
    body = {"messages": user(faulty_serve.RUNTIME_MARKER), "max_tokens": 2, "stream": True}
    with httpx.stream("POST", served.url + "/chat/completions", json=body, timeout=60) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    request_id = response.headers["x-request-id"]
    error = json.loads(events[-2])["error"]
    assert error["message"] == f"internal error, request id {request_id}" and error["status"] == 500
    assert events[-1] == "[DONE]"


def test_one_request_id_in_the_header_the_body_and_every_stream_chunk(served):
    response = post(served, {"messages": user("Hi"), "max_tokens": 2})
    assert response.headers["x-request-id"] == response.json()["id"]
    assert response.json()["id"].startswith("chatcmpl-")
    mine = post(served, {"messages": user("Hi"), "max_tokens": 2}, headers={"x-request-id": "trace-7"})
    assert mine.headers["x-request-id"] == mine.json()["id"] == "trace-7"
    body = {"messages": user("Hi"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", served.url + "/chat/completions", json=body, timeout=60) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert {chunk["id"] for chunk in chunks} == {stream.headers["x-request-id"]}


def test_the_connection_stays_usable_after_every_kind_of_error(served, name):
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    bodies = [
        json.dumps({"messages": user(faulty_serve.RUNTIME_MARKER), "max_tokens": 2}),  # 500
        "{not json",  # 400
        json.dumps({"model": "gpt-4o", "messages": user("Hi")}),  # 404
        json.dumps({"messages": user(faulty_serve.OOM_MARKER), "max_tokens": 2}),  # 503
        json.dumps({"model": name, "messages": user("Hi"), "max_tokens": 2}),
    ]  # 200
    statuses, sockets = [], []
    try:
        for body in bodies:
            connection.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
            assert response.getheader("connection") != "close"
            sockets.append(connection.sock)
    finally:
        connection.close()
    assert statuses == [500, 400, 404, 503, 200]
    assert sockets[0] is not None and all(s is sockets[0] for s in sockets)


def test_a_client_that_gives_up_is_counted_as_499_not_as_a_server_error(served):
    def count(status: str) -> float:
        text = httpx.get(served.base + "/metrics").text
        pattern = rf'^llava_next_http_requests_total{{path="/v1/chat/completions",status="{status}"}} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    before = count("499"), count("500")
    with pytest.raises(httpx.ReadTimeout):
        post(
            served,
            {"messages": user("Go on"), "max_tokens": 2000, "temperature": 0},
            timeout=httpx.Timeout(30, read=0.5),
        )
    assert checkpoints.wait_for(lambda: count("499") == before[0] + 1, 30)
    assert count("500") == before[1]
    ok = count("200")
    with httpx.stream(  # a stream the client leaves after its first event: 499 too, though its status was 200
        "POST",
        served.base + "/v1/chat/completions",
        json={"messages": user("Go on"), "max_tokens": 2000, "temperature": 0, "stream": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200 and next(response.iter_lines()).startswith("data: ")
    assert checkpoints.wait_for(lambda: count("499") == before[0] + 2, 30)
    assert count("200") == ok and count("500") == before[1]


def test_deep_nesting_and_wrong_types_are_400s_with_openai_error_bodies(served):
    deep = b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert "nests JSON too deeply" in assert_openai_error(post(served, deep), 400)["message"]
    for role in (["user"], {"user": 1}, 7, None):
        error = assert_openai_error(post(served, {"messages": [{"role": role, "content": "Hi"}]}), 400)
        assert "unsupported role" in error["message"]
    assert_openai_error(post(served, b"\xff\xfe{}"), 400)
    assert_openai_error(post(served, {"messages": user("\ud800")}), 400)
    still_serving(served)


JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["\ud800", "a\udfffb", "user", "text", "image_url"]),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": JSON_VALUES}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.one_of(
                JSON_VALUES,
                st.fixed_dictionaries({"url": st.one_of(JSON_VALUES, st.just("data:image/png;base64,AAAA"))}),
            ),
        }
    ),
    JSON_VALUES,
)
MESSAGES = st.fixed_dictionaries(
    {
        "role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer", "tool"]), JSON_VALUES),
        "content": st.one_of(st.text(max_size=30), st.lists(PARTS, max_size=3), JSON_VALUES),
    }
)
PARAMS = st.dictionaries(
    st.sampled_from(
        [
            "max_tokens",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "n",
            "logprobs",
            "frequency_penalty",
            "presence_penalty",
            "stream",
            "stream_options",
            "model",
            "user",
            "max_completion_tokens",
            "tools",
            "x",
        ]
    ),
    JSON_VALUES,
    max_size=4,
)
BODIES = st.one_of(
    st.builds(lambda messages, params: {"messages": messages, **params}, st.lists(MESSAGES, max_size=3), PARAMS),
    JSON_VALUES,
)


FUZZ_SECONDS = 45.0  # CI's bound for the fuzz is 60 s: past this, examples are still drawn but no longer sent


def test_fuzzed_bodies_never_get_a_5xx_and_every_refusal_is_an_openai_error(served):
    send_until = time.monotonic() + FUZZ_SECONDS

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(BODIES)
    def check(body):
        if time.monotonic() > send_until:
            return
        if isinstance(body, dict) and "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 1  # whatever is valid stays quick
        if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0:
            body["max_tokens"] = min(body["max_tokens"], 4) if body["max_tokens"] < 4000 else body["max_tokens"]
        response = session.post(
            served.url + "/chat/completions",
            content=json.dumps(body, ensure_ascii=True),
            headers={"content-type": "application/json"},
        )
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}

    with httpx.Client(timeout=60) as session:
        check()
    still_serving(served)


# --------------------------------------------------------------------------------------------- OpenAI clients


def test_openai_clients_defaults_are_accepted_and_other_values_refused(served, name):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model=name, messages=user("Hi"), max_tokens=2, n=1, logprobs=False, frequency_penalty=0, presence_penalty=0.0
    )
    assert completion.usage.completion_tokens == 2
    for extra in ({"presence_penalty": 0.5}, {"logprobs": True}, {"n": 2}, {"frequency_penalty": -1}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=name, messages=user("Hi"), max_tokens=2, **extra)
        assert info.value.body["code"] == "unsupported_parameter" and list(extra)[0] in info.value.body["message"]


def test_an_unknown_model_is_a_404_model_not_found(served, name):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=user("Hi"), max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and name in info.value.body["message"]


def test_the_sdk_raises_model_not_found_for_an_unknown_model_and_needs_no_model_name(served, name):
    from llava_next_sdk import AsyncClient
    from llava_next_sdk.errors import ModelNotFoundError

    async def main():
        async with AsyncClient(base_url=served.url, model="gpt-4o", max_retries=0) as wrong:
            with pytest.raises(ModelNotFoundError) as info:
                await wrong.generate(None, "Hi", max_tokens=2)
        async with AsyncClient(base_url=served.url, max_retries=0) as unnamed:  # the server's model answers
            result = await unnamed.generate(None, "Hi", max_tokens=2)
        return info.value, result

    error, result = anyio.run(main)
    assert error.status == 404 and error.param == "model" and result.model == name


def test_the_served_name_is_the_checkpoints_folder_name_and_no_path_is_shown(served, name, tiny_checkpoint):
    path = str(Path(tiny_checkpoint).resolve())
    models = httpx.get(served.url + "/models")
    health = httpx.get(served.base + "/health")
    answer = post(served, {"model": name, "messages": user("Hi"), "max_tokens": 2})
    assert [m["id"] for m in models.json()["data"]] == [name]
    assert health.json()["model"] == name and answer.json()["model"] == name
    for response in (models, health, answer):
        assert path not in response.text and str(tiny_checkpoint) not in response.text
    by_path = post(served, {"model": str(tiny_checkpoint), "messages": user("Hi"), "max_tokens": 2})
    assert by_path.status_code == 200 and by_path.json()["model"] == name  # --model is accepted, never shown


def test_the_default_served_name_is_a_hub_id_as_it_is_or_a_folders_base_name(tmp_path):
    from llava_next_plugin.server import default_served_name

    assert default_served_name("llava-hf/llava-v1.6-mistral-7b-hf") == "llava-hf/llava-v1.6-mistral-7b-hf"
    folder = tmp_path / "checkpoints" / "my-llava"
    folder.mkdir(parents=True)
    for spelling in (str(folder), str(folder) + "/", "/srv/models/my-llava"):
        assert default_served_name(spelling) == "my-llava", spelling


# --------------------------------------------------------------------------------------------- bounds


def test_the_tiniest_temperatures_and_top_ps_accepted_sample_as_greedy_beside_other_streams(served):
    """Values that underflow float32 (5e-324, 1e-300, 1e-46) are valid: they mean "the most likely token"."""
    from concurrent.futures import ThreadPoolExecutor

    def text(response: httpx.Response) -> str:
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    ask = {"messages": user("Tell me more", data_url(50, 50)), "max_tokens": 8}
    greedy = text(post(served, {**ask, "temperature": 0}))
    tiny = [{"temperature": t} for t in (5e-324, 1e-300, 1e-45)] + [
        {"temperature": 1, "top_p": p} for p in (5e-324, 1e-46)
    ]
    others = {"messages": user("Something else"), "max_tokens": 8, "temperature": 1.0, "seed": 3}
    with ThreadPoolExecutor(4) as pool:
        beside = [pool.submit(post, served, others) for _ in range(2)]
        answers = list(pool.map(lambda params: text(post(served, {**ask, **params})), tiny))
        assert all(f.result().status_code == 200 for f in beside)
    assert answers == [greedy] * len(tiny)


def test_stop_strings_are_bounded_in_count_and_length_with_a_400_naming_the_limit(served):
    error = assert_openai_error(post(served, {"messages": user("Hi"), "stop": ["x" * 300_000]}), 400)
    assert error["param"] == "stop" and "at most 1000 characters" in error["message"]
    error = assert_openai_error(post(served, {"messages": user("Hi"), "stop": ["a", "b", "c", "d", "e"]}), 400)
    assert error["param"] == "stop" and "at most 4 stop strings" in error["message"]
    ok = post(served, {"messages": user("Hi"), "stop": ["x" * 1000], "max_tokens": 2})
    assert ok.status_code == 200


def test_a_prompt_that_cannot_fit_is_refused_by_its_length_in_characters(served):
    error = assert_openai_error(
        post(served, {"messages": user("word " * 2_000_000), "max_tokens": 2}), 400, "context_length_exceeded"
    )
    assert "10000000 characters" in error["message"] and "at most" in error["message"]
    still_serving(served)


def test_a_body_sent_too_slowly_is_a_408_and_gives_its_reading_place_back(served):
    import socket

    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as slow:
        slow.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        answer = b""  # the server gives up on the body after --body-timeout (2 s): its answer, headers and body
        while b"--body-timeout" not in answer and (chunk := slow.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer, answer
    still_serving(served)


def test_more_slow_bodies_than_may_queue_do_not_keep_a_good_request_out(served):
    """A slowloris: 80 connections (more than --max-queue's 64) that send a body's first byte and stall. They
    hold one byte each, not a place: a good request is served at once, and each slow one ends with a 408."""
    import socket

    slow = []
    try:
        for _ in range(80):
            connection = socket.create_connection(("127.0.0.1", served.port), timeout=30)
            connection.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )
            slow.append(connection)
        still_serving(served)
        for connection in slow:
            answer = b""
            while b"--body-timeout" not in answer and (chunk := connection.recv(65536)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        for connection in slow:
            connection.close()
    still_serving(served)


def test_too_many_messages_or_parts_are_refused_before_they_are_parsed(served):
    many = [{"role": "user", "content": ""}] * 51
    error = assert_openai_error(post(served, {"messages": many, "max_tokens": 2}), 400)
    assert error["param"] == "messages" and "at most 50" in error["message"], error
    parts = [{"role": "user", "content": [{"type": "text", "text": "x"}] * 51}]
    assert "at most 50" in assert_openai_error(post(served, {"messages": parts, "max_tokens": 2}), 400)["message"]
    # each message within the bounds, but 50 x 50 parts in all: as slow to read as 2500 messages
    spread = [{"role": "user", "content": [{"type": "text", "text": ""}] * 50}] * 50
    error = assert_openai_error(post(served, {"messages": spread, "max_tokens": 2}), 400)
    assert "2500 content parts in all; at most 200" in error["message"] and error["param"] == "messages", error
    within = [{"role": "user", "content": [{"type": "text", "text": "Hi"}] * 4}] * 50  # 4 a message: accepted
    assert post(served, {"messages": within, "max_tokens": 2}).status_code == 200
    still_serving(served)


def test_an_image_beyond_pils_own_ceiling_gets_the_servers_pixel_limit_message(served):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # a 20000x20000 RGB PNG with no pixels
    image = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    error = assert_openai_error(post(served, {"messages": user("?", url), "max_tokens": 2}), 400, "invalid_image")
    assert f"at most {MAX_IMAGE_PIXELS} are allowed, so downscale it" in error["message"], error


def test_image_pixels_are_bounded_per_request_with_413_and_the_budget_is_returned(served):
    two = post(served, {"messages": user("Both?", data_url(300, 300), data_url(200, 200)), "max_tokens": 2})
    error = assert_openai_error(two, 413)
    assert f"at most {MAX_REQUEST_PIXELS}" in error["message"] and "130000 pixels" in error["message"]
    fits = post(served, {"messages": user("One?", data_url(300, 300)), "max_tokens": 2})
    assert fits.status_code == 200
    metrics = httpx.get(served.base + "/metrics").text
    assert "llava_next_image_pixels_in_flight 0.0" in metrics


@pytest.mark.parametrize(
    "url",
    [
        "http://[x/",  # Python cannot split it
        "http://127.0.0.1:abc/cat.png",  # a port that is no number
        "http://127.0.0.1/a\nb.png",  # an allowed host, a URL httpx refuses to send
    ],
)
def test_a_malformed_image_url_is_a_400_invalid_image_not_a_server_error(served, url):
    error = assert_openai_error(post(served, {"messages": user("?", url), "max_tokens": 2}), 400, "invalid_image")
    assert "malformed" in error["message"] or "must be a data: URL" in error["message"], error
    still_serving(served)


def test_an_image_url_that_drips_is_cut_at_the_overall_timeout(served, hostile_host, header_dripper):
    for url in (hostile_host + "/drip", header_dripper):  # its body, or its headers before any body
        error = assert_openai_error(post(served, {"messages": user("?", url), "max_tokens": 2}), 400, "invalid_image")
        assert f"within {URL_TIMEOUT:g} s overall" in error["message"], url
    error = assert_openai_error(
        post(served, {"messages": user("?", hostile_host + "/huge.png"), "max_tokens": 2}), 400, "invalid_image"
    )
    assert "download limit" in error["message"]


def test_an_answer_that_is_no_image_is_named_by_its_type_and_none_of_its_bytes(served, hostile_host):
    error = assert_openai_error(post(served, {"messages": user("?", hostile_host + "/metrics")}), 400, "invalid_image")
    assert "not an image (content-type text/plain)" in error["message"]
    assert "HELP" not in error["message"] and "secret" not in error["message"]
    error = assert_openai_error(post(served, {"messages": user("?", hostile_host + "/octets")}), 400, "invalid_image")
    assert "SECRET" not in error["message"] and "not an image" in error["message"]


def test_a_local_client_quotes_no_bytes_of_an_answer_that_is_no_image(tiny_checkpoint, hostile_host):
    from llava_next_sdk import AsyncClient
    from llava_next_sdk.errors import InvalidImageError

    async def main():
        async with AsyncClient(model=str(tiny_checkpoint)) as client:
            for path in ("/metrics", "/octets"):
                with pytest.raises(InvalidImageError) as info:
                    await client.generate(hostile_host + path, "?", max_tokens=2)
                assert "HELP" not in info.value.message and "SECRET" not in info.value.message
                assert "not an image" in info.value.message

    anyio.run(main)


def test_the_pixel_budget_refuses_what_does_not_fit_now_with_429_and_takes_it_once_freed():
    from llava_next_sdk.errors import OverloadedError

    from llava_next_plugin.validation import PixelBudget

    budget = PixelBudget(100)
    with budget.hold(60):
        with pytest.raises(OverloadedError) as info:
            with budget.hold(50):
                pass
        assert info.value.status == 429 and info.value.retry_after == 1.0
        assert "budget of 100 pixels in flight" in info.value.message
        with budget.hold(40):
            assert budget.in_use == 100
    assert budget.in_use == 0
    with budget.hold(100):
        pass
    assert budget.in_use == 0


def test_concurrent_requests_share_the_pixel_budget_and_give_it_all_back(served):
    from concurrent.futures import ThreadPoolExecutor

    body = {"messages": user("One?", data_url(300, 300)), "max_tokens": 1}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: post(served, body), range(6)))
    for response in responses:  # the server's budget is one request's worth: the others may be told to retry
        assert response.status_code in (200, 429), response.text
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1" and "in flight" in response.json()["error"]["message"]
    assert "llava_next_image_pixels_in_flight 0.0" in httpx.get(served.base + "/metrics").text


# --------------------------------------------------------------------------------------------- draining


def stream_until_sigterm(server: Served, max_tokens: int, during_drain=None) -> list[str]:
    """Stream a long answer about an image; after its second event send SIGTERM, call *during_drain()*, read to
    the end."""
    import signal

    body = {
        "messages": user("Keep talking", data_url(40, 40)),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events: list[str] = []
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    server.process.send_signal(signal.SIGTERM)
                    if during_drain is not None:
                        during_drain()
    return events


def test_during_a_drain_health_says_draining_and_new_work_gets_503_while_streams_finish(tiny_checkpoint, tmp_path):
    server = Served(
        ["--model", str(tiny_checkpoint), "--log-level", "info", "--drain-timeout", "120"], tmp_path / "server.log"
    )
    seen = {}

    def during_drain():
        assert checkpoints.wait_for(lambda: httpx.get(server.base + "/health", timeout=10).status_code == 503, 30)
        seen["health"] = httpx.get(server.base + "/health", timeout=10).json()["status"]
        seen["new"] = post(server, {"messages": user("Hi"), "max_tokens": 2}, timeout=10)

    try:
        events = stream_until_sigterm(server, 400, during_drain)
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    assert seen["health"] == "draining"
    refused = seen["new"]
    assert_openai_error(refused, 503, "overloaded")
    assert refused.headers["retry-after"] and "shutting down" in refused.json()["error"]["message"]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 400
    assert "stopped by SIGTERM after draining" in server.log()


def test_a_stream_cut_by_the_drain_timeout_gets_an_error_event_before_it_closes(tiny_checkpoint, tmp_path):
    server = Served(
        ["--model", str(tiny_checkpoint), "--log-level", "info", "--drain-timeout", "1"], tmp_path / "server.log"
    )
    try:
        events = stream_until_sigterm(server, 3000)
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["status"] == 503 and "server shutting down" in error["message"]
    assert "after draining" not in server.log() and "cut 1 request" in server.log()


def test_a_body_still_arriving_when_the_drain_timeout_ends_gets_a_503_and_counts_as_cut(tiny_checkpoint, tmp_path):
    import signal
    import socket

    server = Served(
        ["--model", str(tiny_checkpoint), "--log-level", "info", "--drain-timeout", "1"], tmp_path / "server.log"
    )
    try:
        body = json.dumps({"messages": user("Hi"), "max_tokens": 2}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as connection:
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            connection.sendall(head.encode() + body[:10])  # and the rest never comes
            # the request is in (its head was read): the drain waits for it
            in_flight = "\nllava_next_requests_in_flight 1.0\n"
            assert checkpoints.wait_for(lambda: in_flight in httpx.get(server.base + "/metrics").text, 30)
            server.process.send_signal(signal.SIGTERM)
            answer = connection.makefile("rb").read().decode()
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    status_line, _, rest = answer.partition("\r\n")
    assert " 503 " in status_line, answer
    assert "server shutting down" in rest and "retry-after" in rest.lower()
    assert "cut 1 request" in server.log() and "Internal Server Error" not in answer


def test_a_second_signal_during_a_drain_cuts_the_streams_in_flight_at_once_and_exits_cleanly(tiny_checkpoint, tmp_path):
    """The README: "A second signal cuts the requests in flight at once", however long the drain timeout and the
    streams: the stream still ends with its 503 error event and [DONE], the exit status is 0, nothing is dumped."""
    import signal

    server = Served(
        ["--model", str(tiny_checkpoint), "--log-level", "info", "--drain-timeout", "120"], tmp_path / "server.log"
    )
    events = []
    try:
        body = {"messages": user("Keep talking"), "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 1:
                    server.process.send_signal(signal.SIGTERM)  # drains: the stream would go on for 3000 tokens
                    assert checkpoints.wait_for(lambda: "draining" in httpx.get(server.base + "/health").text, 30)
                    server.process.send_signal(signal.SIGTERM)
                    second = time.monotonic()
        assert server.process.wait(60) == 0
        assert time.monotonic() - second < 5, server.log()
    finally:
        server.stop()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["status"] == 503 and "server shutting down" in error["message"]
    log = server.log()
    assert "stopped by SIGTERM after a second signal cut 1 request" in log, log
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_the_readmes_limits_table_gives_serves_flags_and_their_defaults():
    import argparse

    from llava_next_plugin import serve_cli

    readme = (TESTS.parent / "README.md").read_text()
    section = readme.split("\n## Operating the server\n", 1)[1].split("\n## ", 1)[0]
    defaults = vars(serve_cli._configure(argparse.ArgumentParser()).parse_args(["--model", "x"]))
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and "`--" in line]
    assert len(rows) >= 10
    for _limit, flag, default, _beyond in rows:
        name = flag.strip().strip("`")[2:].replace("-", "_")
        assert name in defaults, flag
        if defaults[name] not in (None, []):
            assert (
                default.split()[0] == f"{defaults[name]:g}"
                if isinstance(defaults[name], float)
                else default.split()[0] == str(defaults[name])
            ), (flag, default, defaults[name])


# ------------------------------------------------------------------------------- what OpenAI clients send


def test_fields_sent_as_null_are_unset_and_the_plain_text_response_format_is_the_default(served):
    """Many clients send every optional field, null when unset: vLLM reads null as unset, and so do we."""
    nulls = dict.fromkeys(["top_logprobs", "response_format", "tools", "tool_choice", "logit_bias", "metadata"])
    body = {"messages": user("Hi"), "max_tokens": 2, "temperature": 0, **nulls}
    plain = post(served, {"messages": user("Hi"), "max_tokens": 2, "temperature": 0})
    assert post(served, body).json()["choices"] == plain.json()["choices"]
    text = post(served, {**body, "response_format": {"type": "text"}})
    assert text.status_code == 200 and text.json()["choices"] == plain.json()["choices"]
    error = assert_openai_error(post(served, {**body, "response_format": {"type": "json_object"}}), 400)
    assert error["param"] == "response_format" and 'only response_format={"type": "text"}' in error["message"]
    error = assert_openai_error(post(served, {**body, "tools": [{"type": "function"}]}), 400)
    assert error["param"] == "tools"


def test_stream_options_without_stream_and_a_user_that_is_no_string_are_refused_as_openai_refuses_them(served):
    error = assert_openai_error(post(served, {"messages": user("Hi"), "stream_options": {"include_usage": True}}), 400)
    assert error["param"] == "stream_options" and '"stream": true' in error["message"]
    empty = post(served, {"messages": user("Hi"), "stream_options": {}, "max_tokens": 2})  # vLLM lets it pass
    assert empty.status_code == 200, empty.text
    error = assert_openai_error(post(served, {"messages": user("Hi"), "user": {"id": 7}}), 400)
    assert error["param"] == "user" and "must be a string, got an object" in error["message"]
    assert post(served, {"messages": user("Hi"), "user": "someone", "max_tokens": 2}).status_code == 200


def test_a_base64_image_part_is_read_as_the_same_image_in_a_data_url(served):
    encoded = base64.b64encode(png(40, 40)).decode()
    url = "data:image/png;base64," + encoded
    as_url = post(served, {"messages": user("Hi", url), "max_tokens": 4, "temperature": 0})
    part = [{"role": "user", "content": [{"type": "image", "base64": encoded}, {"type": "text", "text": "Hi"}]}]
    as_part = post(served, {"messages": part, "max_tokens": 4, "temperature": 0})
    assert as_part.status_code == 200, as_part.text
    assert as_part.json()["choices"] == as_url.json()["choices"]
    assert as_part.json()["usage"] == as_url.json()["usage"]


def test_an_image_outside_user_messages_is_refused_naming_its_message(served):
    for role in ("system", "assistant"):
        messages = [{"role": role, "content": [{"type": "image_url", "image_url": {"url": data_url(40, 40)}}]}]
        messages += user("What is in it?")
        error = assert_openai_error(post(served, {"messages": messages, "max_tokens": 2}), 400)
        assert error["param"] == "messages", error
        assert f"messages[0] (role '{role}')" in error["message"] and "images go in user messages" in error["message"]
    still_serving(served)


def test_a_compressed_body_gets_415_and_a_wrong_method_gets_405_with_allow(served):
    import gzip

    body = gzip.compress(json.dumps({"messages": user("Hi"), "max_tokens": 2}).encode())
    error = assert_openai_error(post(served, body, headers={"content-encoding": "gzip"}), 415)
    assert "Content-Encoding 'gzip'" in error["message"] and "uncompressed" in error["message"]
    wrong = httpx.get(served.url + "/chat/completions", timeout=30)
    assert_openai_error(wrong, 405)
    assert wrong.headers["allow"] == "POST"
    allowed = httpx.post(served.url + "/models", timeout=30).headers["allow"]
    assert sorted(allowed.split(", ")) == ["GET", "HEAD"]  # Starlette answers HEAD too, in no fixed order
    still_serving(served)
