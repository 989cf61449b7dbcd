"""Past one machine, on Ray: batch captioning with Ray Data, replicated serving with Ray Serve.

Optional extra: ``pip install 'llava-next-plugin[ray]'`` (``ray[data,serve]``). Ray is imported only
inside the functions below, never when ``llava_next_plugin`` (or this module) is imported.

* :func:`caption_dataset` adds ``answer``, ``tokens`` and ``error`` columns to a ``ray.data.Dataset``:
  ``map_batches`` over a pool of ``workers`` actors, each loading the model once into its own
  :class:`~llava_next_plugin.engine.Engine` (``gpus_per_worker=1``: one actor per GPU). Images come from
  paths, ``http(s)``/``data:`` URLs (the server's allow-list rules, :class:`~llava_next_plugin.validation.Limits`)
  or encoded bytes; a row whose image or prompt is bad gets its ``error`` and no answer, and the job goes on.
  An actor that dies is restarted by Ray Data and its batch is run again, so every row is answered once.
* :func:`build_serve_app` is the Ray Serve application: the very ASGI app of
  :func:`llava_next_plugin.server.create_app` (same routes, validation, limits, auth, metrics) behind a
  deployment whose every replica holds one engine; Serve's proxy balances and autoscales. For a cluster::

      serve run llava_next_plugin.distributed:build_serve_app model=/shared/llava replicas=4
      serve deploy serve_config.yaml   # applications: [{import_path: llava_next_plugin.distributed:build_serve_app,
                                       #                 args: {model: ..., replicas: 4}}]

* ``llava-next caption ... --ray ADDRESS|local`` and ``llava-next serve ... --ray ADDRESS|local`` run
  :func:`run_caption` and :func:`run_serve`; ``local`` starts a Ray runtime on this machine for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from llava_next_sdk.errors import InvalidImageError

from .errors import ImageError, first_line

logger = logging.getLogger(__name__)

__all__ = [
    "caption_dataset",
    "build_serve_app",
    "ray_runtime",
    "parse_autoscale",
    "add_caption_options",
    "add_serve_options",
    "run_caption",
    "run_serve",
    "RESULT_COLUMNS",
    "DETAILS",
]

RESULT_COLUMNS = ("answer", "tokens", "error")
"""The columns :func:`caption_dataset` adds: the text (``None`` on failure), completion tokens, the error
(or ``None``)."""
DETAILS = ("auto", "high", "low")
"""OpenAI's ``detail``, as the server takes it: ``auto``/``high``: any-resolution tiles; ``low``: the base view only
(one tile's tokens: 576 on llava-v1.6-mistral)."""
RAY_HINT = "install the ray extra: pip install 'llava-next-plugin[ray]'"


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"Ray is not installed ({exc}); {RAY_HINT}") from exc
    return ray


def _import_serve():
    """``ray.serve``, or an ImportError that says what to install (Ray without its serve extra has none)."""
    _import_ray()
    try:
        from ray import serve
    except ImportError as exc:
        raise ImportError(f"Ray Serve is not installed ({exc}); {RAY_HINT}") from exc
    return serve


# --- the Ray runtime ----------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_runtime(
    address: str, *, num_cpus: int | None = None, num_gpus: int | None = None, object_store_memory: int | None = None
) -> Iterator[Any]:
    """Connect to the Ray cluster at *address* (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``), or with
    ``"local"`` start a Ray runtime on this machine (no dashboard); either way disconnect (and stop the
    local runtime) on exit. Yields the ``ray`` module. An already connected driver is reused and left alone.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address == "local":
        ray.init(
            address="local",  # a new runtime even where RAY_ADDRESS or a `ray start` cluster would be picked up
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            object_store_memory=object_store_memory,
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# --- batch captioning ------------------------------------------------------------------------------------
def _image_part(value: Any):
    """The SDK's ImagePart for one cell of the image column: bytes, URL, local path, or {"bytes", "path"}."""
    from llava_next_sdk.errors import InvalidImageError
    from llava_next_sdk.types import ImagePart

    if isinstance(value, Mapping):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImagePart(data=bytes(value))
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise InvalidImageError(
            f"the image cell holds {type(value).__name__}, not a path, URL or encoded bytes; fix the image column"
        )
    if value[:5].lower() == "data:" or value.split("://", 1)[0].lower() in ("http", "https"):
        return ImagePart(url=value)
    path = Path(value[7:] if value.startswith("file://") else value)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InvalidImageError(
            f"the image path {value!r} {what}; give an image file readable on every worker "
            "(a shared or copied folder), a URL or bytes"
        )
    return ImagePart(data=path.read_bytes())


