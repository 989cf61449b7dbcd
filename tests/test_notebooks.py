"""The notebooks in notebooks/ run top to bottom offline, clean, and show what they promise.

Each notebook runs in a fresh kernel whose working folder and ``TMPDIR`` are the test's own temporary
folder (so runs in parallel do not meet), with a time limit per cell. A run fails on an error, on any
stderr or warning text in an output, and on a figure cell (tagged ``figure``, or drawing with
``plt.subplots``/``plt.figure``) that shows no ``image/png``.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["anyres.ipynb", "attention.ipynb", "quickstart.ipynb", "sdk.ipynb", "serving.ipynb"]
CELL_TIMEOUT = 180  # seconds for one cell; the whole set runs in about a minute
WARNING_TEXT = re.compile(r"warning|traceback", re.IGNORECASE)


def execute(name: str, tmp_path: Path, monkeypatch, notebook=None) -> nbformat.NotebookNode:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the kernel inherits it: checkpoints land here
    notebook = notebook or nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    left = sorted(p.name for p in scratch.glob("llava-next-*"))  # (libraries may keep caches of their own here)
    assert not left, f"{name} left its working folder behind: {left}"
    return notebook


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def cell_with(notebook, snippet: str):
    """The one code cell whose source contains *snippet*."""
    found = [cell for cell in code_cells(notebook) if snippet in cell.source]
    assert len(found) == 1, f"{len(found)} cells contain {snippet!r}"
    return found[0]


def stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def rich(cell, mime: str) -> list[str]:
    return [
        o.data[mime] for o in cell.outputs if o.output_type in ("execute_result", "display_data") and mime in o.data
    ]


def is_figure_cell(cell) -> bool:
    return "figure" in cell.metadata.get("tags", []) or any(
        call in cell.source for call in ("plt.subplots(", "plt.figure(")
    )


def assert_clean(notebook) -> None:
    """No errors, no stderr, no warnings; every figure cell shows a PNG."""
    for number, cell in enumerate(code_cells(notebook)):
        where = f"code cell {number} ({cell.source.splitlines()[0]!r})"
        for output in cell.outputs:
            assert output.output_type != "error", f"{where} raised {output.ename}: {output.evalue}"
            if output.output_type == "stream":
                assert output.name == "stdout", f"{where} wrote to {output.name}: {output.text[:500]}"
                assert not WARNING_TEXT.search(output.text), f"{where} printed a warning: {output.text[:500]}"
            else:
                for mime in ("text/plain", "text/html", "text/markdown"):
                    text = output.get("data", {}).get(mime, "")
                    assert not WARNING_TEXT.search(text), f"{where} shows a warning ({mime}): {text[:500]}"
        if is_figure_cell(cell):
            assert rich(cell, "image/png"), f"{where} is a figure cell but shows no image/png"


def test_every_notebook_is_covered():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebooks_are_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in code_cells(notebook):
        assert not cell.get("outputs") and cell.get("execution_count") is None, "strip the outputs before committing"


@pytest.mark.parametrize("name", EXPECTED)
def test_each_notebook_builds_its_checkpoint_first_and_removes_it_last(name):
    cells = code_cells(nbformat.read(NOTEBOOKS / name, as_version=4))
    assert "build_tiny_checkpoint(" in cells[0].source
    assert "shutil.rmtree(workdir)" in cells[-1].source


def test_quickstart(tmp_path, monkeypatch):
    notebook = execute("quickstart.ipynb", tmp_path, monkeypatch)
    assert_clean(notebook)
    files = rich(code_cells(notebook)[0], "text/plain")[-1]
    assert "model.safetensors" in files and "chat_template.jinja" in files
    assert rich(cell_with(notebook, "pipe(image, prompt="), "text/plain")[-1].startswith("[{'generated_text': ")
    assert rich(cell_with(notebook, "pipe([image"), "text/plain")[-1].startswith("[[{'generated_text': ")
    auto = cell_with(notebook, "AutoModelForImageTextToText.from_pretrained(checkpoint)\n")
    assert stdout(auto).startswith("llava_next_plugin.modeling LlavaNextForConditionalGeneration")
    streamed = cell_with(notebook, "TextIteratorStreamer(")
    pieces = [o for o in streamed.outputs if o.output_type == "stream"]
    assert len(pieces) > 3 and stdout(streamed).strip()  # the answer arrived in pieces, as it was generated
    assert re.search(r"^\d+ linear layers in 4 bits", stdout(cell_with(notebook, "load_in_4bit=True")), re.M)
    mask = cell_with(notebook, "viz([")
    assert "\033[" not in stdout(mask)  # in Jupyter the picture is not printed as terminal text...
    page = rich(mask, "text/html")[-1]  # ...it displays as HTML
    assert "<table" in page and "&lt;image&gt; x" in page and "&lt;pad&gt;" in page
    assert rich(code_cells(notebook)[-1], "text/plain") == ["False"]  # the checkpoint folder is gone


def test_anyres(tmp_path, monkeypatch):
    from llava_next_plugin import LlavaNextConfig

    notebook = execute("anyres.ipynb", tmp_path, monkeypatch)
    assert_clean(notebook)
    figures = [cell for cell in code_cells(notebook) if is_figure_cell(cell)]
    assert len(figures) == 4
    expected = LlavaNextConfig().image_geometry(480, 640)  # the generated example picture
    assert expected.describe() in stdout(cell_with(notebook, "print(geom.describe())"))
    tokens = stdout(cell_with(notebook, "total <image> tokens"))
    assert f"total <image> tokens: {expected.num_tokens:5d}" in tokens
    written, computed = re.search(r"processor wrote (\d+) <image> tokens; geometry says (\d+)", tokens).groups()
    assert written == computed
    budgets = stdout(cell_with(notebook, "image_detail=detail"))
    found = re.findall(r'detail="(\w+)": processor wrote +(\d+) <image> tokens; geometry says +(\d+)', budgets)
    assert [detail for detail, _, _ in found] == ["low", "high"]
    assert all(written == computed for _, written, computed in found)
    assert int(found[0][1]) < int(found[1][1])  # the base view alone costs less than the whole layout


def test_attention(tmp_path, monkeypatch):
    notebook = execute("attention.ipynb", tmp_path, monkeypatch)
    assert_clean(notebook)
    assert sum(bool(rich(cell, "image/png")) for cell in code_cells(notebook)) == 4
    assert "&lt;image&gt; x" in rich(cell_with(notebook, 'viz("<image> What is shown'), "text/html")[-1]
    assert rich(cell_with(notebook, "display(HTML(two.to_html()))"), "text/html")[-1].count("&lt;image&gt; x") == 2
    batch = cell_with(notebook, "of them padding")
    padding = stdout(batch)
    assert re.search(r"sequence \d: \d+ positions, 0 of them padding", padding)
    assert re.search(r"sequence \d: \d+ positions, [1-9]\d* of them padding", padding)
    page = rich(batch, "text/html")[-1]  # the padded batch as HTML too, one table per sequence
    assert page.count("<table") == 3 and "&lt;pad&gt;" in page and page.count("&lt;image&gt; x") == 3


def test_sdk(tmp_path, monkeypatch):
    notebook = execute("sdk.ipynb", tmp_path, monkeypatch)
    assert_clean(notebook)
    started = stdout(cell_with(notebook, "serve is up at"))
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", started).group(1))
    with pytest.raises(OSError):  # the notebook stopped its server
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    errors = stdout(cell_with(notebook, "UnsupportedParameterError"))
    for name in ("UnsupportedParameterError", "InvalidImageError", "APIConnectionError"):
        assert name + ":" in errors
    bar = cell_with(notebook, "tqdm(")
    assert rich(bar, "application/vnd.jupyter.widget-view+json")  # a widget progress bar, not IProgress text


def test_sdk_stops_its_server_when_a_cell_fails(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOKS / "sdk.ipynb", as_version=4)
    setup, start = [
        cell for cell in code_cells(notebook) if "build_tiny_checkpoint(" in cell.source or "Popen(" in cell.source
    ]
    notebook.cells = [
        setup,
        start,
        nbformat.v4.new_code_cell("print(server.pid)"),
        nbformat.v4.new_code_cell("raise RuntimeError('a cell fails before the clean-up cells')"),
    ]
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the checkpoint it leaves goes with the test's folder
    with pytest.raises(CellExecutionError, match="a cell fails"):
        NotebookClient(
            notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    server = int(stdout(notebook.cells[2]))
    try:  # the kernel has stopped, and its atexit handler stops the server
        psutil.Process(server).wait(timeout=30)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        psutil.Process(server).kill()
        pytest.fail("the notebook's llava-next serve outlived its kernel")


def test_serving(tmp_path, monkeypatch):
    notebook = execute("serving.ipynb", tmp_path, monkeypatch)
    assert_clean(notebook)
    assert sum(bool(rich(cell, "image/png")) for cell in code_cells(notebook)) == 3
    table = stdout(cell_with(notebook, "tokens/s"))
    rates = [float(x) for x in re.findall(r"([\d.]+) tokens/s", table)]
    assert len(rates) >= 3 and all(rate > 0 for rate in rates)
    reused = stdout(cell_with(notebook, "prefix store"))
    # each of the three "long text, again" requests finds the same text's prefix: all but its last token
    assert int(re.search(r"instead of prefilled: (\d+)", reused).group(1)) > 3 * 1000


def test_the_visualizer_displays_its_picture_once_wherever_it_is_called_in_a_cell(
    demo_checkpoint, tmp_path, monkeypatch
):
    """As transformers' visualizer prints wherever it is called: in a loop, before other lines, and the cell's
    last value is not shown a second time; ``show=False`` shows nothing until the picture is the cell's value."""
    setup = (
        "import llava_next_plugin\n"
        "from llava_next_plugin import AttentionMaskVisualizer\n"
        f"viz = AttentionMaskVisualizer({str(demo_checkpoint)!r})"
    )
    cells = [
        setup,
        'for q in ["<image> one", "<image> two"]:\n    viz(q)',
        'viz("<image> three")\nx = 1',
        'viz("<image> four")',
        'kept = viz("<image> five", show=False)',
        "kept",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    executed = execute("inline", tmp_path, monkeypatch, notebook=notebook)
    assert_clean(executed)
    shown = [len(rich(cell, "text/html")) for cell in code_cells(executed)]
    assert shown == [0, 2, 1, 1, 0, 1], shown
    assert "\033[" not in "".join(stdout(cell) for cell in code_cells(executed))
