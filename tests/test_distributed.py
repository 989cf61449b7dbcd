"""Past one machine on a real local Ray runtime: Ray Data captioning, the Ray Serve deployment, and what
survives a killed actor or replica.

One Ray runtime serves the whole module (2 CPUs, no dashboard, a small object store) and is shut down at
the end of the session whatever happens. Actors and replicas run the tiny checkpoint on CPU, one torch
thread each.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import checkpoints
import psutil
import pytest
import ray  # the ray extra is part of the dev install (pip install -e '.[dev]')
from llava_next_sdk import AsyncClient
from llava_next_sdk.errors import AuthenticationError, BadRequestError, InvalidImageError
from PIL import Image
from served import free_port

from llava_next_plugin.cli import main

PROMPT = "Describe this image."
API_KEY = "test-key"


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray runtime for the session, always shut down at its end (even when a test fails)."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=96 * 1024 * 1024,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


def _ray_processes(title: str) -> list[psutil.Process]:
    """This test process's own Ray workers whose process title starts with *title* (never anyone else's)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith(title):
                found.append(process)
        except psutil.Error:
            pass
    return found


def _png(seed: int, size=(48, 40)) -> bytes:
    image = checkpoints.real_photo().convert("RGB").rotate(seed * 37).resize(size)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def engine(demo_checkpoint):
    """A single-process engine on the same checkpoint: what every distributed answer must equal (greedy)."""
    from llava_next_plugin.engine import Engine

    engine = Engine.from_pretrained(str(demo_checkpoint), device="cpu", model_name="tiny")
    yield engine
    engine.shutdown(drain=False)