class _Captioner:
    """One actor of the pool: loads the model once, then answers a batch of rows per call."""

    def __init__(
        self,
        model: str,
        prompt: str,
        image_column: str,
        max_tokens: int,
        detail: str,
        limits: Any,
        device: str | None,
        dtype: str | None,
        threads: int | None,
        batch_size: int,
    ) -> None:
        import torch

        from .engine import Engine

        if threads:
            torch.set_num_threads(threads)
        self.prompt, self.image_column, self.max_tokens, self.detail = prompt, image_column, max_tokens, detail
        self.limits = limits
        self.engine = Engine.from_pretrained(
            model, device=device, dtype=dtype, max_batch_size=batch_size, max_queue=max(64, batch_size)
        )

    def _prepare(self, cell: Any):
        from llava_next_sdk.types import ChatMessage, ChatRequest, GenerationParams, TextPart

        from .validation import prepare_request

        part = dataclasses.replace(_image_part(cell), detail=self.detail)
        request = ChatRequest(
            messages=(ChatMessage("user", (part, TextPart(self.prompt))),),
            params=GenerationParams(max_tokens=self.max_tokens, temperature=0.0),
        )
        return prepare_request(self.engine, request, self.limits)  # the server's rules, and detail as it has it

    def __call__(self, batch: Any) -> Any:
        """A block of rows (a pyarrow ``Table``) with three columns added: ``answer`` (string), ``tokens`` (int64)
        and ``error`` (string), typed whatever the rows hold (a block of failures has a string ``answer`` column
        of nulls, so that blocks write to one Parquet schema); the other columns as they came."""
        import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information

        as_dict = isinstance(batch, Mapping)  # a dict of columns, as a direct caller may hand one: a dict back
        cells = list(batch[self.image_column]) if as_dict else batch.column(self.image_column).to_pylist()
        answers: list[str | None] = [None] * len(cells)
        tokens = [0] * len(cells)
        errors: list[str | None] = [None] * len(cells)
        handles = {}
        for row, cell in enumerate(cells):  # submit all, so the engine batches them together
            try:
                handles[row] = self.engine.submit(self._prepare(cell))
            except Exception as exc:  # a bad row is answered with its error; the job goes on
                errors[row] = _error_text(exc)
        for row, handle in handles.items():
            try:
                result = handle.result()
                answers[row], tokens[row] = result.text, result.completion_tokens
            except Exception as exc:
                errors[row] = _error_text(exc)
        if as_dict:
            return {**batch, "answer": answers, "tokens": tokens, "error": errors}
        added = {"answer": pa.array(answers, pa.string()), "tokens": pa.array(tokens, pa.int64())}
        added["error"] = pa.array(errors, pa.string())
        batch = batch.drop_columns([name for name in added if name in batch.column_names])
        for name, column in added.items():
            batch = batch.append_column(name, column)
        return batch


#: The largest encoded image ``caption --ray`` reads (the server's default is 20 MiB; these are the user's files).
CAPTION_MAX_IMAGE_BYTES = 512 * 1024 * 1024

#: The ``error`` texts of rows whose image could not be read or used (:func:`_error_text` starts with the class).
IMAGE_ERRORS = tuple(f"{cls.__name__}:" for cls in (InvalidImageError, ImageError))


