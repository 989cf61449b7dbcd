"""The README's Python examples run as written, against the checkpoint its main job builds."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [chunk.partition("\n")[2] for chunk in text.split("```")[1::2] if chunk.startswith("python")]


@pytest.fixture(scope="module")
def tiny_dir(demo_checkpoint):
    """A folder holding the main job's ``./tiny``, to run the examples from."""
    return demo_checkpoint.parent


def test_the_python_examples_run_as_written(tiny_dir, monkeypatch, capsys):
    monkeypatch.chdir(tiny_dir)
    transformers_block, visualizer_block, sdk_block = python_blocks("From Python")
    namespace: dict = {}
    exec(compile(transformers_block, "README:transformers", "exec"), namespace)
    answer = namespace["pipe"]("./tiny/example.png", prompt="What does this picture show?", max_new_tokens=4)
    assert isinstance(answer[0]["generated_text"], str)
    assert capsys.readouterr().out.strip()  # the decoded generation was printed

    exec(compile(visualizer_block, "README:visualizer", "exec"), namespace)
    assert "<image> x" in str(namespace["viz"]("<image> What is shown in this image?"))

    # The SDK block uses `async with` at top level, as in a notebook: run it inside a coroutine.
    import anyio

    body = "async def main():\n" + textwrap.indent(sdk_block, "    ") + "    await remote.aclose()\n"
    exec(compile(body, "README:sdk", "exec"), namespace)
    anyio.run(namespace["main"])
    assert capsys.readouterr().out.strip()
