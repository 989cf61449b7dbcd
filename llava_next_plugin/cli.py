"""The ``llava-next`` command: ask about images, caption a folder, build a demo checkpoint, serve.

    llava-next tiny-checkpoint ./tiny                       # random weights, offline, ~20 MB
    llava-next ask photo.jpg --model ./tiny --prompt "What is in this picture?"
    llava-next caption ./photos --prompt "Describe the photo." --out results.jsonl
    llava-next serve --model ./tiny                         # when the serve extra is installed

Without ``--model`` (``ask``, ``caption`` and ``serve`` alike) the model is ``$LLAVA_NEXT_MODEL`` if set,
else :data:`DEFAULT_MODEL` (a 7B hub checkpoint: it needs the network once, ~15 GB, and a GPU to be
quick). Bad input (a missing file, an unreadable image, more ``<image>`` placeholders than images, an
unknown model) ends with one line on stderr and exit status 1; wrong arguments end with argparse's usage
line and status 2. ``caption`` has its own rule (:data:`CAPTION_EXIT_RULE`). Set ``LLAVA_NEXT_DEBUG=1`` to
see tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import first_line

__all__ = [
    "main",
    "build_parser",
    "resolve_model",
    "read_done",
    "result_line",
    "DEFAULT_MODEL",
    "IMAGE_SUFFIXES",
    "CAPTION_EXIT_RULE",
]

DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"
MODEL_ENV = "LLAVA_NEXT_MODEL"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_NEW_TOKENS = 256
CAPTION_EXIT_RULE = (
    "0 when every readable image of DIR is in --out (unreadable images are skipped, counted in "
    "the summary, and tried again by the next run); with --strict, 1 while any image is "
    "unreadable; 1 when DIR, --out or the model cannot be used; 2 for wrong arguments"
)
"""``llava-next caption``'s exit status, the same for a first run and a rerun."""


class CommandError(Exception):
    """A problem the user can fix; its message is printed as the command's one error line."""