def _error_text(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {message}"


def caption_dataset(
    ds,
    model: str,
    *,
    prompt: str | None = None,
    image_column: str = "image",
    max_tokens: int = 64,
    detail: str = "auto",
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    threads_per_worker: int | None = None,
    batch_size: int = 8,
    limits: Any = None,
    device: str | None = None,
    dtype: str | None = None,
):
    """Caption (or question) every image of *ds*; returns a lazy ``ray.data.Dataset`` with the rows of *ds*
    plus ``answer`` (str, ``None`` on failure), ``tokens`` (completion tokens) and ``error`` (``None`` or
    ``"ErrorClass: what was wrong"``).

    :param ds: a ``ray.data.Dataset`` with an *image_column* of paths, ``http(s)``/``data:`` URLs or encoded
        bytes.
    :param model: checkpoint folder (reachable from every worker) or hub id.
    :param prompt: the instruction (default: the pipeline's caption prompt).
    :param max_tokens: longest answer in tokens. Decoding is greedy, so a rerun gives the same answers.
    :param detail: one of :data:`DETAILS`.
    :param workers: actors in the pool; each loads the model once and runs one engine.
    :param gpus_per_worker: GPUs per actor (1: one actor per GPU); 0 runs on CPU.
    :param cpus_per_worker: CPUs Ray reserves per actor.
    :param threads_per_worker: torch threads per actor (default: the CPUs reserved, rounded up).
    :param batch_size: rows per call to an actor; they are decoded together.
    :param limits: :class:`~llava_next_plugin.validation.Limits` for the images (default: the server's
        defaults, which fetch no ``http(s)`` URL; pass ``Limits(allowed_url_domains=(...))``).
    :param device: where each engine loads the model (default: cuda when the actor has a GPU).
    :param dtype: the dtype each engine loads the model in (default: the checkpoint's).
    """
    import math

    from .validation import Limits

    ray = _import_ray()
    if detail not in DETAILS:
        raise ValueError(f"detail={detail!r} is not one of {', '.join(DETAILS)}")
    for name, value in (("workers", workers), ("batch_size", batch_size), ("max_tokens", max_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if image_column not in ds.schema().names:
        raise ValueError(
            f"the dataset has no column {image_column!r} (columns: {', '.join(ds.schema().names)}); pass image_column="
        )
    from .pipeline import DEFAULT_PROMPT, IMAGE_PLACEHOLDER

    # the image goes before the text as a part of its own: a placeholder in the text would count a second image
    prompt = DEFAULT_PROMPT if prompt is None else prompt.replace(IMAGE_PLACEHOLDER, "").strip()
    threads = threads_per_worker or max(1, math.ceil(cpus_per_worker))
    return ds.map_batches(
        _Captioner,
        batch_size=batch_size,
        batch_format="pyarrow",  # columns keep their types, and the added ones have theirs in every block
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
        fn_constructor_kwargs=dict(
            model=_for_workers(model),
            prompt=prompt,
            image_column=image_column,
            max_tokens=max_tokens,
            detail=detail,
            limits=limits or Limits(),
            device=device or ("cuda" if gpus_per_worker else "cpu"),
            dtype=dtype,
            threads=threads,
            batch_size=batch_size,
        ),
    )


# --- the command line: llava-next caption --ray -------------------------------------------------------------
#: ``caption`` options that only a Ray run uses (``--ray`` itself and ``--detail`` apply without Ray too)
RAY_ONLY_CAPTION_OPTIONS = (
    "--workers",
    "--cpus-per-worker",
    "--gpus-per-worker",
    "--image-column",
    "--id-column",
    "--allow-url-domain",
)


def ray_only_options_given(args: argparse.Namespace) -> list[str]:
    """The :data:`RAY_ONLY_CAPTION_OPTIONS` that *args* sets away from :func:`add_caption_options`' defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    add_caption_options(parser)
    given = []
    for flag in RAY_ONLY_CAPTION_OPTIONS:
        dest = flag.removeprefix("--").replace("-", "_")
        if getattr(args, dest) != parser.get_default(dest):
            given.append(flag)
    return given


def add_caption_options(parser: argparse.ArgumentParser) -> None:
    """The ``caption`` subcommand's Ray options (parsing them needs no Ray)."""
    group = parser.add_argument_group("past one machine (Ray; needs the ray extra)")
    group.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS|local",
        help="caption on a Ray cluster (ADDRESS: auto, host:6379, ray://host:10001) or on a Ray "
        "runtime started on this machine (local); DIR may then also be a .parquet file",
    )
    group.add_argument("--workers", type=int, default=1, metavar="N", help="model actors, one engine each (default: 1)")
    group.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        metavar="C",
        help="CPUs (and torch threads) per actor (default: this machine's cores shared out with local, "
        "else 1; 1 with GPUs)",
    )
    group.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0,
        metavar="G",
        help="GPUs per actor (1: one actor per GPU; default: 0, CPU)",
    )
    group.add_argument(
        "--image-column",
        default="image",
        metavar="NAME",
        help="parquet input: column of paths, URLs or image bytes (default: image)",
    )
    group.add_argument(
        "--id-column",
        default=None,
        metavar="NAME",
        help="parquet input: column naming each row in --out (default: the image column)",
    )
    group.add_argument(
        "--allow-url-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="fetch http(s) image URLs from DOMAIN and its subdomains (repeatable; default: none)",
    )
    group.add_argument(
        "--detail",
        default="auto",
        choices=DETAILS,
        help="low: the base view only (one tile's tokens), as OpenAI's detail on the server (default: auto)",
    )