def _expected(engine, image_bytes: bytes | None, text: str, max_tokens: int, detail: str = "auto") -> str:
    from PIL import Image

    from llava_next_plugin.engine import SamplingParams

    content = [{"type": "text", "text": text}]
    images = []
    if image_bytes is not None:
        content.insert(0, {"type": "image"})
        images.append(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    return engine.generate(
        [{"role": "user", "content": content}],
        images,
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        image_detail=[detail] * len(images),
    ).text


def _iterate_killing_an_actor(results) -> tuple[dict[str, dict], psutil.Process | None, int]:
    """Read *results*, killing one Data actor's process once the first row is in: (rows by id, the process
    killed, rows read after the kill). A row read twice fails the test."""
    seen: dict[str, dict] = {}
    killed = None
    after_kill = 0
    for row in results.iter_rows():
        assert row["id"] not in seen, f"row {row['id']} answered twice"
        seen[row["id"]] = row
        if killed is None:
            actors = _ray_processes("ray::MapWorker(MapBatches(_Captioner))")
            assert actors, "no Data actor process found"
            killed = actors[0]
            killed.send_signal(signal.SIGKILL)
        else:
            after_kill += 1
    return seen, killed, after_kill


@contextlib.contextmanager
def _image_host(data: bytes):
    """An HTTP server on 127.0.0.1 in a thread, serving *data* as a PNG; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    finally:
        server.shutdown()
        server.server_close()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# --- importing stays light ------------------------------------------------------------------------------------
def test_importing_the_package_never_imports_ray_and_without_ray_the_api_says_how_to_install_it(demo_checkpoint):
    code = (
        "import sys, llava_next_plugin, llava_next_plugin.distributed as d, llava_next_plugin.cli as cli\n"
        "cli.build_parser()\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "sys.modules['ray'] = None  # as if it were not installed\n"
        "try:\n    d.caption_dataset(None, 'm')\nexcept ImportError as e:\n    print(e)\n"
        "try:\n    d.build_serve_app({'model': 'm'})\nexcept ImportError as e:\n    print(e)\n"
        f"argv = ['serve', '--model', {str(demo_checkpoint)!r}, '--ray', 'local', '--port', '{free_port()}']\n"
        "print('serve rc', cli.main(argv))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("pip install 'llava-next-plugin[ray]'") == 2, done.stdout
    assert "serve rc 1" in done.stdout and "pip install 'llava-next-plugin[ray]'" in done.stderr, done.stderr


def test_an_actor_answers_bytes_and_datasets_image_cells_and_bad_cells_with_an_error(demo_checkpoint, engine):
    """The actor's work without Ray: encoded bytes, Hugging Face ``{"bytes", "path"}`` cells, bad cells."""
    import numpy as np

    from llava_next_plugin.distributed import _Captioner
    from llava_next_plugin.validation import Limits

    actor = _Captioner(str(demo_checkpoint), PROMPT, "picture", 6, "auto", Limits(), "cpu", None, 1, 4)
    try:
        cells = np.array([_png(1), {"bytes": _png(2), "path": None}, b"", None], dtype=object)
        out = actor({"picture": cells, "n": np.arange(4)})
    finally:
        actor.engine.shutdown(drain=False)
    assert list(out["n"]) == [0, 1, 2, 3]  # the input columns are kept
    assert out["answer"][:2] == [_expected(engine, _png(1), PROMPT, 6), _expected(engine, _png(2), PROMPT, 6)]
    assert out["error"][:2] == [None, None] and min(out["tokens"][:2]) >= 1
    assert out["answer"][2:] == [None, None] and out["tokens"][2:] == [0, 0]
    assert "InvalidImageError" in out["error"][2] and "NoneType, not a path, URL or encoded bytes" in out["error"][3]


def test_an_actor_adds_typed_columns_to_an_arrow_block_and_keeps_the_others_as_they_came(demo_checkpoint, engine):
    """Ray hands the actor pyarrow blocks: a block whose rows all failed still has a string ``answer`` column
    (a null-typed one made Parquet files of one job unreadable together), and list columns stay lists."""
    import pyarrow as pa

    from llava_next_plugin.distributed import _Captioner
    from llava_next_plugin.validation import Limits

    actor = _Captioner(str(demo_checkpoint), PROMPT, "picture", 4, "auto", Limits(), "cpu", None, 1, 4)
    try:
        failed = actor(pa.table({"picture": pa.array([b"", b"x"]), "tags": pa.array([[1, 2], [3]])}))
        good = actor(pa.table({"picture": pa.array([_png(1)]), "tags": pa.array([[4]])}))
    finally:
        actor.engine.shutdown(drain=False)
    for block in (failed, good):
        assert block.schema.field("answer").type == pa.string() and block.schema.field("error").type == pa.string()
        assert block.schema.field("tokens").type == pa.int64()
        assert block.schema.field("tags").type == pa.list_(pa.int64())
    assert failed.column("answer").to_pylist() == [None, None] and good.column("error").to_pylist() == [None]
    assert good.column("answer").to_pylist() == [_expected(engine, _png(1), PROMPT, 4)]
    assert pa.concat_tables([failed, good]).num_rows == 3  # one schema


def test_an_actor_with_low_detail_answers_from_the_base_view_as_the_engine_does(demo_checkpoint, engine):
    from llava_next_plugin.distributed import _Captioner
    from llava_next_plugin.validation import Limits

    actor = _Captioner(str(demo_checkpoint), PROMPT, "picture", 6, "low", Limits(), "cpu", None, 1, 4)
    try:
        prepared = actor._prepare(_png(3, size=(96, 40)))
        full = actor.engine.prepare(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
            [prepared_image(_png(3, size=(96, 40)))],
        )
        assert prepared.image_tokens < full.image_tokens  # the base view only
        out = actor({"picture": [_png(3, size=(96, 40))]})
    finally:
        actor.engine.shutdown(drain=False)
    assert out["answer"] == [_expected(engine, _png(3, size=(96, 40)), PROMPT, 6, detail="low")]


def prepared_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def test_bad_scaling_options_are_clear_errors():
    from llava_next_plugin.distributed import build_serve_app, parse_autoscale

    assert parse_autoscale("1..4") == (1, 4)
    for bad in ("4..1", "3", "a..b", "0..0", "-1..2"):
        with pytest.raises(ValueError, match="MIN..MAX"):
            parse_autoscale(bad)
    with pytest.raises(ValueError, match="unknown serve option.*replica_count"):
        build_serve_app({"model": "m", "replica_count": 2})
    with pytest.raises(ValueError, match="model="):
        build_serve_app({"replicas": 2})
    with pytest.raises(ValueError, match="replicas must be at least 1"):
        build_serve_app({"model": "m", "replicas": "0"})
    with pytest.raises(ValueError, match="'maybe' is not a yes/no value"):
        build_serve_app({"model": "m", "compile": "maybe"})
    with pytest.raises(ValueError, match="max_batch_size and max_queue must be at least 1, got 8 and 0"):
        build_serve_app({"model": "m", "max_queue": "0"})  # every request passes through the queue


def test_serve_options_reach_the_deployment_the_engine_and_the_app_as_llava_next_serve_passes_them():
    """Autoscaling becomes Serve's autoscaling config; every request limit and engine option of
    ``llava-next serve`` reaches each replica's engine and app (strings too, as ``serve run`` gives them)."""
    from llava_next_plugin.distributed import build_serve_app
    from llava_next_plugin.validation import Limits

    app = build_serve_app(
        {
            "model": "/models/llava-tiny",
            "autoscale": "1..3",
            "replicas": "2",
            "max_batch_size": "4",
            "max_model_len": "2048",
            "prefill_chunk": "128",
            "compile": "false",
            "max_stop_chars": "5",
            "url_timeout": "2.5",
            "max_request_pixels": "1000000",
            "allow_url_domains": "example.com,images.example.org",
        }
    )
    deployment = app._bound_deployment  # what Serve deploys (no public accessor)
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (1, 3, 2)
    assert scaling.target_ongoing_requests == 4
    model, engine_options, app_options, _threads = deployment.init_args
    assert model == "/models/llava-tiny"
    assert engine_options["max_context"] == 2048 and engine_options["prefill_chunk"] == 128
    assert engine_options["compile"] is False and engine_options["max_batch_size"] == 4
    assert engine_options["model_name"] == "llava-tiny"  # a folder is served by its base name, as on one machine
    assert app_options["model_aliases"] == ("/models/llava-tiny",)
    assert app_options["limits"] == Limits(
        max_stop_chars=5,
        url_timeout=2.5,
        max_request_pixels=1_000_000,
        allowed_url_domains=("example.com", "images.example.org"),
    )
    assert build_serve_app({"model": "m", "replicas": 3})._bound_deployment.num_replicas == 3


def test_serve_deployments_drain_for_their_timeout_take_the_env_api_key_and_absolute_folders(tmp_path, monkeypatch):
    """Serve stops a replica after drain_timeout (not its own 20 s), ``serve run`` reads $LLAVA_NEXT_API_KEY as
    ``llava-next serve`` does, domains lose their spaces, and a relative folder reaches replicas absolute (they
    run in another working directory)."""
    from llava_next_plugin.distributed import build_serve_app

    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLAVA_NEXT_API_KEY", "secret")
    app = build_serve_app({"model": "./tiny", "drain_timeout": "120", "allow_url_domains": "a.com, b.com"})
    deployment = app._bound_deployment
    assert deployment._deployment_config.graceful_shutdown_timeout_s >= 120
    model, _engine_options, app_options, _threads = deployment.init_args
    assert model == str(tmp_path / "tiny")
    assert app_options["api_key"] == "secret"
    assert app_options["limits"].allowed_url_domains == ("a.com", "b.com")
    assert build_serve_app({"model": "org/hub-model"})._bound_deployment.init_args[0] == "org/hub-model"


def test_cpus_per_replica_and_per_worker_are_options_that_reach_ray():
    """A CPU replica or actor on a many-core node runs as many torch threads as it reserves CPUs (Ray sets
    OMP_NUM_THREADS to its num_cpus: one core each, before these options)."""
    from llava_next_plugin.cli import build_parser
    from llava_next_plugin.distributed import build_serve_app

    args = build_parser().parse_args(["serve", "--ray", "auto", "--cpus-per-replica", "4"])
    assert args.cpus_per_replica == 4
    assert (
        build_parser().parse_args(["caption", "d", "--out", "o.jsonl", "--cpus-per-worker", "3"]).cpus_per_worker == 3
    )
    deployment = build_serve_app({"model": "m", "cpus_per_replica": "4", "threads": "4"})._bound_deployment
    assert deployment.ray_actor_options["num_cpus"] == 4 and deployment.init_args[3] == 4


def test_the_serve_run_entry_point_builds_an_application_from_string_args():
    """``serve run llava_next_plugin.distributed:build_serve_app model=... replicas=4`` hands over strings."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what `serve run` calls

    from llava_next_plugin.distributed import build_serve_app

    for args in ({"model": "m", "replicas": "4", "gpus_per_replica": "1"}, {"model": "m", "autoscale": "1..3"}):
        assert isinstance(call_user_app_builder_with_args_if_necessary(build_serve_app, args), Application)


# --- Ray Data ----------------------------------------------------------------------------------------------------
def test_caption_command_with_ray_local_resumes_shows_progress_and_stops_its_runtime(demo_checkpoint, tmp_path):
    """``llava-next caption DIR --ray local`` as a user runs it: its own Ray runtime (even with RAY_ADDRESS
    pointing elsewhere), resumed with no duplicates and no half lines, a progress bar, the final counts, and
    no Ray process of its runtime left once it exits."""
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [f"p{i}.png" for i in range(5)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(_png(i))
    Image.new("RGB", (4200, 4100), (90, 120, 60)).save(folder / names[4])  # 17 MP: over the server's 16, a photo
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and nothing else")
    out = tmp_path / "results.jsonl"
    prompt = "<image>\n" + PROMPT  # a placeholder in the prompt, as the single-machine caption takes it too
    done_line = json.dumps({"image": "p0.png", "prompt": prompt, "generated_text": "from an earlier run"})
    out.write_text(done_line + "\n" + '{"image": "p1.png", "prom')  # an earlier run, interrupted mid-line

    ray_root = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    argv = ["caption", str(folder), "--model", str(demo_checkpoint), "--prompt", prompt, "--out", str(out)]
    argv += ["--ray", "local", "--workers", "1", "--max-new-tokens", "6", "--batch-size", "2"]
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "RAY_TMPDIR": ray_root}  # no cluster there
    try:
        done = subprocess.run(
            [sys.executable, "-m", "llava_next_plugin.cli", *argv], env=env, capture_output=True, text=True, timeout=300
        )
        left = [p for p in psutil.process_iter(["cmdline"]) if ray_root in " ".join(p.info["cmdline"] or ())]
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
    assert done.returncode == 0, done.stderr  # one image could not be read: skipped and counted, as on one machine
    assert not left, f"the local Ray runtime outlived the command: {[p.info['cmdline'][:1] for p in left]}"
    lines = out.read_text().splitlines()
    assert lines[0] == done_line
    results = [json.loads(line) for line in lines]  # every line whole
    assert sorted(r["image"] for r in results) == names  # p0 kept, not redone; p1..p4 once each; broken.png absent
    assert all(r["prompt"] == prompt and r["generated_text"] for r in results)
    assert "captioning" in done.stderr and "6/6" in done.stderr  # the progress bar, from the row already done on
    assert "failed broken.png" in done.stderr and "4 captioned, 1 failed, 1 already" in done.stderr


def test_caption_dataset_answers_every_row_once_even_when_an_actor_is_killed(
    ray_session, demo_checkpoint, engine, tmp_path
):
    from llava_next_plugin.distributed import caption_dataset
    from llava_next_plugin.validation import Limits

    photo = tmp_path / "photo.png"
    photo.write_bytes(_png(100))
    rows = [{"id": f"url-{i}", "image": _data_url(_png(i))} for i in range(14)]
    rows += [
        {"id": "path", "image": _data_url(_png(100))},  # the same picture as the file below
        {"id": "file", "image": str(photo)},
        {"id": "garbage", "image": _data_url(b"not an image")},
        {"id": "missing", "image": str(tmp_path / "nope.png")},
        {"id": "url", "image": "http://example.com/cat.png"},  # not an allowed host: never fetched
    ]
    with _image_host(_png(101)) as allowed_url:  # an allowed host: fetched by the actor, as by the server
        rows.append({"id": "allowed", "image": allowed_url})
        ds = ray.data.from_items(rows)
        results = caption_dataset(
            ds,
            str(demo_checkpoint),
            prompt=PROMPT,
            max_tokens=12,
            workers=2,
            cpus_per_worker=0.5,
            threads_per_worker=1,
            batch_size=2,
            limits=Limits(allowed_url_domains=("127.0.0.1",)),
        )
        seen, killed, after_kill = _iterate_killing_an_actor(results)
    assert killed is not None and after_kill > 0
    assert set(seen) == {r["id"] for r in rows}

    for i in range(14):  # every good row answered, with the same answer as one engine in one process
        assert seen[f"url-{i}"]["error"] is None and seen[f"url-{i}"]["tokens"] >= 1, seen[f"url-{i}"]["error"]
        assert seen[f"url-{i}"]["answer"] == _expected(engine, _png(i), PROMPT, 12)
    assert seen["allowed"]["answer"] == _expected(engine, _png(101), PROMPT, 12), seen["allowed"]["error"]
    assert seen["file"]["answer"] == seen["path"]["answer"] is not None, seen["file"]["error"]
    for bad, why in (
        ("garbage", "InvalidImageError"),
        ("missing", "does not exist"),
        ("url", "from 'example.com' are not allowed"),
    ):
        assert seen[bad]["answer"] is None and why in seen[bad]["error"]


def test_caption_command_reads_parquet_image_bytes_and_writes_parquet(
    ray_session, demo_checkpoint, tmp_path, capsys, engine
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "images.parquet"
    pq.write_table(pa.table({"name": ["a", "b", "c"], "image": [_png(1), _png(2), b"junk"]}), source)
    out = tmp_path / "results.parquet"
    argv = [
        "caption",
        str(source),
        "--model",
        str(demo_checkpoint),
        "--prompt",
        PROMPT,
        "--out",
        str(out),
        "--ray",
        "local",
        "--max-new-tokens",
        "5",
    ]
    assert main(argv) == 1  # the bytes column cannot name the rows
    assert "give --id-column" in capsys.readouterr().err and not out.exists()
    # nor can Hugging Face's image column, a struct of the image's bytes and path (each id would hold the image)
    hf_source = tmp_path / "hf" / "images.parquet"
    hf_source.parent.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": _png(1), "path": "a.png"}]}), hf_source)
    assert main([*argv[:1], str(hf_source), *argv[2:]]) == 1
    err = capsys.readouterr().err
    assert "'image' holds struct<bytes: binary, path: string> values" in err and "give --id-column" in err
    assert not out.exists()

    assert main(argv + ["--id-column", "name"]) == 0  # the unreadable row is skipped and counted, as on one machine
    err = capsys.readouterr().err
    assert "failed c: InvalidImageError" in err and "2 captioned, 1 failed, 0 already" in err
    table = pq.read_table(out).to_pylist()
    assert sorted(r["image"] for r in table) == ["a", "b"]
    assert {r["image"]: r["generated_text"] for r in table}["b"] == _expected(engine, _png(2), PROMPT, 5)
    assert len((tmp_path / "results.parquet.jsonl").read_text().splitlines()) == 2  # the resume journal
    assert main(argv + ["--id-column", "name", "--strict"]) == 1  # a rerun tries c again; --strict fails on it
    assert "0 captioned, 1 failed, 2 already" in capsys.readouterr().err


def test_caption_refuses_ids_that_repeat_column_flags_on_a_folder_and_gpus_the_runtime_lacks(
    ray_session, demo_checkpoint, tmp_path, capsys
):
    """Each refused at once, before any actor loads a model: ids that repeat (results could not say which row
    they are for, nor a rerun which rows are done), parquet's column flags on a folder, and GPUs the Ray runtime
    does not have (Ray would wait for them for ever)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"label": ["cat", "cat", "dog"], "image": [_png(1), b"junk", _png(2)]}), source)
    out = tmp_path / "out.jsonl"
    base = ["--model", str(demo_checkpoint), "--out", str(out), "--ray", "local", "--max-new-tokens", "3"]
    assert main(["caption", str(source), "--id-column", "label", *base]) == 1
    err = capsys.readouterr().err
    assert "the column 'label' names 3 rows with 2 distinct values" in err and "--id-column" in err
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(3))
    for flag in ("--id-column", "--image-column"):
        assert main(["caption", str(folder), flag, "name", *base]) == 1
        assert f"{flag} applies to parquet input" in capsys.readouterr().err
    assert main(["caption", str(folder), "--gpus-per-worker", "1", *base]) == 1
    assert "--gpus-per-worker asks for 1 GPU(s) in all, but the Ray runtime on this machine has 0" in (
        capsys.readouterr().err
    )
    assert not out.exists()


