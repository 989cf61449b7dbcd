"""The notebooks in notebooks/ run top to bottom offline, and show what they promise."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, tmp_path: Path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return notebook


def outputs(cell) -> tuple[str, dict]:
    """(the cell's stream text, its last rich result's data)."""
    streams = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    results = [o["data"] for o in cell.outputs if o.output_type in ("execute_result", "display_data")]
    return streams, results[-1] if results else {}


def test_every_notebook_is_covered():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ["quickstart.ipynb"]


def test_quickstart(tmp_path):
    notebook = execute("quickstart.ipynb", tmp_path)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(o.output_type != "error" for cell in code for o in cell.outputs)

    _, files = outputs(code[0])
    assert "model.safetensors" in files["text/plain"] and "chat_template.jinja" in files["text/plain"]
    _, answer = outputs(code[1])
    assert answer["text/plain"].startswith("[{'generated_text': ")
    _, batch = outputs(code[2])
    assert batch["text/plain"].startswith("[[{'generated_text': ")

    streams, picture = outputs(code[3])
    assert "\033[" not in streams  # in Jupyter the picture is not printed as terminal text...
    page = picture["text/html"]    # ...it displays as HTML
    assert "<table" in page and "&lt;image&gt; x" in page and "&lt;pad&gt;" in page
    _, png = outputs(code[4])
    assert png["text/plain"] == "True"


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebooks_are_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
