"""See which tokens a LLaVA-NeXT model lets each token attend to, with image tokens kept readable.

    >>> from llava_next_plugin import AttentionMaskVisualizer
    >>> viz = AttentionMaskVisualizer("llava-hf/llava-v1.6-mistral-7b-hf")   # or a loaded model
    >>> viz("<image> What is shown in this image?")                         # prints in a terminal
    >>> picture = viz("<image> Hi", images=photo, show=False)
    >>> picture.save("mask.png"); picture.to_html()

The mask drawn is the one the language model receives: the text backbone's own mask function
(``transformers.masking_utils``; a sliding window when the first layer has one) applied to the
processor's real ``input_ids`` and ``attention_mask``, so batches show their left padding, and the
``<image>`` positions are causal like every other token (LLaVA-NeXT does not let image tokens look
ahead). Loading from a path reads only the config and the processor, never the weights.

Each run of ``<image>`` tokens is drawn as one block labelled with its geometry (for a 1024x768
image on llava-v1.6-mistral: ``<image> x2340 = base 576 + tiles 1728 + newlines 36``); each cell
between two blocks is full (every query may attend every key), empty, or partial (the causal
triangle inside a block). Runs of padding collapse the same way.

Drawing goes through the ``llava_next_render_attention_mask`` hook: ``"ansi"`` (terminal text),
``"html"`` (Jupyter, via ``_repr_html_``) and ``"png"`` (bytes, needs pillow) are the built-in
renderers below, and a plugin may add formats or replace these.
"""

from __future__ import annotations

import copy
import html
import importlib
import io
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from llava_next_sdk.hookspecs import hookimpl

from .errors import InputError

__all__ = [
    "AttentionMaskVisualizer",
    "MaskPicture",
    "SequenceMask",
    "TokenBlock",
    "BUILTIN_RENDERERS",
    "DEFAULT_IMAGE_SIZE",
]

DEFAULT_IMAGE_SIZE = (1024, 768)
"""``(width, height)`` of the image generated when a prompt has ``<image>`` but none is given."""
MAX_BLOCKS = 160
"""Blocks per sequence at most: beyond, runs of text tokens are drawn a few tokens per block (a picture has
blocks x blocks cells: a 2000-token prompt drawn token by token was 400 MB of HTML)."""

FULL, PARTIAL, EMPTY = "full", "partial", "empty"


@dataclass(frozen=True)
class TokenBlock:
    """Positions ``[start, end)`` of one sequence shown as one row and one column.

    ``kind`` is ``"text"`` (one token), ``"image"`` (a run of ``<image>`` tokens) or ``"pad"``.
    """

    label: str
    start: int
    end: int
    kind: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class SequenceMask:
    """One sequence of a batch: its tokens, their collapsed blocks, and the real mask.

    ``mask``: bool ``[seq, seq]``, ``mask[q, k]`` is True when query position ``q`` may attend key
    position ``k``.
    """

    tokens: list[str]
    blocks: list[TokenBlock]
    mask: torch.Tensor
    _matrix: list | None = field(default=None, init=False, repr=False, compare=False)

    def cell(self, row: TokenBlock, col: TokenBlock) -> str:
        """``"full"``, ``"partial"`` or ``"empty"``: how much of block *row* may attend block *col*."""
        return self.block_matrix()[self.blocks.index(row)][self.blocks.index(col)]

    def block_matrix(self) -> list[list[str]]:
        """The cell state of every (row block, column block) pair, ``[blocks][blocks]``."""
        if self._matrix is None:
            # membership [seq, blocks] one-hot; allowed pairs per block pair = member^T @ mask @ member
            member = torch.zeros(self.mask.shape[0], len(self.blocks), dtype=torch.float64)  # exact counts
            for index, block in enumerate(self.blocks):
                member[block.start : block.end, index] = 1
            allowed = member.T @ self.mask.double() @ member
            sizes = torch.tensor([float(block.size) for block in self.blocks], dtype=torch.float64)
            pairs = sizes[:, None] * sizes[None, :]
            self._matrix = [
                [FULL if a == p else EMPTY if a == 0 else PARTIAL for a, p in zip(row_allowed, row_pairs, strict=True)]
                for row_allowed, row_pairs in zip(allowed.tolist(), pairs.tolist(), strict=True)
            ]
        return self._matrix