def _journal(out: Path) -> Path:
    """Where results are appended line by line: *out* itself, or ``OUT.parquet.jsonl`` next to a parquet *out*."""
    return out.with_name(out.name + ".jsonl") if out.suffix == ".parquet" else out


def _input_dataset(
    ray, source: str, args, done: set[str], command_error, out: Path
) -> tuple[Any, str, int, int | None]:
    """(dataset of rows still to caption, their id column, rows in all, rows already done: ``None`` for a
    parquet input, whose done rows are those of the journal). *out*, the results table, is never read as input
    (a folder of images may hold it)."""
    from .cli import IMAGE_SUFFIXES

    path = Path(source)
    tables = [p for p in path.glob("*.parquet") if p.resolve() != out.resolve()] if path.is_dir() else []
    holds_out = path.is_dir() and out.resolve().parent == path.resolve()  # read the tables beside it, not it
    if path.is_dir() and not tables:
        for flag, value, default in (
            ("--id-column", args.id_column, None),
            ("--image-column", args.image_column, "image"),
        ):
            if value != default:
                raise command_error(
                    f"{flag} applies to parquet input, but {source!r} is a folder of images (named by their file "
                    f"names): drop {flag}"
                )
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise command_error(f"{source!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .parquet files")
        todo = [{"image": p.name, "path": str(p.resolve())} for p in files if p.name not in done]
        ds = ray.data.from_items(todo) if todo else None
        return ds, "path", len(files), len(files) - len(todo)
    if not path.exists():
        raise command_error(f"{source!r} does not exist: give a folder of images or a parquet file/folder")
    ds = ray.data.read_parquet([str(p) for p in tables] if holds_out else str(path))
    names = ds.schema().names
    id_column = args.id_column or args.image_column
    for flag, column in (("--image-column", args.image_column), ("--id-column", id_column)):
        if column not in names:
            raise command_error(f"{source} has no column {column!r} ({flag}); its columns: {', '.join(names)}")
    import pyarrow as pa

    id_type = dict(zip(names, ds.schema().types, strict=True))[id_column]
    # bytes, or a struct such as Hugging Face's image column ({bytes, path}): a row's id would be its whole image
    kind = None
    if isinstance(id_type, pa.DataType):
        if pa.types.is_binary(id_type) or pa.types.is_large_binary(id_type):
            kind = "bytes"
        elif pa.types.is_struct(id_type) or pa.types.is_list(id_type) or pa.types.is_large_list(id_type):
            kind = f"{id_type}"[:60] + " values"
    if kind:
        raise command_error(
            f"{source}: the column {id_column!r} holds {kind}, which cannot name rows in --out; "
            "give --id-column with a column of names or numbers"
        )
    total = ds.count()
    distinct = len(ds.unique(id_column))
    if distinct != total:
        raise command_error(
            f"{source}: the column {id_column!r} names {total} rows with {distinct} distinct values, so results "
            "in --out could not say which row they are for, nor a rerun which rows are done: give --id-column "
            "a column of unique names"
        )
    if done:
        ds = ds.filter(lambda row, done=frozenset(done): str(row[id_column]) not in done)
    return ds, args.image_column, total, None