# --- argument parsing -------------------------------------------------------------------------------
def _default_model() -> str:
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (or "required"), unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or "default" in text:
            return text
        if action.required:
            return f"{text} (required)".lstrip()
        if action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    """A parser whose help shows defaults (:class:`_HelpFormatter`); its sub-command parsers are of this class
    too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_ID",
        help=f"checkpoint folder or hub id (default: ${MODEL_ENV}, else {DEFAULT_MODEL}, "
        "which needs the network once; offline, build one with `llava-next tiny-checkpoint`)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights' dtype (default: the checkpoint's)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"longest answer in tokens (default: {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--prompt-format",
        default=None,
        metavar="FAMILY",
        help="wrap prompts in this family's format (mistral, vicuna, chatml, llama3) instead of "
        "the checkpoint's chat template (default: the template, else the detected family)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULT_PROMPT

    parser = _Parser(
        prog="llava-next",
        description="LLaVA-NeXT (llava v1.6) from the command line: ask about images, caption folders, "
        "build a tiny offline demo checkpoint, serve an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")  # sub-parsers: _Parser, as parser
    commands.required = True

    ask = commands.add_parser(
        "ask",
        help="ask a question about one or more images; the answer streams",
        description="Ask one question about the given images (all in one prompt) and stream the answer to stdout.",
    )
    ask.add_argument("images", nargs="+", metavar="IMAGE", help="image file, http(s) URL or data: URL")
    ask.add_argument(
        "--url-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds an image URL may take to answer each read (default: 10)",
    )
    ask.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help=f"the question; <image> placeholders are added when missing (default: {DEFAULT_PROMPT!r})",
    )
    _add_model_options(ask)

    caption = commands.add_parser(
        "caption",
        help="caption every image of a folder into a JSON-lines file",
        description="Caption the images of DIR in batches. Each result is one JSON "
        "line {image, prompt, generated_text} appended to --out; a rerun "
        "skips the images already there. Files that are not images (by "
        "suffix) are left alone and counted in the summary.",
        epilog=f"Exit status: {CAPTION_EXIT_RULE}.",
    )
    caption.add_argument("folder", metavar="DIR", help=f"folder of images ({', '.join(IMAGE_SUFFIXES)})")
    caption.add_argument("--out", required=True, metavar="FILE.jsonl", help="results file (appended to, resumable)")
    caption.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"instruction (default: {DEFAULT_PROMPT!r})")
    caption.add_argument("--batch-size", type=int, default=4, metavar="B", help="images per forward pass (default: 4)")
    caption.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 while any image of DIR is unreadable (default: 0, with a count)",
    )
    _add_model_options(caption)
    from .distributed import add_caption_options  # parsing the Ray options needs no Ray

    add_caption_options(caption)

    tiny = commands.add_parser(
        "tiny-checkpoint",
        help="write a small RANDOM-weight checkpoint for offline demos",
        description="Write a small checkpoint with random weights in llava-hf layout (real "
        "Mistral tokenizer, chat template, 64+-wide layers so 4-bit loading "
        "works on CPU). Its answers are gibberish: it is for demos and smoke "
        "tests. Needs the demo extra: pip install 'llava-next-plugin[demo]'.",
    )
    tiny.add_argument("out", metavar="OUT", help="folder to create (must be new or empty)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")

    try:
        from .serve_cli import add_serve_parser
    except ImportError as exc:
        serve = commands.add_parser("serve", help="serve an OpenAI-compatible API (not available in this install)")
        serve.set_defaults(unavailable=str(exc))
        serve.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    else:
        add_serve_parser(commands)
    return parser


# --- the commands -------------------------------------------------------------------------------------
def resolve_model(model: str | None) -> str:
    """The model a command runs: *model* (``--model``), else ``$LLAVA_NEXT_MODEL``, else :data:`DEFAULT_MODEL`;
    checked to be a LLaVA-NeXT checkpoint folder or hub id (:class:`CommandError` saying what is wrong)."""
    if model is not None and not model.strip():  # --model "$MODEL" with the variable unset: not the default model
        raise CommandError("--model is empty: give a checkpoint folder or a hub id")
    model = model or _default_model()
    _check_model(model)
    return model


def _check_model(model: str) -> None:
    """Fail with one clear line when *model* is neither a checkpoint folder nor a reachable hub id."""
    from transformers import AutoConfig

    from ._hub import not_a_local_checkpoint

    why = not_a_local_checkpoint(model)
    if why:
        raise CommandError(
            f"model {model!r} {why}: give a checkpoint folder or a hub id like {DEFAULT_MODEL} "
            "(offline, build one with `llava-next tiny-checkpoint ./tiny`)"
        )
    path = Path(model).expanduser()
    try:
        config = AutoConfig.from_pretrained(os.fspath(path) if path.is_dir() else model)
    except Exception as exc:
        raise CommandError(
            f"cannot load model {model!r}: {first_line(exc)} (check the name, or that the "
            "hub is reachable; offline, use a local folder)"
        ) from exc
    if getattr(config, "model_type", None) != "llava_next":
        raise CommandError(
            f"model {model!r} is a {config.model_type!r} checkpoint: llava-next needs a "
            "LLaVA-NeXT (llava_next) checkpoint"
        )


def _check_prompt_format(family: str | None) -> None:
    """Fail before loading a model when ``--prompt-format`` names no known family."""
    if family is None:
        return
    from .errors import InputError
    from .prompts import build_prompt

    try:
        build_prompt("check", None, None, family=family, num_images=0)
    except InputError as exc:
        raise CommandError(f"--prompt-format: {exc.message}") from exc


def _load_pipeline(args: argparse.Namespace, model: str):
    """The pipeline for *model*, already checked by :func:`resolve_model`."""
    import torch
    from transformers import pipeline

    from .pipeline import LlavaNextImageToTextPipeline
    from .tiny import is_random_checkpoint

    if is_random_checkpoint(model):
        print(
            f"note: {model} holds RANDOM weights (a tiny demo checkpoint): the answers are gibberish.",
            file=sys.stderr,
            flush=True,
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    return pipeline(
        "image-text-to-text",
        model=model,
        device=device,
        dtype=dtype,
        pipeline_class=LlavaNextImageToTextPipeline,
        prompt_family=args.prompt_format,
    )


def _load_images(sources: Sequence[Any], timeout: float | None = None) -> list:
    """Read every image up front, so bad input fails before a model is loaded."""
    from .errors import ImageError
    from .images import DEFAULT_TIMEOUT, LoadedImage, load_image

    images = []
    for index, source in enumerate(sources):
        if "://" not in source and not source.startswith("data:") and not _is_file(source):
            what = "is a folder, not an image file" if _is_file(source, folder=True) else "does not exist"
            raise CommandError(f"image {index}: {_shorten(source)!r} {what}")
        try:
            # the pipeline takes it without a second read
            images.append(
                LoadedImage(load_image(source, index, timeout=DEFAULT_TIMEOUT if timeout is None else timeout))
            )
        except ImageError as exc:
            raise CommandError(exc.message) from exc
    return images


def _is_file(path: str, folder: bool = False) -> bool:
    """Whether *path* names a file (a folder, with *folder*); ``False`` for a name the system refuses (too long)."""
    try:
        return Path(path).is_dir() if folder else Path(path).is_file()
    except OSError:
        return False


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class _Stopped:
    """A generate stopping criterion: every row is done once *event* is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _check_device(device: str | None) -> None:
    """``--device``, checked before a model is read (a bad one was said by torch after the weights loaded)."""
    from .engine.scheduler import device_problem

    problem = None if device is None else device_problem(device)
    if problem:
        raise CommandError(f"--device {device!r} {problem}")