@dataclass
class MaskPicture:
    """What the renderers draw: a title, and one :class:`SequenceMask` per sequence of the batch.

    Shows itself as ANSI text with ``str()``, as HTML in Jupyter, and as PNG with :meth:`to_png`.
    """

    title: str
    sequences: list[SequenceMask]
    sliding_window: int | None = None
    #: The Jupyter cell (its execution count) that showed this picture last: not shown twice by one cell
    _shown_in: Any = field(default=None, init=False, repr=False, compare=False)

    def render(self, fmt: str) -> Any:
        """Draw with the first ``llava_next_render_attention_mask`` plugin that knows *fmt*."""
        from llava_next_sdk.errors import LlavaNextError

        from .hooks import first_answer, plugin_fault

        result = first_answer(
            _plugin_manager().hook.llava_next_render_attention_mask,
            {"mask": self, "fmt": fmt},
            plugin_fault("llava_next_render_attention_mask", f"format {fmt!r}", lambda m: InputError(m, param="fmt")),
            (LlavaNextError,),
        )
        if result is None:
            raise InputError(
                f"no renderer draws the format {fmt!r}: use 'ansi', 'html' or 'png', "
                "or register a plugin that implements llava_next_render_attention_mask"
            )
        wanted = {"ansi": str, "html": str, "png": bytes}.get(fmt)
        if wanted is not None and not isinstance(result, wanted):  # str() and to_png() would fail far from here
            raise InputError(
                f"the renderer of {fmt!r} returned {type(result).__name__}, not {wanted.__name__}: fix that "
                "llava_next_render_attention_mask plugin",
                param="fmt",
            )
        return result

    def to_ansi(self) -> str:
        return self.render("ansi")

    def to_html(self) -> str:
        return self.render("html")

    def to_png(self) -> bytes:
        return self.render("png")

    def save(self, path: str | os.PathLike) -> None:
        """Write the picture: ``.png``, ``.html``/``.htm``, or text (ANSI) for any other suffix."""
        suffix = os.fspath(path).lower().rsplit(".", 1)[-1]
        if suffix == "png":
            data: bytes = self.to_png()
        elif suffix in ("html", "htm"):
            data = self.to_html().encode()
        else:
            data = self.to_ansi().encode()
        with open(path, "wb") as handle:
            handle.write(data)

    def __str__(self) -> str:
        return self.to_ansi()

    def __repr__(self) -> str:
        lengths = ", ".join(str(len(s.tokens)) for s in self.sequences)
        return f"<MaskPicture {self.title!r}: {len(self.sequences)} sequence(s) of {lengths} tokens>"

    def _repr_html_(self) -> str:
        return self.to_html()

    def _repr_png_(self) -> bytes | None:
        return None  # HTML is the notebook picture; ask for PNG explicitly with to_png()

    def _ipython_display_(self) -> None:
        """Jupyter's display: as HTML, once per cell. ``viz(...)`` displays its picture wherever it is called (in
        a loop, before other lines); the same picture as the cell's value is then not shown a second time."""
        shell = sys.modules["IPython"].get_ipython()  # only Jupyter calls this: IPython is loaded
        cell = getattr(shell, "execution_count", None)
        if cell is not None and self._shown_in == cell:
            return
        self._shown_in = cell
        _ipython_display({"text/html": self.to_html(), "text/plain": repr(self)}, raw=True)


