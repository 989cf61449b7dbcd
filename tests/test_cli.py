"""The `llava-next` command: ask, caption (batches, resume), tiny-checkpoint, help, and bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import checkpoints
import pytest
import torch
from served import ServerProcess

from llava_next_plugin.cli import CommandError, main, read_done, result_line
from llava_next_plugin.tiny import MARKER_FILE

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def checkpoint(demo_checkpoint):
    return demo_checkpoint


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with three photos, a text file (ignored) and nothing else."""
    folder = tmp_path_factory.mktemp("photos")
    for name, size in (("a.png", (60, 40)), ("b.jpg", (40, 90)), ("c.png", (50, 50))):
        checkpoints.real_photo("chelsea.png").convert("RGB").resize(size).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def pipe(checkpoint):
    from transformers import pipeline

    return pipeline("image-to-text", model=str(checkpoint), device="cpu")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("llava-next: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", [[], ["ask"], ["caption"], ["tiny-checkpoint"], ["serve"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llava-next")
    if not command:
        for name in ("ask", "caption", "tiny-checkpoint", "serve"):
            assert name in out
    if command == ["ask"]:
        unwrapped = "".join(out.split())  # argparse wraps long help lines, at hyphens too
        assert "llava-hf/llava-v1.6-mistral-7b-hf" in unwrapped and "--model" in out


def test_ask_prints_the_answer_and_says_the_weights_are_random(checkpoint, images, pipe, capsys):
    code, out, err = run(
        capsys,
        "ask",
        images / "a.png",
        "--model",
        checkpoint,
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        6,
        "--device",
        "cpu",
    )
    assert code == 0
    expected = pipe(str(images / "a.png"), prompt=QUESTION, max_new_tokens=6)[0]["generated_text"]
    assert out.strip() == expected and out.endswith("\n")
    assert "RANDOM weights" in err


class _Terminal:
    """Records every write, to see the answer arrive in pieces."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_ask_streams_the_answer(checkpoint, images, pipe, monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    code = main(
        [
            "ask",
            str(images / "a.png"),
            "--model",
            str(checkpoint),
            "--prompt",
            QUESTION,
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    expected = pipe(str(images / "a.png"), prompt=QUESTION, max_new_tokens=12)[0]["generated_text"]
    assert "".join(terminal.writes).strip() == expected
    assert len([w for w in terminal.writes if w.strip()]) >= 2  # written as it is generated, not at the end


def test_ask_with_several_images_is_one_request(checkpoint, images, pipe, capsys):
    code, out, _ = run(
        capsys,
        "ask",
        images / "a.png",
        images / "b.jpg",
        "--model",
        checkpoint,
        "--prompt",
        "Which is taller?",
        "--max-new-tokens",
        5,
        "--device",
        "cpu",
    )
    assert code == 0
    expected = pipe([[str(images / "a.png"), str(images / "b.jpg")]], prompt=["Which is taller?"], max_new_tokens=5)[0][
        0
    ]["generated_text"]
    assert out.strip() == expected


def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(checkpoint, images, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but nothing after the signature")
    cases = {
        "does not exist": ["ask", tmp_path / "missing.png", "--model", checkpoint],
        "not an image": ["ask", broken, "--model", checkpoint],
        "2 <image> placeholder(s) but 1 image": [
            "ask",
            images / "a.png",
            "--model",
            checkpoint,
            "--prompt",
            "<image> <image> compare",
        ],
        "1 <image> placeholder(s) but 2 image": [
            "ask",
            images / "a.png",
            images / "a.png",
            "--model",
            tmp_path / "never-loaded",  # said before the model is looked at
            "--prompt",
            "one <image> only",
        ],
        "is a folder: give a results file": ["caption", images, "--out", tmp_path, "--model", checkpoint],
        "model": ["ask", images / "a.png", "--model", tmp_path / "no-such-model"],
        "is not a folder": ["caption", tmp_path / "nowhere", "--out", tmp_path / "r.jsonl", "--model", checkpoint],
        "at least 1": ["caption", images, "--out", tmp_path / "r.jsonl", "--batch-size", 0],
        "unknown prompt family 'klingon'": [
            "ask",
            images / "a.png",
            "--model",
            checkpoint,
            "--prompt-format",
            "klingon",
            "--max-new-tokens",
            1,
        ],
    }
    for expected, argv in cases.items():
        code, out, err = run(capsys, *argv)
        assert code == 1, (argv, err)
        assert expected in one_error_line(err), err
        assert out == ""
    # caption: a model that does not exist is said before any image is read or --out is made
    code, _, err = run(capsys, "caption", images, "--out", tmp_path / "r.jsonl", "--model", tmp_path / "no-model")
    assert code == 1 and "does not exist" in one_error_line(err) and "captioning" not in err
    assert not (tmp_path / "r.jsonl").exists()


def test_prompt_format_override(checkpoint, images, pipe, capsys):
    code, out, _ = run(
        capsys,
        "ask",
        images / "a.png",
        "--model",
        checkpoint,
        "--prompt",
        QUESTION,
        "--prompt-format",
        "vicuna",
        "--max-new-tokens",
        5,
        "--device",
        "cpu",
    )
    assert code == 0
    from llava_next_plugin.prompts import build_prompt

    formatted = build_prompt(QUESTION, pipe.processor, pipe.model.config, family="vicuna", num_images=1)
    assert "USER:" in formatted
    assert out.strip() == pipe(str(images / "a.png"), prompt=formatted, max_new_tokens=5)[0]["generated_text"]


def test_wrong_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["ask"])
    assert info.value.code == 2
    assert "usage: llava-next ask" in capsys.readouterr().err


def test_caption_resumes_and_never_leaves_half_a_line(checkpoint, images, tmp_path, pipe, capsys):
    out = tmp_path / "results.jsonl"
    kept = json.dumps({"image": "a.png", "prompt": "earlier", "generated_text": "from an earlier run"})
    out.write_text(kept + "\n" + '{"image": "b.jpg", "prompt": "cut off mid-wri')  # an interrupted write
    code, stdout, err = run(
        capsys,
        "caption",
        images,
        "--prompt",
        QUESTION,
        "--out",
        out,
        "--model",
        checkpoint,
        "--batch-size",
        2,
        "--max-new-tokens",
        5,
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "captioning" in err  # the progress bar
    text = out.read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == kept
    records = [json.loads(line) for line in lines]
    assert [r["image"] for r in records] == ["a.png", "b.jpg", "c.png"]
    for record in records[1:]:
        expected = pipe(str(images / record["image"]), prompt=QUESTION, max_new_tokens=5)[0]["generated_text"]
        assert record == {"image": record["image"], "prompt": QUESTION, "generated_text": expected}

    code, _, err = run(capsys, "caption", images, "--out", out, "--model", checkpoint)
    assert code == 0 and "already" in err
    assert out.read_text() == text
    assert read_done(out) == {"a.png", "b.jpg", "c.png"}


def test_result_lines_hold_any_file_name_and_text_and_read_back(tmp_path):
    """A file name that is not UTF-8 (held with surrogates) and line separators in a text (U+2028, U+0085):
    written as ASCII JSON lines, read back whole; an interrupted last line is cut off."""
    out = tmp_path / "results.jsonl"
    odd = b"caf\xe9.png".decode("utf-8", "surrogateescape")
    first = result_line(odd, "Describe.", "one\u2028two\x85three")
    second = result_line("b.png", "Describe.", "plain")
    out.write_bytes(first.encode("ascii") + second.encode("ascii") + b'{"image": "c.p')
    assert read_done(out) == {odd, "b.png"}
    assert out.read_bytes() == (first + second).encode("ascii")


def test_a_whole_last_result_without_its_newline_is_kept_and_an_out_that_is_no_file_is_not_read(tmp_path):
    """An editor may save the results without the final newline: that result is done, not cut off. A pipe or a
    device given as --out (/dev/stdout, /dev/null) is only written: read to resume, a pipe never ends."""
    import os

    out = tmp_path / "results.jsonl"
    first, last = result_line("a.png", "Describe.", "one"), result_line("b.png", "Describe.", "kept")
    out.write_text(first + last.rstrip("\n"))
    assert read_done(out) == {"a.png", "b.png"}
    assert out.read_text() == first + last
    pipe = tmp_path / "fifo"
    os.mkfifo(pipe)
    assert read_done(pipe) == set() and read_done(Path(os.devnull)) == set()  # written to, never read


def test_an_empty_model_is_refused_rather_than_read_as_the_default(images, capsys, tmp_path, monkeypatch):
    """--model "$MODEL" with the variable unset: not the default model, nor a 15 GB download."""
    monkeypatch.setenv("LLAVA_NEXT_MODEL", str(tmp_path / "not-this-one"))
    code, _, err = run(capsys, "ask", images / "a.png", "--model", "", "--prompt", QUESTION)
    assert code == 1 and "--model is empty: give a checkpoint folder or a hub id" in one_error_line(err)


def test_ask_prints_an_answer_its_output_encoding_cannot_hold(checkpoint, images, pipe, monkeypatch):
    """A Windows console or redirect (cp1252): characters it cannot hold are replaced, not an error after half
    the answer."""
    import io

    expected = pipe(str(images / "a.png"), prompt=QUESTION, max_new_tokens=20)[0]["generated_text"]
    with pytest.raises(UnicodeEncodeError):
        expected.encode("cp1252")  # the tiny model's answer holds Cyrillic and Hangul
    output = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(output, encoding="cp1252", errors="strict"))
    argv = ["ask", images / "a.png", "--model", checkpoint, "--prompt", QUESTION, "--max-new-tokens", 20]
    assert main([str(a) for a in argv]) == 0
    sys.stdout.flush()
    assert output.getvalue().decode("cp1252").strip() == expected.encode("cp1252", "replace").decode("cp1252")


@pytest.mark.parametrize("content", [b'{"images": ["a.png"]}', b"notes\nmore notes", b'{"image": "a.png"}\nnotes'])
def test_an_out_file_that_is_no_results_file_is_refused_untouched(tmp_path, content):
    out = tmp_path / "results.json"
    out.write_bytes(content)
    with pytest.raises(CommandError, match="fix or move the file"):
        read_done(out)
    assert out.read_bytes() == content


def test_caption_with_ray_refuses_a_prompt_format_it_would_not_use(checkpoint, images, tmp_path, capsys):
    argv = ["caption", images, "--model", checkpoint, "--out", tmp_path / "r.jsonl", "--ray", "local"]
    code, _, err = run(capsys, *argv, "--prompt-format", "mistral")
    assert code == 1 and "--prompt-format does not apply with --ray" in one_error_line(err)


def test_caption_skips_unreadable_images_and_reports_them(checkpoint, images, tmp_path, capsys):
    """Exit status 0 once every readable image is done, on the first run and on reruns; --strict makes an
    unreadable image fail the run; the summary counts unreadable images and non-image files."""
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    (folder / "bad.png").write_bytes(b"garbage")
    out = tmp_path / "mixed.jsonl"
    code, _, err = run(
        capsys,
        "caption",
        folder,
        "--out",
        out,
        "--model",
        checkpoint,
        "--max-new-tokens",
        2,
        "--device",
        "cpu",
        "--batch-size",
        3,
    )
    assert code == 0, err
    assert "skipped bad.png" in err and "Traceback" not in err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("llava-next: captioned 3 image(s) of ")
    assert "1 unreadable image(s) skipped (bad.png" in summary
    assert "1 non-image file(s) left alone (notes.txt)" in summary
    assert sorted(json.loads(line)["image"] for line in out.read_text().splitlines()) == ["a.png", "b.jpg", "c.png"]

    # A rerun tries bad.png again, loads no model for it (no note about the random weights), and keeps the rule.
    code, _, err = run(capsys, "caption", folder, "--out", out, "--model", checkpoint)
    assert code == 0, err
    assert "skipped bad.png" in err and "RANDOM" not in err
    assert "captioned 0 image(s)" in err and "3 were already there" in err and "1 unreadable" in err
    code, _, err = run(capsys, "caption", folder, "--out", out, "--model", checkpoint, "--strict")
    assert code == 1 and "1 unreadable image(s) skipped" in err
    (folder / "bad.png").unlink()
    code, _, err = run(capsys, "caption", folder, "--out", out, "--model", checkpoint, "--strict")
    assert code == 0 and "unreadable image" not in err


def test_caption_help_states_the_exit_status_rule(capsys):
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 when every readable image of DIR is in --out" in out and "--strict" in out


def test_version_comes_from_the_installed_metadata(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"llava-next {importlib.metadata.version('llava-next-plugin')}"


@pytest.mark.parametrize("command", ["ask", "caption", "tiny-checkpoint", "serve"])
def test_every_option_of_every_help_states_its_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    options = capsys.readouterr().out.split("options:\n", 1)[1].split("\n\n", 1)[0]
    entries, current = [], ""
    for line in options.splitlines():
        if line.startswith("  -"):
            entries.append(current)
            current = line
        else:
            current += " " + line.strip()
    entries = [" ".join(e.split()) for e in [*entries, current] if e and not e.lstrip().startswith("-h, --help")]
    assert entries
    for entry in entries:
        assert "default" in entry or entry.endswith("(required)"), (
            f"llava-next {command} --help: {entry!r} does not say its default"
        )


def test_serve_takes_the_model_from_the_environment_and_reports_a_missing_one_as_ask_does(
    images, tmp_path, monkeypatch, capsys
):
    missing = str(tmp_path / "no-such-checkpoint")
    monkeypatch.setenv("LLAVA_NEXT_MODEL", missing)
    code, _, err = run(capsys, "ask", images / "a.png")
    asked = one_error_line(err)
    assert code == 1 and missing in asked and "does not exist" in asked
    code, _, err = run(capsys, "serve", "--port", 9)
    assert code == 1 and one_error_line(err) == asked


def test_serve_refuses_limits_that_contradict_each_other_before_it_loads_the_model(checkpoint, capsys, caplog):
    """A request may hold more pixels than may be in flight at once: said before the model is loaded (which
    takes minutes for a real checkpoint): no engine is built."""
    caplog.set_level(logging.INFO, logger="llava_next_plugin")
    code, _, err = run(capsys, "serve", "--model", checkpoint, "--max-request-pixels", 10**9, "--port", 9)
    said = one_error_line(err)
    assert code == 1 and "max_pixels_in_flight" in said, said
    assert "KV slots" not in caplog.text, caplog.text  # what an engine logs when it is built


def test_serve_takes_its_model_from_the_environment_and_compiles_on_cpu_when_asked(checkpoint, tmp_path):
    """``$LLAVA_NEXT_MODEL`` names the model when ``--model`` is not given, and ``/health`` shows the folder's
    name, never its path; ``--compile`` compiles the decode step where it is off by default (CPU): the server
    warms it up before serving, logs it, and answers with it. (One server for both: each start costs seconds.)"""
    import httpx

    command = [sys.executable, "-m", "llava_next_plugin.serve_cli", "--compile", "--device", "cpu"]
    server = ServerProcess(command, tmp_path / "serve.log", env={"LLAVA_NEXT_MODEL": str(checkpoint)})
    try:
        assert server.health()["model"] == Path(checkpoint).name
        body = {"model": Path(checkpoint).name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        answer = httpx.post(server.url + "/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1, answer.text
    finally:
        assert server.terminate() == 0, server.log()
    assert "decode step warm-up (compiled)" in server.log(), server.log()


def test_serve_flags_that_cannot_work_are_said_before_the_model_loads(checkpoint, capsys, caplog):
    import socket

    caplog.set_level(logging.INFO, logger="llava_next_plugin")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, expected in (
            (["--port", 99999], "--port must be from 1 to 65535, got 99999"),
            (["--max-queue", 0], "--max-queue must be at least 1, got 0"),  # a server that would refuse all
            (["--prefill-chunk", 0], "--prefill-chunk must be at least 1, got 0"),
            (["--max-body-bytes", 0], "--max-body-bytes must be at least 1, got 0"),  # would refuse every body
            (["--url-timeout", -1], "--url-timeout must be at least 0.001, got -1"),
            (["--drain-timeout", "nan"], "--drain-timeout must be a finite number, got nan"),
            (["--port", port], f"cannot listen on 127.0.0.1:{port}"),
        ):
            code, _, err = run(capsys, "serve", "--model", checkpoint, *flags)
            assert code == 1 and expected in one_error_line(err), err
    assert "KV slots" not in caplog.text  # no engine was built
    with pytest.raises(SystemExit):  # argparse's own usage error, exit 2
        main(["serve", "--model", str(checkpoint), "--dtype", "float17"])
    assert "invalid choice: 'float17'" in capsys.readouterr().err


def test_tiny_checkpoint_prints_a_command_a_shell_reads_back_and_leaves_no_partial_folder(tmp_path, capsys):
    folder = tmp_path / "my tiny"
    code, out, _ = run(capsys, "tiny-checkpoint", folder)
    assert code == 0 and f"--model '{folder}'" in out and f"ask '{folder / 'example.png'}'" in out
    assert [p.name for p in tmp_path.iterdir()] == ["my tiny"]  # the staging folder was renamed into place
    assert (folder / "config.json").is_file() and (folder / "llava_next_tiny.json").is_file()


def test_interrupting_ask_or_closing_its_output_ends_it_cleanly(checkpoint, images):
    """Ctrl-C while it streams: exit 130; a reader that goes away (`| head -c 3`): exit 141, quietly. Either
    way generation stops before the process ends (torch aborted a process whose worker was mid-op)."""
    argv = [*_command(), "ask", str(images / "a.png"), "--model", str(checkpoint), "--max-new-tokens", "100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    interrupted = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert interrupted.stdout.read(3)  # it is streaming
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, err
    assert b"interrupted" in err and b"terminate called" not in err and b"Traceback" not in err

    closed = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert closed.stdout.read(3)
    closed.stdout.close()
    err = closed.stderr.read()
    assert closed.wait(timeout=120) == 141, err
    assert b"terminate called" not in err and b"Traceback" not in err and b"error" not in err


def test_tiny_checkpoint_without_the_demo_extra_says_what_to_install_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # as if not installed: importing it fails
    code, _, err = run(capsys, "tiny-checkpoint", tmp_path / "tiny")
    assert code == 1 and "llava-next-plugin[demo]" in one_error_line(err)
    assert not (tmp_path / "tiny").exists()  # so the same command works once the extra is installed


def test_tiny_checkpoint_refuses_a_non_empty_folder(checkpoint, capsys):
    code, _, err = run(capsys, "tiny-checkpoint", checkpoint)
    assert code == 1 and "not an empty folder" in one_error_line(err)


def test_tiny_checkpoint_says_what_is_wrong_with_a_path_or_seed_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv, says in (
        ([tmp_path / "file" / "sub"], "is a file, so"),
        ([""], "OUT is empty"),
        (["--seed", str(2**70), tmp_path / "new"], "--seed must be from 0"),
    ):
        code, _, err = run(capsys, "tiny-checkpoint", *argv)
        assert code == 1 and says in one_error_line(err), err
    assert not (tmp_path / "new").exists()


def test_ask_takes_a_data_url_and_a_name_too_long_for_a_path_is_not_a_crash(checkpoint, capsys):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    code, out, err = run(capsys, "ask", url, "--model", checkpoint, "--max-new-tokens", 2)
    assert code == 0 and out.strip(), err
    code, _, err = run(capsys, "ask", "x" * 5000 + ".png", "--model", checkpoint)
    assert code == 1 and "does not exist" in one_error_line(err) and len(one_error_line(err)) < 200


def test_ask_waits_for_a_silent_image_url_as_long_as_url_timeout_says(checkpoint, capsys):
    import socket

    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
        code, _, err = run(capsys, "ask", url, "--model", checkpoint, "--url-timeout", 0.3)
    assert code == 1 and "did not answer within 0.3 s" in one_error_line(err) and "--url-timeout" in err
    code, _, err = run(capsys, "ask", url, "--model", checkpoint, "--url-timeout", 0)
    assert code == 1 and "--url-timeout" in one_error_line(err)


def test_tiny_checkpoint_layers_are_64_wide_and_in_hub_layout(checkpoint):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(min(m.in_features, m.out_features) >= 64 for m in linears)
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert "language_model.lm_head.weight" in keys and "image_newline" in keys
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in keys)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer.model",
        "processor_config.json",
        "chat_template.jinja",
        "README.md",
        MARKER_FILE,
    ):
        assert (checkpoint / name).is_file(), name
    assert "random" in (checkpoint / "README.md").read_text().lower()


def _command() -> list[str]:
    found = shutil.which("llava-next")
    return [found] if found else [sys.executable, "-m", "llava_next_plugin.cli"]


def test_main_job_offline_through_the_installed_command(tmp_path, images, capsys):
    """The README's main job: `llava-next tiny-checkpoint ./tiny && llava-next ask IMAGE --model ./tiny ...`
    (the first step in-process, the second through the installed command in a fresh, offline process)."""
    code, out, _ = run(capsys, "tiny-checkpoint", tmp_path / "tiny")
    assert code == 0 and "RANDOM weights" in out
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "llava-next tiny-checkpoint ./tiny" in readme
    assert "llava-next ask ./tiny/example.png --model ./tiny --prompt" in readme
    asked = subprocess.run(
        [*_command(), "ask", "./tiny/example.png", "--model", "./tiny", "--prompt", QUESTION, "--max-new-tokens", "4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.strip()
    assert (
        asked.stderr.strip() == "note: ./tiny holds RANDOM weights (a tiny demo checkpoint): the answers are gibberish."
    )


def test_caption_honours_detail_and_refuses_several_placeholders_before_loading(
    checkpoint, images, tmp_path, pipe, capsys
):
    out = tmp_path / "low.jsonl"
    argv = ["caption", images, "--out", out, "--model", checkpoint, "--max-new-tokens", 4, "--device", "cpu"]
    code, _, err = run(capsys, *argv, "--detail", "low", "--batch-size", 2)
    assert code == 0, err
    for record in map(json.loads, out.read_text().splitlines()):
        expected = pipe(str(images / record["image"]), max_new_tokens=4, detail="low")[0]["generated_text"]
        assert record["generated_text"] == expected  # --detail low was ignored without --ray
    code, _, err = run(capsys, *argv[:-4], "--prompt", "<image><image> compare", "--out", tmp_path / "two.jsonl")
    assert code == 1 and "caption answers about one image at a time" in one_error_line(err)
    assert not (tmp_path / "two.jsonl").exists()


@pytest.mark.parametrize("device, says", [("bogus", "is not a torch device"), ("cuda", "sees no CUDA device")])
def test_a_device_that_cannot_work_is_said_before_the_model_loads(images, device, says, tmp_path, capsys):
    if device == "cuda" and __import__("torch").cuda.is_available():
        device, says = "bogus", "is not a torch device"  # this machine has one: the other case says the same
    for command in (["ask", images / "a.png"], ["caption", images, "--out", tmp_path / "r.jsonl"], ["serve"]):
        # a model that does not exist: had the device not been checked first, the error would be the model's
        code, _, err = run(capsys, *command, "--model", "/nonexistent/model", "--device", device)
        assert code == 1 and says in one_error_line(err) and "--device" in err


def test_ask_and_caption_read_each_image_through_the_image_hook_once(checkpoint, images, tmp_path, capsys):
    """The command line reads images before loading the model: the pipeline must not read them a second time
    (a plugin that logs, counts or changes images would act twice)."""
    from llava_next_plugin.hooks import get_plugin_manager, hookimpl

    seen = []

    class Counting:
        @hookimpl(tryfirst=True)
        def llava_next_load_image(self, source, timeout):
            seen.append(type(source).__name__)

    manager = get_plugin_manager()
    plugin = Counting()
    manager.register(plugin, name="counting")
    try:
        code, _, err = run(
            capsys, "ask", images / "a.png", "--model", checkpoint, "--max-new-tokens", 2, "--device", "cpu"
        )
        assert code == 0, err
        assert seen == ["str"]
        seen.clear()
        out = tmp_path / "once.jsonl"
        code, _, err = run(capsys, "caption", images, "--out", out, "--model", checkpoint, "--max-new-tokens", 2)
        assert code == 0, err
        assert seen == ["str"] * 3
    finally:
        manager.unregister(plugin)


def test_caption_refuses_ray_options_without_ray_rather_than_ignore_them(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    for extra, named in ((["--workers", 2], "--workers"), (["--gpus-per-worker", 1, "--id-column", "x"], "--gpus")):
        code, _, err = run(capsys, "caption", images, "--out", out, "--model", checkpoint, *extra)
        assert code == 1 and named in one_error_line(err) and "with --ray only" in err
    assert not out.exists()