def test_serve_on_ray_local_says_a_taken_port_before_starting_ray(demo_checkpoint, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--model", str(demo_checkpoint), "--ray", "local", "--host", "127.0.0.1"]
        assert main([*argv, "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# --- Ray Serve ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployment(ray_session, demo_checkpoint, tmp_path_factory):
    """``llava-next serve --ray ADDRESS --replicas 2`` run as a user runs it, against the session's Ray runtime
    (as against an existing cluster), on a free loopback port; yields the base URL (ending in /v1). SIGTERM
    stops it: it must exit 0 and take its application down."""
    import httpx

    port = free_port()
    address = ray_session.get_runtime_context().gcs_address
    argv = ["serve", "--model", str(demo_checkpoint), "--ray", address, "--replicas", "2", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--served-model-name", "tiny", "--api-key", API_KEY]
    argv += ["--max-images-per-request", "1", "--max-stop-chars", "5"]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as output:
        command = subprocess.Popen(
            [sys.executable, "-m", "llava_next_plugin.cli", *argv], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        while "llava-next: serving" not in log.read_text():  # printed once serve.run returns: replicas are up
            assert command.poll() is None, f"llava-next serve --ray exited: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        command.send_signal(signal.SIGTERM)
        try:
            code = command.wait(timeout=120)
        except subprocess.TimeoutExpired:
            command.kill()  # never leave it behind; the session's runtime shutdown takes its replicas
            raise
    assert code == 0, log.read_text()[-3000:]
    deadline = time.monotonic() + 60  # a stopped actor's process exits soon after
    while _ray_processes("ray::ServeReplica") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes("ray::ServeReplica"), "llava-next serve --ray left its replicas running"


def test_a_second_serve_on_the_same_cluster_is_refused_and_leaves_the_first_serving(
    deployment, ray_session, demo_checkpoint
):
    """Deploying would replace the running application (another user's, maybe), and exiting would delete it."""
    import httpx

    address = ray_session.get_runtime_context().gcs_address
    second = subprocess.run(
        [sys.executable, "-m", "llava_next_plugin.cli", "serve", "--model", str(demo_checkpoint), "--ray", address]
        + ["--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 1, second.stderr[-2000:]
    assert "a Ray Serve application named 'llava-next' already runs on this cluster" in second.stderr
    assert httpx.get(deployment.removesuffix("/v1") + "/health", timeout=30).status_code == 200


def test_the_sdk_http_transport_works_against_ray_serve_unchanged(deployment, engine):
    async def scenario():
        async with AsyncClient(base_url=deployment, api_key=API_KEY, model="tiny") as client:
            image = _png(3)
            result = await client.generate(image, PROMPT, max_tokens=8, temperature=0)
            assert result.text == _expected(engine, image, PROMPT, 8)
            assert result.usage.image_tokens > 0 and result.model == "tiny"
            async with client.stream(image, PROMPT, max_tokens=8, temperature=0) as stream:
                streamed = "".join([delta async for delta in stream])
            assert streamed == result.text
            with pytest.raises(BadRequestError, match="at most 1"):  # the same limits as the one-process server
                await client.generate([image, image], PROMPT, max_tokens=2)
            with pytest.raises(InvalidImageError, match="not allowed"):
                await client.generate("http://example.com/cat.png", PROMPT, max_tokens=2)
            with pytest.raises(BadRequestError, match="at most 5 characters"):  # --max-stop-chars 5 reached it
                await client.generate(image, PROMPT, max_tokens=2, stop=["longer"])
        async with AsyncClient(base_url=deployment, api_key="wrong", model="tiny") as client:
            with pytest.raises(AuthenticationError):
                await client.generate(image, PROMPT, max_tokens=2)

    asyncio.run(scenario())
    import httpx

    models = httpx.get(deployment + "/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]
    chat = httpx.post(
        deployment + "/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {API_KEY}", "X-Request-ID": "trace-9"},
        timeout=60,
    )
    assert chat.headers.get_list("x-request-id") == ["trace-9"] == [chat.json()["id"]]  # once, not Serve's and ours
    metrics = httpx.get(deployment.removesuffix("/v1") + "/metrics", timeout=30)  # the replica that answers
    assert metrics.status_code == 200 and "llava_next_http_requests_total" in metrics.text
    assert "llava_next_queue_depth" in metrics.text


def test_killing_a_replica_during_32_requests_loses_nothing(deployment, engine):
    prompts = [f"Say number {i}." for i in range(32)]
    victims = _ray_processes("ray::ServeReplica:llava-next:LlavaNextServer")
    assert len(victims) == 2

    async def scenario():
        async with AsyncClient(base_url=deployment, api_key=API_KEY, model="tiny", max_retries=8) as client:

            async def ask(text):
                return await client.chat([{"role": "user", "content": text}], max_tokens=24, temperature=0)

            tasks = [asyncio.create_task(ask(text)) for text in prompts]
            await asyncio.sleep(0.5)
            assert not all(t.done() for t in tasks)
            victims[0].send_signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert not victims[0].is_running() or victims[0].status() == psutil.STATUS_ZOMBIE
    assert len(results) == 32 and len({r.id for r in results}) == 32  # one answer per request
    for text, result in zip(prompts, results, strict=True):
        assert result.text == _expected(engine, None, text, 24)