class AttentionMaskVisualizer:
    """Draw the attention mask a LLaVA-NeXT model applies to a prompt.

    :param model: a checkpoint folder or hub id (only its config and processor are read), or a loaded
        LLaVA-NeXT model (its processor is loaded from ``model.name_or_path`` unless given).
    :param processor: the processor to use instead of the checkpoint's.
    :param apply_chat_template: wrap each prompt in the checkpoint's chat template first.
    :raises InputError: not a LLaVA-NeXT model, or no processor to be found.
    """

    def __init__(self, model: Any, processor: Any = None, *, apply_chat_template: bool = False) -> None:
        from transformers import AutoConfig, AutoProcessor

        if isinstance(model, (str, os.PathLike)):
            self.name = os.fspath(model)
            from ._hub import not_a_local_checkpoint

            why = not_a_local_checkpoint(self.name)
            if why:
                raise InputError(f"model {self.name!r} {why}: give a checkpoint folder, a hub id or a loaded model")
            try:
                self.config = AutoConfig.from_pretrained(self.name)
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot load a model config from {self.name!r}: {exc}") from exc
        else:
            self.config = getattr(model, "config", None)
            if self.config is None:
                raise InputError(f"expected a model path or a loaded model, got {type(model).__name__}")
            self.name = getattr(model, "name_or_path", "") or getattr(self.config, "_name_or_path", "")
        if getattr(self.config, "model_type", None) != "llava_next":
            raise InputError(
                f"{self.name!r} is a {self.config.model_type!r} model: this visualizer draws "
                "LLaVA-NeXT (llava_next) checkpoints"
            )
        if processor is None:
            if not self.name:
                raise InputError("the model has no name_or_path to load its processor from: pass processor=")
            try:
                processor = AutoProcessor.from_pretrained(self.name)
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot load the processor of {self.name!r}: {exc}; pass processor=") from exc
        self.processor = processor
        self.apply_chat_template = apply_chat_template
        self.image_token_id = int(self.config.image_token_index)
        self.last_picture: MaskPicture | None = None

    # --- the public calls -------------------------------------------------------------------
    def __call__(
        self, text: str | Sequence[str], suffix: str = "", *, images: Any = None, show: bool = True
    ) -> MaskPicture:
        """Build the picture for *text* (a prompt or a batch of prompts) and show it.

        *suffix*: text appended to each prompt (transformers' visualizer takes it too, second).
        *images*: one image per ``<image>`` placeholder, in order over the whole batch (PIL, path,
        bytes, or URL); when omitted, a generated :data:`DEFAULT_IMAGE_SIZE` image fills each one.
        With *show*, the picture is printed as ANSI text in a terminal and displayed as HTML in Jupyter
        (wherever the call is, as transformers' visualizer prints; once per cell). Returns the
        :class:`MaskPicture` (``show=False`` to only get it).
        """
        picture = self.mask_picture(text, images, suffix=suffix)
        if show and _in_notebook():
            _ipython_display(picture)
        elif show:
            print(picture.to_ansi())
        return picture

    def visualize_attention_mask(
        self, input_sentence: str | Sequence[str], suffix: str = "", *, images: Any = None, show: bool = True
    ) -> MaskPicture:
        """transformers' name for calling the visualizer: the same as ``viz(input_sentence, suffix)``."""
        return self(input_sentence, suffix, images=images, show=show)

    def mask_picture(self, text: str | Sequence[str], images: Any = None, *, suffix: str = "") -> MaskPicture:
        """The :class:`MaskPicture` for *text* (each prompt followed by *suffix*), without showing it."""
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("text must be a prompt string or a non-empty list of prompt strings")
        if not isinstance(suffix, str):
            raise InputError(
                f"suffix must be a string appended to each prompt, got {type(suffix).__name__} (images go in images=)"
            )
        # transformers' visualizer takes "<img>" for the processor's image placeholder: so does ours
        placeholder = getattr(self.processor, "image_token", None) or "<image>"
        prompts = [(p + suffix).replace("<img>", placeholder) for p in prompts]
        if self.apply_chat_template:
            prompts = [self._templated(p) for p in prompts]
        placeholders = sum(p.count(placeholder) for p in prompts)
        pil_images = self._images(images, placeholders)

        tokenizer = self.processor.tokenizer
        inputs = self.processor(
            images=pil_images or None, text=prompts, padding=True, padding_side="left", return_tensors="pt"
        )
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if input_ids.shape[-1] == 0:
            raise InputError("the prompt is empty and its tokenizer adds no token: give some text to draw the mask of")
        allowed = self._model_mask(attention_mask)

        geometries = [self._geometry_config().image_geometry(im.height, im.width) for im in pil_images]
        sequences, next_image = [], 0
        for row in range(input_ids.shape[0]):
            tokens = tokenizer.convert_ids_to_tokens(input_ids[row].tolist())
            blocks, next_image = self._blocks(input_ids[row], attention_mask[row], tokens, geometries, next_image)
            sequences.append(SequenceMask(tokens, blocks, allowed[row]))
        window = (
            getattr(self.config.get_text_config(), "sliding_window", None) if self._first_layer_windowed() else None
        )
        title = f"Attention mask of {self.name or self.config.model_type} ({len(sequences)} sequence(s))"
        self.last_picture = MaskPicture(title, sequences, window)
        return self.last_picture

    def _repr_html_(self) -> str:
        if self.last_picture is None:
            return f"<p>AttentionMaskVisualizer for <code>{html.escape(self.name)}</code></p>"
        return self.last_picture.to_html()

    # --- pieces ---------------------------------------------------------------------------------
    def _templated(self, prompt: str) -> str:
        from .prompts import build_prompt

        return build_prompt(prompt, self.processor, self.config, num_images=prompt.count("<image>"))

    def _geometry_config(self):
        """Our config (it knows the anyres geometry), also when the model came with transformers'."""
        from .configuration import LlavaNextConfig

        if isinstance(self.config, LlavaNextConfig):
            return self.config
        return LlavaNextConfig.from_dict(self.config.to_dict())

    def _images(self, images: Any, placeholders: int) -> list:
        from .images import load_image

        if images is None:
            return [_generated_image() for _ in range(placeholders)]
        sources = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(sources) != placeholders:
            raise InputError(
                f"the prompt(s) have {placeholders} <image> placeholder(s) but {len(sources)} "
                "image(s) were given: give one image per placeholder"
            )
        return [load_image(source, index) for index, source in enumerate(sources)]

    def _model_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """bool ``[batch, seq, seq]``: the text backbone's own mask for this padding."""
        from transformers import masking_utils

        from ._compat import cache_kwarg

        text_config = copy.deepcopy(self.config.get_text_config())
        text_config._attn_implementation = "eager"  # the materialized mask, whatever the model runs
        batch, seq = attention_mask.shape
        windowed = self._first_layer_windowed()
        make_mask = masking_utils.create_sliding_window_causal_mask if windowed else masking_utils.create_causal_mask
        mask = make_mask(
            config=text_config,
            inputs_embeds=torch.zeros(batch, seq, 1),
            attention_mask=attention_mask.bool(),
            allow_is_causal_skip=False,
            **{cache_kwarg(make_mask): None},  # no cache: "cache" or "past_key_values" by version
        )
        mask = mask[:, 0]
        return mask if mask.dtype == torch.bool else mask == 0

    def _first_layer_windowed(self) -> bool:
        """Whether the text backbone's first layer uses a sliding window (the mask drawn is that layer's)."""
        text_config = self.config.get_text_config()
        layer_types = getattr(text_config, "layer_types", None)
        if layer_types:
            return layer_types[0] == "sliding_attention" and getattr(text_config, "sliding_window", None) is not None
        return getattr(text_config, "sliding_window", None) is not None

    def _blocks(
        self, ids: torch.Tensor, attention: torch.Tensor, tokens: list[str], geometries: list, next_image: int
    ) -> tuple[list[TokenBlock], int]:
        """Collapse padding, and each image's ``<image>`` tokens (a run of touching images split by their token
        counts); every other token is its own block, unless that makes more than :data:`MAX_BLOCKS`
        (:func:`_group_text`)."""
        blocks, position, length = [], 0, len(tokens)
        while position < length:
            if not attention[position]:
                end = position
                while end < length and not attention[end]:
                    end += 1
                blocks.append(TokenBlock(f"<pad> x{end - position}", position, end, "pad"))
            elif int(ids[position]) == self.image_token_id:
                run_end = position
                while run_end < length and int(ids[run_end]) == self.image_token_id and attention[run_end]:
                    run_end += 1
                while position < run_end:  # one block per image, by its token count
                    geometry = geometries[next_image] if next_image < len(geometries) else None
                    if geometry is not None and geometry.num_tokens <= run_end - position:
                        end, label = position + geometry.num_tokens, geometry.describe()
                    else:  # counts that do not fit: the rest of the run, as it is
                        end, label = run_end, f"<image> x{run_end - position}"
                    next_image += 1
                    blocks.append(TokenBlock(label, position, end, "image"))
                    position = end
                continue
            else:
                end = position + 1
                blocks.append(TokenBlock(tokens[position], position, end, "text"))
            position = end
        return _group_text(blocks, tokens), next_image