def run_caption(args: argparse.Namespace) -> int:
    """``llava-next caption SOURCE --ray ADDRESS|local``: the single-machine output format and resume rule
    (:func:`llava_next_plugin.cli.read_done`, :func:`llava_next_plugin.cli.result_line`), results written as
    they stream back, a progress bar, and a final count of done and failed rows."""
    from PIL import Image
    from tqdm.auto import tqdm

    from .cli import CommandError, _positive, read_done, resolve_model, result_line
    from .validation import Limits

    if args.prompt_format:
        raise CommandError("--prompt-format does not apply with --ray: the workers use the checkpoint's chat template")
    for name in ("workers", "max_new_tokens", "batch_size"):
        _positive(getattr(args, name), "--" + name.replace("_", "-"))
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise CommandError(f"the folder of --out ({out.parent}) does not exist")
    if out.suffix not in (".jsonl", ".parquet", ".json", ".txt", ""):
        raise CommandError(f"--out {out}: write results to a .jsonl or a .parquet file")
    model = resolve_model(args.model)  # --model, else $LLAVA_NEXT_MODEL, else the default, as on one machine
    journal = _journal(out)
    done = read_done(journal)
    # the user's own images, as on one machine: up to PIL's decompression-bomb limit, not the server's 16 MP
    pixels = int(Image.MAX_IMAGE_PIXELS or 2**31)
    limits = Limits(
        max_image_pixels=pixels,
        max_request_pixels=pixels,
        max_pixels_in_flight=pixels,
        max_image_bytes=CAPTION_MAX_IMAGE_BYTES,
        allowed_url_domains=tuple(d.lower().strip(".") for d in args.allow_url_domain),
    )
    # CPUs (and torch threads) per actor: this machine's cores shared out when local, one kept free for the
    # tasks that read the input (an actor pool holding every CPU would starve them); else 1 per actor
    cores = os.cpu_count() or 1
    cpus = max(1, (cores - 1) // args.workers) if args.ray == "local" and not args.gpus_per_worker else 1
    if args.cpus_per_worker is not None:
        _positive(args.cpus_per_worker, "--cpus-per-worker", least=0.01)
        cpus = args.cpus_per_worker
    try:
        runtime = ray_runtime(args.ray, num_cpus=(max(cores, cpus * args.workers + 1) if args.ray == "local" else None))
        with runtime as ray:
            ray.data.DataContext.get_current().enable_progress_bars = False  # ours is the one bar
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            if args.gpus_per_worker:
                _check_gpus(args.workers * args.gpus_per_worker, "--gpus-per-worker", args.ray, CommandError)
            ds, image_column, total, found_done = _input_dataset(ray, args.folder, args, done, CommandError, out)
            id_column = args.id_column or ("image" if image_column == "path" else image_column)
            already = len(done) if found_done is None else found_done
            captioned = failed = unreadable = 0
            if ds is not None:
                results = caption_dataset(
                    ds,
                    model,
                    prompt=args.prompt,
                    image_column=image_column,
                    max_tokens=args.max_new_tokens,
                    detail=args.detail,
                    workers=args.workers,
                    gpus_per_worker=args.gpus_per_worker,
                    cpus_per_worker=cpus,
                    batch_size=args.batch_size,
                    limits=limits,
                    device=args.device,
                    dtype=None if args.dtype == "auto" else args.dtype,
                )
                progress = tqdm(total=total, initial=already, unit="image", file=sys.stderr, desc="captioning")
                with open(journal, "a", encoding="utf-8") as lines:
                    # only what the journal needs comes back to this process (not the images' bytes again)
                    for row in results.select_columns(list(dict.fromkeys([id_column, "answer", "error"]))).iter_rows():
                        key = str(row[id_column])
                        if row["error"] is None:
                            lines.write(result_line(key, args.prompt, row["answer"]))
                            lines.flush()  # one whole line per write: an interruption leaves no half line
                            captioned += 1
                        else:
                            failed += 1
                            unreadable += row["error"].startswith(IMAGE_ERRORS)
                            progress.write(f"failed {key}: {row['error']}", file=sys.stderr)
                        progress.update(1)
                progress.close()
    except ImportError as exc:
        raise CommandError(str(exc)) from exc
    if out != journal:
        _write_parquet(journal, out)
    print(f"llava-next: {captioned} captioned, {failed} failed, {already} already in {journal}", file=sys.stderr)
    # the single machine's rule (CAPTION_EXIT_RULE): unreadable images fail the run only with --strict
    return 1 if failed > unreadable or (unreadable and args.strict) else 0


def _write_parquet(journal: Path, out: Path) -> None:
    """Every result line of *journal* as a parquet table at *out*, replaced atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # pyarrow ships no type information

    lines = journal.read_text(encoding="utf-8").split("\n")  # not splitlines(): a text may hold U+2028
    rows = [json.loads(line) for line in lines if line.strip()]
    partial = out.with_name(out.name + ".partial")
    pq.write_table(
        pa.Table.from_pylist(
            rows, schema=pa.schema([("image", pa.string()), ("prompt", pa.string()), ("generated_text", pa.string())])
        ),
        partial,
    )
    os.replace(partial, out)


# --- serving: Ray Serve ---------------------------------------------------------------------------------------
_DEPLOYMENT = None


def _server_deployment():
    """The Ray Serve deployment class (made on first use, so importing this module needs no Ray)."""
    global _DEPLOYMENT
    if _DEPLOYMENT is None:
        serve = _import_serve()

        @serve.ingress()  # the app is built per replica by __serve_build_asgi_app__, around its engine
        class LlavaNextServer:
            """One replica: one engine, and the one app definition (:func:`llava_next_plugin.server.create_app`)."""

            def __init__(self, model: str, engine_options: dict, app_options: dict, threads: int | None) -> None:
                from .engine import Engine

                if threads:
                    import torch

                    torch.set_num_threads(threads)
                self.engine = Engine.from_pretrained(model, **engine_options)
                self.app_options = app_options

            def __serve_build_asgi_app__(self):
                from .server import create_app

                return create_app(self.engine, **self.app_options)

            def check_health(self) -> None:
                """Serve's health probe: a replica whose engine has stopped (its thread died) is replaced,
                rather than answer every request 503."""
                if self.engine.stopped:
                    raise RuntimeError("this replica's engine has stopped")

        _DEPLOYMENT = serve.deployment(LlavaNextServer, name="LlavaNextServer")
    return _DEPLOYMENT


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN..MAX"`` -> ``(MIN, MAX)``, with ``0 <= MIN <= MAX`` and ``MAX >= 1``."""
    low, sep, high = str(text).partition("..")
    try:
        bounds = (int(low), int(high))
    except ValueError:
        bounds = None
    if not sep or bounds is None or not 0 <= bounds[0] <= bounds[1] or bounds[1] < 1:
        raise ValueError(f"--autoscale {text!r}: write MIN..MAX with 0 <= MIN <= MAX and MAX >= 1, e.g. 1..4")
    return bounds


def _flag(value: Any) -> bool | None:
    """A yes/no option as Python or ``serve run key=value`` gives it (``None``: unset)."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a yes/no value; write true or false")


def build_serve_app(args: Mapping[str, Any]):
    """The Ray Serve application (``serve run llava_next_plugin.distributed:build_serve_app model=PATH ...``).

    *args* (one dict, as Ray Serve passes ``serve run key=value`` or a config file's ``args:``; values may be
    strings): ``model`` (required), ``replicas`` (default 1), ``autoscale`` (``"MIN..MAX"``: replicas follow
    the load, each aiming at ``max_batch_size`` requests in flight), ``gpus_per_replica``,
    ``cpus_per_replica`` (default 1), ``threads`` (torch threads per replica); the engine's ``device``,
    ``dtype``, ``max_batch_size``, ``max_queue``, ``max_model_len``, ``prefill_chunk``, ``compile``; the
    app's ``served_model_name`` (default: as ``llava-next serve`` names it), ``api_key``, ``drain_timeout``,
    ``allow_url_domains`` (list or comma-separated) and every other field of
    :class:`~llava_next_plugin.validation.Limits` (``max_images_per_request``, ``max_image_pixels``,
    ``max_request_pixels``, ``max_pixels_in_flight``, ``max_image_bytes``, ``url_timeout``,
    ``max_body_bytes``, ``max_stop_chars``): the options of ``llava-next serve``, with the same defaults.

    :param args: the options above.
    :returns: the bound ``ray.serve.Application``.
    :raises ValueError: no ``model``, an unknown option, or a value out of range.
    """
    from .serve_cli import API_KEY_ENV
    from .server import default_served_name
    from .validation import Limits

    options = {name: value for name, value in dict(args).items() if value is not None}
    model = options.pop("model", None)
    if not model:
        raise ValueError("build_serve_app needs model=PATH_OR_HUB_ID")
    replicas = int(options.pop("replicas", 1))
    autoscale = options.pop("autoscale", None)
    gpus = float(options.pop("gpus_per_replica", 0))
    cpus = float(options.pop("cpus_per_replica", 1))
    threads = options.pop("threads", None)
    domains = options.pop("allow_url_domains", ()) or ()
    if isinstance(domains, str):
        domains = [d.strip() for d in domains.split(",") if d.strip()]
    dtype = options.pop("dtype", None)
    max_batch_size, max_queue = int(options.pop("max_batch_size", 8)), int(options.pop("max_queue", 64))
    if max_batch_size < 1 or max_queue < 1:  # every request passes through the queue: 0 would refuse them all
        raise ValueError(f"max_batch_size and max_queue must be at least 1, got {max_batch_size} and {max_queue}")
    max_model_len = options.pop("max_model_len", None)
    engine_options = {
        "device": options.pop("device", None) or ("cuda" if gpus else "cpu"),
        "dtype": None if dtype in (None, "auto") else dtype,
        "max_batch_size": max_batch_size,
        "max_queue": max_queue,
        "max_context": int(max_model_len) if max_model_len else None,
        "prefill_chunk": int(options.pop("prefill_chunk", 512)),
        "compile": _flag(options.pop("compile", None)),
        "model_name": options.pop("served_model_name", None) or default_served_name(str(model)),
    }
    limit_types: dict[str, Any] = {  # the numeric fields: seconds are floats, the rest counts
        f.name: float if isinstance(f.default, float) else int
        for f in dataclasses.fields(Limits)
        if f.name != "allowed_url_domains"
    }
    limits = Limits(
        allowed_url_domains=tuple(d.lower().strip(".") for d in domains),
        **{name: kind(options.pop(name)) for name, kind in limit_types.items() if name in options},
    )
    drain_timeout = float(options.pop("drain_timeout", 30.0))
    app_options = {
        "limits": limits,
        # as `llava-next serve`: the environment's key when none is given (else /v1 would be open)
        "api_key": (options.pop("api_key") or None) if "api_key" in options else os.environ.get(API_KEY_ENV) or None,
        "drain_timeout": drain_timeout,
        "model_aliases": (str(model),),  # the name a client that started us knows, as `llava-next serve` has it
        "echo_request_id": False,  # Serve's proxy sets X-Request-ID on the request and answers with it itself
    }
    if options:
        raise ValueError(f"unknown serve option(s): {', '.join(sorted(options))}; see build_serve_app's docstring")
    deployment_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        "max_ongoing_requests": max_batch_size + max_queue,
        # a replica told to stop drains for drain_timeout (the app's own drain); Serve's default 20 s would kill it
        # first and its requests in flight would get a bare 500
        "graceful_shutdown_timeout_s": drain_timeout + 10.0,
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    if autoscale:
        low, high = parse_autoscale(autoscale)
        deployment_options.update(
            num_replicas="auto",
            autoscaling_config={
                "min_replicas": low,
                "max_replicas": high,
                "initial_replicas": min(max(replicas, low), high),
                "target_ongoing_requests": max_batch_size,
            },
        )
    else:
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        deployment_options["num_replicas"] = replicas
    deployment = _server_deployment().options(**deployment_options)
    return deployment.bind(_for_workers(model), engine_options, app_options, int(threads) if threads else None)


def _for_workers(model: Any) -> str:
    """*model* as Ray's workers must be given it: a local folder as an absolute path (they run in the working
    directory of whoever started Ray, not the driver's), a hub id as it is."""
    path = os.path.expanduser(str(model))
    return os.path.abspath(path) if os.path.isdir(path) else str(model)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's Ray options (parsing them needs no Ray)."""
    group = parser.add_argument_group("past one machine (Ray Serve; needs the ray extra)")
    group.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS|local",
        help="deploy on a Ray cluster (auto, host:6379, ray://host:10001) or a Ray runtime started "
        "on this machine (local) as a Ray Serve application",
    )
    group.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas, one engine each (default: 1)")
    group.add_argument("--autoscale", default=None, metavar="MIN..MAX", help="let Ray Serve vary the replicas")
    group.add_argument("--gpus-per-replica", type=float, default=0, metavar="G", help="GPUs per replica (default: 0)")
    group.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1,
        metavar="C",
        help="CPUs per replica, its engine running that many torch threads (default: 1)",
    )