def _check_placeholders(prompt: str, num_images: int) -> None:
    """Placeholders, when the prompt has any, must be one per image (none: they are added), checked before a
    model loads."""
    count = prompt.count("<image>")
    if count and count != num_images:
        raise CommandError(
            f"the prompt has {count} <image> placeholder(s) but {num_images} image(s) were given: "
            "give one image per placeholder, or leave the placeholders out to have them added"
        )


def run_ask(args: argparse.Namespace) -> int:
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    _positive(args.max_new_tokens, "--max-new-tokens")
    _check_prompt_format(args.prompt_format)
    _check_device(args.device)
    _positive(args.url_timeout, "--url-timeout", 0.001)
    images = _load_images(args.images, args.url_timeout)
    _check_placeholders(args.prompt, len(images))
    pipe = _load_pipeline(args, resolve_model(args.model))
    streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []
    stop = threading.Event()  # set when the reader gives up (Ctrl-C, a closed pipe): generation ends at its next token

    def generate() -> None:
        try:
            pipe(
                [images],
                prompt=[args.prompt],
                max_new_tokens=args.max_new_tokens,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_Stopped(stop)]),
            )
        except BaseException as exc:  # handed to the main thread, which reports it
            failure.append(exc)
            streamer.end()

    if hasattr(sys.stdout, "reconfigure"):  # the answer is printed whatever the output's encoding can hold
        sys.stdout.reconfigure(errors="replace")
    worker = threading.Thread(target=generate, name="llava-next-ask", daemon=True)
    worker.start()
    try:
        for chunk in streamer:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except BaseException:
        # the worker must end before this thread does: torch aborts the process under a thread still in an op
        stop.set()
        worker.join(timeout=60)
        raise
    worker.join()
    if failure:
        raise failure[0]
    sys.stdout.write("\n")
    return 0