def _group_text(blocks: list[TokenBlock], tokens: list[str]) -> list[TokenBlock]:
    """*blocks* with runs of one-token text blocks merged a few tokens per block, as few per block as keeps the
    count within :data:`MAX_BLOCKS` (unchanged when it is within already)."""
    texts = sum(block.kind == "text" for block in blocks)
    if len(blocks) <= MAX_BLOCKS or texts == 0:
        return blocks
    room = max(MAX_BLOCKS - (len(blocks) - texts), 1)
    per_block = -(-texts // room)
    grouped: list[TokenBlock] = []
    for block in blocks:
        last = grouped[-1] if grouped else None
        if block.kind == "text" and last is not None and last.kind == "text" and last.size < per_block:
            start = last.start
            label = f"{tokens[start]}…{tokens[block.end - 1]} x{block.end - start}"
            grouped[-1] = TokenBlock(label, start, block.end, "text")
        else:
            grouped.append(block)
    return grouped


def _generated_image():
    """An offline stand-in picture: a colour gradient with a few shapes, :data:`DEFAULT_IMAGE_SIZE`."""
    from PIL import Image, ImageDraw

    width, height = DEFAULT_IMAGE_SIZE
    ramp_x = torch.linspace(0, 255, width).to(torch.uint8)
    ramp_y = torch.linspace(0, 255, height).to(torch.uint8)
    pixels = torch.stack(
        [
            ramp_x.expand(height, width),
            ramp_y[:, None].expand(height, width),
            torch.full((height, width), 128, dtype=torch.uint8),
        ],
        dim=-1,
    )
    image = Image.fromarray(pixels.numpy(), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 8, height // 6, width // 2, height * 2 // 3), fill=(240, 200, 40))
    draw.rectangle((width * 5 // 8, height // 2, width * 7 // 8, height * 5 // 6), fill=(30, 60, 160))
    return image


def _ipython_display(*objects: Any, **kwargs: Any) -> None:
    """IPython's ``display`` (in a notebook, where IPython is loaded: this package does not depend on it)."""
    importlib.import_module("IPython.display").display(*objects, **kwargs)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ipython = shell.get_ipython()
    except Exception:
        return False
    return ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})


# --- the built-in renderers: plugins of llava_next_render_attention_mask ---------------------------
_SYMBOLS = {FULL: "■", PARTIAL: "◣", EMPTY: "⬚"}
_ANSI = {"image": "\033[93m", "pad": "\033[90m", "diag": "\033[92m", "bold": "\033[1m", "reset": "\033[0m"}
_LABEL_WIDTH = 60


def _short(label: str, width: int = _LABEL_WIDTH) -> str:
    label = label.replace("\n", "\\n")
    return label if len(label) <= width else label[: width - 1] + "…"


def _png_label(label: str) -> str:
    return _short(label).replace("\u2581", " ")  # pillow's default font lacks sentencepiece's space mark


def render_ansi(mask: MaskPicture) -> str:
    """Terminal text: one row per block, ``■`` full, ``◣`` partial (causal), ``⬚`` masked."""
    c = _ANSI
    lines = [
        f"{c['bold']}{mask.title}{c['reset']}",
        f"{_SYMBOLS[FULL]} attends   {_SYMBOLS[PARTIAL]} causal within the block   "
        f"{_SYMBOLS[EMPTY]} masked   {c['image']}yellow{c['reset']}: image tokens",
    ]
    if mask.sliding_window:
        lines.append(f"sliding window: {mask.sliding_window} tokens")
    for number, sequence in enumerate(mask.sequences):
        blocks = sequence.blocks
        width = min(_LABEL_WIDTH, max(len(_short(b.label)) for b in blocks))
        digits = len(str(len(blocks) - 1))
        lines.append("")
        lines.append(f"sequence {number}: {len(sequence.tokens)} tokens in {len(blocks)} blocks")
        for d in range(digits):  # column numbers, written vertically
            header = " ".join(str(j).rjust(digits)[d] for j in range(len(blocks)))
            lines.append(" " * (width + digits + 3) + header)
        matrix = sequence.block_matrix()
        for i, block in enumerate(blocks):
            color = c.get(block.kind, "")
            label = _short(block.label).ljust(width)
            cells = []
            for j, state in enumerate(matrix[i]):
                symbol = _SYMBOLS[state]
                if i == j and state != EMPTY:
                    symbol = f"{c['diag']}{symbol}{c['reset']}"
                elif blocks[j].kind == "image" and state != EMPTY:
                    symbol = f"{c['image']}{symbol}{c['reset']}"
                cells.append(symbol)
            label_text = f"{color}{label}{c['reset']}" if color else label
            lines.append(f"{label_text} {str(i).rjust(digits)}: {' '.join(cells)}")
    return "\n".join(lines)


_HTML_COLORS = {FULL: "#3b6fb6", PARTIAL: "linear-gradient(to top right, #3b6fb6 50%, #eef1f5 50%)", EMPTY: "#eef1f5"}


def render_html(mask: MaskPicture) -> str:
    """An HTML table for Jupyter: blocks as rows and columns, image blocks highlighted."""
    out = [
        '<div class="llava-next-mask" style="font-family: monospace; font-size: 12px">',
        f"<p><b>{html.escape(mask.title)}</b><br>"
        "■ attends &nbsp; ◣ causal within the block &nbsp; ⬚ masked &nbsp; "
        '<span style="background:#fff3b0">image tokens</span></p>',
    ]
    for number, sequence in enumerate(mask.sequences):
        out.append(f"<p>sequence {number}: {len(sequence.tokens)} tokens in {len(sequence.blocks)} blocks</p>")
        out.append('<table style="border-collapse: collapse">')
        out.append(
            "<tr><th></th>"
            + "".join(f'<th style="font-weight: normal; padding: 0 2px">{j}</th>' for j in range(len(sequence.blocks)))
            + "</tr>"
        )
        for i, (block, states) in enumerate(zip(sequence.blocks, sequence.block_matrix(), strict=True)):
            shade = {"image": "#fff3b0", "pad": "#dddddd"}.get(block.kind, "transparent")
            row = [
                f'<td style="text-align: right; padding-right: 6px; background: {shade}" '
                f'title="positions {block.start}-{block.end - 1}">{html.escape(_short(block.label))} {i}</td>'
            ]
            for state in states:
                row.append(
                    f'<td title="{state}" style="width: 12px; height: 12px; border: 1px solid white; '
                    f'background: {_HTML_COLORS[state]}"></td>'
                )
            out.append("<tr>" + "".join(row) + "</tr>")
        out.append("</table>")
    out.append("</div>")
    return "\n".join(out)


_PNG_CELL = 14


def render_png(mask: MaskPicture) -> bytes:
    """A PNG picture (pillow): labelled rows, one square per block pair."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cell, margin, line = _PNG_CELL, 8, 16
    labels = [_png_label(b.label) for s in mask.sequences for b in s.blocks]
    index_width = int(font.getlength(str(max(len(s.blocks) for s in mask.sequences) - 1))) + 6
    label_width = max(int(font.getlength(label)) for label in labels) + 12 + index_width
    most_blocks = max(len(s.blocks) for s in mask.sequences)
    width = margin * 2 + label_width + most_blocks * cell
    height = margin + line * 2 + sum(line + len(s.blocks) * cell + margin for s in mask.sequences)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, margin), mask.title, fill="black", font=font)
    draw.text(
        (margin, margin + line), "dark: attends   half: causal within the block   light: masked", fill="gray", font=font
    )
    top = margin + line * 2
    full, empty, image_shade, pad_shade = (59, 111, 182), (238, 241, 245), (255, 243, 176), (221, 221, 221)
    for number, sequence in enumerate(mask.sequences):
        draw.text((margin, top), f"sequence {number}: {len(sequence.tokens)} tokens", fill="black", font=font)
        top += line
        for i, (block, states) in enumerate(zip(sequence.blocks, sequence.block_matrix(), strict=True)):
            y = top + i * cell
            shade = {"image": image_shade, "pad": pad_shade}.get(block.kind)
            if shade:
                draw.rectangle((margin, y, margin + label_width - 4, y + cell - 2), fill=shade)
            draw.text((margin + 2, y + 1), _png_label(block.label), fill="black", font=font)
            index = str(i)  # the block's number, in a column of its own so it never runs into the label
            draw.text((margin + label_width - 6 - font.getlength(index), y + 1), index, fill="gray", font=font)
            for j, state in enumerate(states):
                x = margin + label_width + j * cell
                box = (x, y, x + cell - 2, y + cell - 2)
                draw.rectangle(box, fill=full if state == FULL else empty)
                if state == PARTIAL:
                    draw.polygon([(x, y), (x, y + cell - 2), (x + cell - 2, y + cell - 2)], fill=full)
        top += len(sequence.blocks) * cell + margin
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BUILTIN_RENDERERS: dict[str, Callable[[MaskPicture], str | bytes]] = {
    "ansi": render_ansi,
    "html": render_html,
    "png": render_png,
}
"""The formats this module draws; a plugin may add formats or replace these."""


@hookimpl(trylast=True)  # a built-in: a third-party renderer of the same format is asked first (unless trylast too)
def llava_next_render_attention_mask(mask: MaskPicture, fmt: str) -> str | bytes | None:
    """This module as a plugin: draws ``"ansi"``, ``"html"`` and ``"png"``, passes on other formats."""
    renderer = BUILTIN_RENDERERS.get(fmt)
    return None if renderer is None else renderer(mask)


def _plugin_manager():
    from .hooks import get_plugin_manager

    return get_plugin_manager()
