"""Every code block of the README runs as written, in order, in one fresh folder, as a newcomer would.

- ``bash`` blocks run with ``bash -e`` in that folder, with the installed ``llava-next`` command. Lines that
  install packages (``pip install``) are not run (they would change this machine's environment); they are
  checked instead: every local path they name exists in this repository, every extra is declared, the
  index URL is https. The one block that starts ``llava-next serve`` runs in the background, on a free
  loopback port given as ``$PORT``, until the section's last block has run.
- ``python`` blocks run as scripts (``python3 block.py``) in the same folder and environment.
- The plugin example's two files (``toml`` and its module) are written where its install line points,
  and the install line puts them on ``PYTHONPATH`` the way ``pip install`` would (a dist-info with the
  entry points), since nothing may be installed into this environment.

Only ``HF_HUB_OFFLINE=1`` is added: nothing reaches the network.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from served import free_port
from test_hooks import install_offline

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BLOCK_TIMEOUT = 600
pytestmark = pytest.mark.timeout(1800)  # the first test also runs every block (the module fixture)


@dataclass
class Block:
    section: str
    language: str
    text: str
    line: int

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.section}, {self.language})"


def readme_blocks() -> list[Block]:
    blocks, section = [], ""
    lines = README.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.lstrip().startswith("```"):
            indent = len(line) - len(line.lstrip())
            language = line.strip()[3:].strip()
            start, body = index + 1, []
            index += 1
            while not lines[index].lstrip().startswith("```"):
                body.append(lines[index][indent:])
                index += 1
            blocks.append(Block(section, language, "\n".join(body) + "\n", start))
        index += 1
    return blocks


INSTALL = re.compile(r"^\s*(python3 -m )?pip install\b")


def check_install_line(line: str, block: Block) -> str | None:
    """Check a ``pip install`` line against the repository; return the local project it installs, if one
    outside the repository (the plugin example's folder)."""
    words = shlex.split(line.split("#", 1)[0])
    words = words[words.index("install") + 1 :]
    outside = None
    for i, word in enumerate(words):
        if word == "--index-url":
            assert words[i + 1].startswith("https://"), f"{block}: {line}"
        if word.startswith(("./", ".")) and not word.startswith(".."):
            path, _, extras = word.partition("[")
            if (REPO / path).exists():
                if extras:
                    declared = tomllib.loads((REPO / path / "pyproject.toml").read_text())["project"]
                    for extra in extras.rstrip("]").split(","):
                        assert extra in declared["optional-dependencies"], f"{block}: no extra {extra!r}"
            else:
                outside = path
    return outside


class Runner:
    """Runs the README's blocks in one folder with one environment, as a reader's terminal would."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.site = folder.parent / "site-packages"
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), str(REPO / "sdk"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        )
        self.server: subprocess.Popen | None = None
        self.written: dict[str, str] = {}  # the plugin example's files, by language

    def bash(self, block: Block) -> str:
        script = []
        for line in block.text.splitlines():
            if INSTALL.match(line):
                project = check_install_line(line, block)
                if project is not None:
                    self.install_example(project, block)
                continue
            script.append(line)
        if any(line.startswith("export ") for line in script):  # keep what the block exports for later blocks
            script.append(f"env -0 > {shlex.quote(str(self.folder / '.env'))}")
        return self.run(["bash", "-e", "-c", "\n".join(script)], block)

    def python(self, block: Block) -> str:
        path = self.folder.parent / f"readme_{block.line}.py"
        path.write_text(block.text)
        return self.run([sys.executable, str(path)], block)

    def run(self, command: list[str], block: Block) -> str:
        done = subprocess.run(
            command, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT
        )
        assert done.returncode == 0, f"{block} failed:\n{block.text}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        exported = self.folder / ".env"
        if exported.exists():
            for item in exported.read_text().split("\0"):
                name, _, value = item.partition("=")
                if name and self.env.get(name) != value and not name.startswith(("BASH", "SHLVL", "_")):
                    self.env[name] = value
            exported.unlink()
        return done.stdout

    def install_example(self, project: str, block: Block) -> None:
        """``pip install -e ./llava-next-assets``: the files the README showed, laid out as an install."""
        folder = self.folder / project
        assert {"toml", "python"} <= set(self.written), f"{block}: install before the plugin's files were shown"
        (folder / "llava_next_assets").mkdir(parents=True, exist_ok=True)
        (folder / "pyproject.toml").write_text(self.written["toml"])
        (folder / "llava_next_assets" / "__init__.py").write_text(self.written["python"])
        install_offline(folder, self.site)
        self.env["PYTHONPATH"] = os.pathsep.join([str(self.site), self.env["PYTHONPATH"]])

    def start_server(self, block: Block) -> None:
        assert block.text.strip().count("\n") == 0, f"{block}: the serve block is one command"
        self.server = subprocess.Popen(
            ["bash", "-c", "exec " + block.text.strip()],
            cwd=self.folder,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        url = f"http://127.0.0.1:{self.env['PORT']}/health"
        while True:
            assert self.server.poll() is None, f"{block}: the server exited:\n{self.server.stderr.read().decode()}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert json.loads(response.read())["status"] == "ok"
                    return
            except OSError:
                assert time.monotonic() < deadline, f"{block}: the server did not answer {url}"
                time.sleep(0.5)

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
        self.server = None


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Run every block once, in README order; the outputs by block, for the tests below to read."""
    assert shutil.which("llava-next"), "the llava-next command is not installed"
    folder = tmp_path_factory.mktemp("readme") / "newcomer"
    folder.mkdir()
    runner = Runner(folder, free_port())
    results: dict[int, str] = {}
    blocks = readme_blocks()
    try:
        for number, block in enumerate(blocks):
            if block.language == "bash" and block.text.startswith("llava-next serve"):
                runner.start_server(block)
                results[block.line] = ""
            elif block.language == "bash":
                results[block.line] = runner.bash(block)
            elif block.language == "python":
                if block.section == "Writing a plugin" and "python" not in runner.written:
                    runner.written["python"] = block.text  # the plugin's module: installed, not run
                    results[block.line] = ""
                else:
                    results[block.line] = runner.python(block)
            elif block.language == "toml":
                runner.written["toml"] = block.text
                results[block.line] = ""
            else:
                raise AssertionError(
                    f"{block}: no rule runs a {block.language or 'plain'!r} block; mark it bash, python or toml"
                )
            following = blocks[number + 1] if number + 1 < len(blocks) else None
            if runner.server is not None and (following is None or following.section != block.section):
                runner.stop_server()  # the server runs for the rest of its section
    finally:
        runner.stop_server()
    return {"blocks": blocks, "results": results, "folder": folder}


def blocks_of(outputs, section: str, language: str) -> list[tuple[Block, str]]:
    return [
        (b, outputs["results"][b.line]) for b in outputs["blocks"] if b.section == section and b.language == language
    ]


def test_every_block_of_the_readme_ran(outputs):
    assert set(outputs["results"]) == {b.line for b in outputs["blocks"]}
    sections = {b.section for b in outputs["blocks"]}
    assert {"Install", "The main job, offline", "From Python", "Serving", "Writing a plugin"} <= sections


def test_the_main_job_builds_a_checkpoint_and_answers(outputs):
    folder = outputs["folder"]
    assert (folder / "tiny" / "config.json").is_file() and (folder / "tiny" / "example.png").is_file()
    (main_job, answer), (more, _) = blocks_of(outputs, "The main job, offline", "bash")
    assert main_job.text.startswith("llava-next tiny-checkpoint ./tiny && llava-next ask ./tiny/example.png")
    assert "RANDOM weights" in answer and answer.strip().splitlines()[-1].strip()
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == ["example.png"]


def test_the_python_examples_print_answers(outputs):
    printed = [out for _, out in blocks_of(outputs, "From Python", "python")]
    assert len(printed) == 4 and all(out.strip() for out in printed)
    assert "<image> x" in printed[1]  # the visualizer's collapsed image block
    assert "Usage(" in printed[2]  # the async script printed result.usage


def test_the_server_examples_get_answers_over_http(outputs):
    ((curl, body),) = [(b, out) for b, out in blocks_of(outputs, "Serving", "bash") if "curl" in b.text]
    response = json.loads(body)
    assert response["object"] == "chat.completion" and response["choices"][0]["message"]["content"]
    assert response["usage"]["prompt_tokens"] > response["usage"]["completion_tokens"] > 0
    openai_out, sdk_out = [out for _, out in blocks_of(outputs, "Serving", "python")]
    assert openai_out.strip() and sdk_out.strip()


def test_the_plugin_example_loads_its_image_and_prompt(outputs):
    ((_, printed),) = [
        (b, out) for b, out in blocks_of(outputs, "Writing a plugin", "python") if "import load_image" in b.text
    ]
    example = outputs["folder"] / "tiny" / "example.png"
    from PIL import Image

    with Image.open(example) as picture:
        size = picture.size
    assert printed.strip() == f"RGB {size} '<image>\\nWhat is this?\\nAnswer:'"