def _folder_files(folder: str) -> tuple[list[Path], list[Path]]:
    """The image files of *folder* (by suffix, sorted) and its other files (left alone, but reported)."""
    path = Path(folder)
    if not path.is_dir():
        raise CommandError(f"{folder!r} is not a folder: give a folder of images")
    files = sorted(p for p in path.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise CommandError(f"{folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images, [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]


def read_done(out: Path) -> set[str]:
    """The images already captioned in *out*. A trailing partial result line (an interrupted write) is cut off,
    but only once every complete line has been read as a result line: a file that is not a results file is
    refused untouched."""
    if not out.exists():
        return set()
    if not out.is_file():  # a pipe or a device (/dev/stdout, /dev/null): written to, never read (it could block)
        return set()
    data = out.read_bytes()
    *lines, tail = data.split(b"\n")  # not splitlines(): a result may hold U+2028 and the like
    done = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line.decode("utf-8"))["image"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CommandError(f"{out}: line {number} is not a result line ({exc}): fix or move the file") from exc
    if tail:
        if not tail.startswith(b'{"image": '):
            raise CommandError(
                f"{out}: its last line is neither a result line nor the start of one: fix or move the file"
            )
        try:  # a whole result whose newline is missing (saved by an editor): kept, its newline added
            done.add(json.loads(tail.decode("utf-8"))["image"])
            ending = b"\n"
        except (ValueError, KeyError, TypeError):  # the start of one, cut off by an interrupted write
            ending = b""
        with open(out, "r+b") as handle:
            if ending:
                handle.seek(0, 2)
                handle.write(ending)
            else:
                handle.truncate(len(data) - len(tail))
    return done


def result_line(image: str, prompt: str, text: str) -> str:
    """One result of ``caption`` (single machine and Ray alike): a whole JSON line, newline included. ASCII: a
    file name that is not UTF-8 (Python holds it with surrogates) and line separators inside a text are
    escaped."""
    return json.dumps({"image": image, "prompt": prompt, "generated_text": text}, ensure_ascii=True) + "\n"


def run_caption(args: argparse.Namespace) -> int:
    """Caption the folder; see :data:`CAPTION_EXIT_RULE` for the exit status."""
    if args.ray:
        from .distributed import run_caption as run_caption_on_ray

        return run_caption_on_ray(args)
    from .distributed import ray_only_options_given  # (parsing and its defaults need no Ray)

    given = ray_only_options_given(args)
    if given:  # silently ignored, they would mislead (2 workers asked, 1 running)
        raise CommandError(
            f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} with --ray only: add --ray local "
            "(or a cluster's address), or leave them out"
        )
    from tqdm.auto import tqdm

    _positive(args.batch_size, "--batch-size")
    _positive(args.max_new_tokens, "--max-new-tokens")
    _check_prompt_format(args.prompt_format)
    _check_device(args.device)
    if args.prompt.count("<image>") > 1:
        raise CommandError(
            f"the prompt has {args.prompt.count('<image>')} <image> placeholders, but caption answers about one "
            "image at a time: use one placeholder, or none to have it added"
        )
    files, others = _folder_files(args.folder)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise CommandError(f"the folder of --out ({out.parent}) does not exist")
    if out.is_dir():
        raise CommandError(f"--out {args.out!r} is a folder: give a results file such as results.jsonl")
    model = resolve_model(args.model)  # a wrong model is said before any image is read or file opened
    done = read_done(out)
    todo = [f for f in files if f.name not in done]
    pipe = None  # loaded with the first readable image: a rerun with only unreadable ones left loads no model
    captioned, unreadable = 0, []
    progress = tqdm(
        total=len(files),
        initial=len(files) - len(todo),
        unit="image",
        file=sys.stderr,
        desc="captioning",
        disable=not todo,
    )
    with open(out, "a", encoding="utf-8") as results:
        for start in range(0, len(todo), args.batch_size):
            batch, images = [], []
            for path in todo[start : start + args.batch_size]:
                try:
                    images.append(_load_images([str(path)])[0])
                    batch.append(path)
                except CommandError as exc:
                    unreadable.append(path.name)
                    progress.write(f"skipped {path.name}: {str(exc).split(': ', 1)[-1]}", file=sys.stderr)
                    progress.update(1)
            if not batch:
                continue
            pipe = pipe or _load_pipeline(args, model)
            answers = pipe(  # one request per image, whatever the prompt holds
                [[image] for image in images],
                prompt=[args.prompt] * len(images),
                batch_size=len(images),
                max_new_tokens=args.max_new_tokens,
                detail=args.detail,
            )
            for path, answer in zip(batch, answers, strict=True):
                line = result_line(path.name, args.prompt, answer[0]["generated_text"])
                results.write(line)  # one whole line per write, flushed: never half a line on disk
                results.flush()
            captioned += len(batch)
            progress.update(len(batch))
    progress.close()
    print(_caption_summary(args.folder, out, captioned, len(files) - len(todo), unreadable, others), file=sys.stderr)
    return 1 if unreadable and args.strict else 0


def _caption_summary(
    folder: str, out: Path, captioned: int, already: int, unreadable: list[str], others: list[Path]
) -> str:
    """One line: what this run did, what was there before, and what it left out and why."""

    def names(items: Sequence[str]) -> str:
        return ", ".join(items[:5]) + (f", ... ({len(items) - 5} more)" if len(items) > 5 else "")

    parts = [f"llava-next: captioned {captioned} image(s) of {folder} into {out}"]
    if already:
        parts.append(f"{already} were already there")
    if unreadable:
        parts.append(
            f"{len(unreadable)} unreadable image(s) skipped ({names(unreadable)}; see above; a rerun tries them again)"
        )
    if others:
        parts.append(f"{len(others)} non-image file(s) left alone ({names([p.name for p in others])})")
    return "; ".join(parts)


def run_tiny_checkpoint(args: argparse.Namespace) -> int:
    from .tiny import EXAMPLE_IMAGE, build_tiny_checkpoint

    if not args.out:
        raise CommandError("OUT is empty: give the folder to write, e.g. ./tiny")
    if not 0 <= args.seed < 2**63:
        raise CommandError(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")
    out = Path(args.out)
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise CommandError(f"{str(blocking)!r} is a file, so {args.out!r} cannot be a folder: choose another path")
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CommandError(f"{args.out!r} already exists and is not an empty folder: choose a new folder")
        folder = build_tiny_checkpoint(out, seed=args.seed)
    except ImportError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:  # a parent that is a file, a folder we may not write in...
        reason = exc.strerror or str(exc)
        raise CommandError(
            f"cannot write a checkpoint to {args.out!r}: {reason}; choose a folder you can write in"
        ) from exc
    info = json.loads((folder / "llava_next_tiny.json").read_text())
    size = info["parameters"] / 1e6
    print(f"wrote a tiny checkpoint with RANDOM weights ({size:.1f} M parameters) to {_shell_word(folder)}")
    print("its answers are gibberish: use it for offline demos and smoke tests, e.g.")
    image, model = _shell_word(folder / EXAMPLE_IMAGE), _shell_word(folder)
    print(f"  llava-next ask {image} --model {model} --prompt 'What is in this picture?'")
    return 0


def _shell_word(path: Path) -> str:
    """*path* as a shell reads it back (quoted; bytes that are not UTF-8 shown as escapes)."""
    return shlex.quote(os.fsencode(path).decode("utf-8", errors="backslashreplace"))


def run_serve_command(args: argparse.Namespace) -> int:
    if getattr(args, "unavailable", None):
        raise CommandError(
            f"serve is not available in this install ({args.unavailable}); "
            "install it with: pip install 'llava-next-plugin[serve]'"
        )
    from .serve_cli import run_serve

    if not args.ray:  # a Ray replica's device is its own machine's
        _check_device(args.device)
    args.model = resolve_model(args.model)  # the same default and the same message as ask and caption
    result = run_serve(args)
    return result if isinstance(result, int) else 0


# --- entry point ----------------------------------------------------------------------------------------
def _positive(value: float, name: str, least: float = 1) -> None:
    """A flag's number below *least*, or not finite (``nan``, ``inf``), is said in one line."""
    if not math.isfinite(value):
        raise CommandError(f"{name} must be a finite number, got {value:g}")
    if value < least:
        raise CommandError(f"{name} must be at least {least:g}, got {value:g}")


def _quiet_libraries() -> None:
    """Keep the terminal for answers: transformers' info/warnings only with LLAVA_NEXT_DEBUG."""
    if os.environ.get("LLAVA_NEXT_DEBUG"):
        return
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns (and, as a script, exits with) its status."""
    commands = {
        "ask": run_ask,
        "caption": run_caption,
        "tiny-checkpoint": run_tiny_checkpoint,
        "serve": run_serve_command,
    }
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("llava-next: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other commands do
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as exc:
        if os.environ.get("LLAVA_NEXT_DEBUG"):
            raise
        message = str(exc) if isinstance(exc, CommandError) else first_line(exc)
        print(f"llava-next: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # `python -m llava_next_plugin.cli`: the package's module, not this copy run as __main__, whose CommandError
    # would be another class than the one the other modules raise
    from llava_next_plugin.cli import main as package_main

    sys.exit(package_main())