SERVE_APP_NAME = "llava-next"
"""The Ray Serve application ``llava-next serve --ray`` deploys (at route ``/``): one per cluster."""


def _deployment_failure(serve) -> str:
    """The last line of the error that ended our application's replicas (what Serve's exception leaves out)."""
    status = serve.status().applications.get(SERVE_APP_NAME)
    messages = [d.message for d in (status.deployments.values() if status else ()) if getattr(d, "message", "")]
    lines = [line.strip() for message in messages for line in message.splitlines() if line.strip()]
    cause = lines[-1] if lines else "no replica said why (see the Ray logs)"
    return _ANSI.sub("", cause)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _check_proxy_address(host: str, port: int, command_error) -> None:
    """Serve already running on the cluster keeps its own HTTP address (Ray only logs that ours is not applied):
    say so rather than print an address that nothing answers on."""
    try:
        from ray.serve.context import _get_global_client  # no public way to read the proxy's address

        client = _get_global_client()
        actual = (client.http_config.host, int(client.http_config.port))  # type: ignore[union-attr]
    except Exception:  # another Ray version: nothing to compare with
        return
    if actual != (host, port):
        raise command_error(
            f"Ray Serve already runs on this cluster on {actual[0]}:{actual[1]}, not the {host}:{port} asked: "
            f"pass --host {actual[0]} --port {actual[1]}, or stop Serve there first (serve shutdown)"
        )


def _check_gpus(needed: float, flag: str, address: str, command_error) -> None:
    """Refuse, before anything waits for them, GPUs the Ray runtime does not have (Ray would wait for ever)."""
    import ray

    have = float(ray.cluster_resources().get("GPU", 0))
    if have >= needed:
        return
    message = (
        f"{flag} asks for {needed:g} GPU(s) in all, but the Ray "
        f"{'runtime on this machine' if address == 'local' else 'cluster'} has {have:g}"
    )
    if address == "local":
        raise command_error(message + ": lower it, or run without GPUs (0)")
    logger.warning("%s: the job waits until the cluster has them (an autoscaler may add them)", message)


class ServeAppTakenError(RuntimeError):
    """``llava-next serve --ray`` found our application already running on the cluster."""


def run_serve(args: argparse.Namespace) -> int:
    """``llava-next serve --ray ADDRESS|local``: deploy :func:`build_serve_app` and serve until interrupted."""
    import math
    import signal
    import time

    from .validation import Limits

    if not args.cpus_per_replica > 0:
        raise ValueError(f"--cpus-per-replica must be more than 0, got {args.cpus_per_replica}")
    if args.autoscale:
        parse_autoscale(args.autoscale)
    elif args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    app = build_serve_app(
        dict(
            model=args.model,
            replicas=args.replicas,
            autoscale=args.autoscale,
            gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica,
            threads=max(1, math.ceil(args.cpus_per_replica)),
            device=args.device,
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            max_model_len=args.max_model_len,
            prefill_chunk=args.prefill_chunk,
            compile=args.compile,
            served_model_name=args.served_model_name,
            api_key=args.api_key,
            drain_timeout=args.drain_timeout,
            allow_url_domains=args.allow_url_domain,
            # every request limit `llava-next serve` takes, by the same names (Limits' fields)
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits) if hasattr(args, f.name)},
        )
    )
    replicas = parse_autoscale(args.autoscale)[1] if args.autoscale else args.replicas

    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (and SIGINT where a shell started us ignoring it) stop as Ctrl-C does

    from .cli import CommandError

    try:
        serve = _import_serve()
    except ImportError as exc:
        raise CommandError(str(exc)) from exc
    local_cpus = math.ceil(replicas * args.cpus_per_replica) + 1  # the replicas', and one for Serve's own actors
    with ray_runtime(args.ray, num_cpus=(local_cpus if args.ray == "local" else None)):
        # after ray.init, whose core worker installs its own SIGTERM handler (which aborts)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)
        if args.gpus_per_replica:
            _check_gpus(replicas * args.gpus_per_replica, "--gpus-per-replica", args.ray, CommandError)
        serve.start(http_options={"host": args.host, "port": args.port})
        if SERVE_APP_NAME in serve.status().applications:
            # another `serve --ray` on this cluster: deploying would replace its application, and our exit would
            # delete it
            raise ServeAppTakenError(
                f"a Ray Serve application named {SERVE_APP_NAME!r} already runs on this cluster (another "
                "`llava-next serve --ray`): stop it first, or add replicas to it"
            )
        _check_proxy_address(args.host, args.port, CommandError)
        try:
            try:
                serve.run(app, name=SERVE_APP_NAME, route_prefix="/")
            except RuntimeError as exc:  # Serve's word for a deployment that failed: its replicas' error is apart
                raise CommandError(f"{first_line(exc).rstrip('.')}: {_deployment_failure(serve)}") from exc
            print(
                f"llava-next: serving {args.model} on http://{args.host}:{args.port}/v1 with Ray Serve "
                f"({args.autoscale or args.replicas} replicas); Ctrl-C stops",
                flush=True,
            )
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            # our application only: a cluster's Serve may hold others; Serve itself goes when nothing is left
            serve.delete(SERVE_APP_NAME)
            if not serve.status().applications:
                serve.shutdown()
    return 0
