"""``llava-next serve``: the OpenAI-compatible server's command line.

``llava_next_plugin.cli`` adds the subcommand with :func:`add_serve_parser` and runs it with :func:`run_serve`;
``python -m llava_next_plugin.serve_cli --model PATH`` runs it on its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys

from llava_next_sdk.transports.http import API_KEY_ENV  # one variable for both ends: the SDK sends it too

for _module in ("starlette", "uvicorn"):
    if importlib.util.find_spec(_module) is None:  # tells llava_next_plugin.cli that serve is not installed
        raise ImportError(f"{_module} is not installed; pip install 'llava-next-plugin[serve]'")

__all__ = ["add_serve_parser", "run_serve", "main"]


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .validation import Limits

    defaults = Limits()
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or hub id (default: $LLAVA_NEXT_MODEL, "
        "else llava-hf/llava-v1.6-mistral-7b-hf, as for ask)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="model id reported to clients and the only one requests may name (default: the hub "
        "id, or the checkpoint folder's name)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--allow-url-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="fetch http(s) image URLs from DOMAIN and its subdomains (repeatable; default: none, only data: URLs)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights' dtype (default: the checkpoint's)",
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; then 429")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + completion tokens at most; sizes the KV slots with --max-batch-size "
        "(default: the model's context, lowered to fit 40%% of free GPU memory)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens prefilled between two decode steps (running streams keep flowing)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the decode step, warm-up logged (default: on CUDA only; on CPU it needs a C++ "
        "compiler and takes seconds to warm up)",
    )
    parser.add_argument(
        "--max-images-per-request",
        type=int,
        default=defaults.max_images_per_request,
        help="images in one request at most; then 400",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=defaults.max_image_pixels,
        help="width x height of one image at most (400 beyond)",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=int,
        default=defaults.max_request_pixels,
        help="pixels of a request's images together at most (413 beyond)",
    )
    parser.add_argument(
        "--max-pixels-in-flight",
        type=int,
        default=defaults.max_pixels_in_flight,
        help="image pixels decoded at once across requests (429 beyond)",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=defaults.max_image_bytes,
        help="encoded size of one image, and of one image download, at most",
    )
    parser.add_argument(
        "--url-timeout", type=float, default=defaults.url_timeout, help="seconds for one image URL download, overall"
    )
    parser.add_argument(
        "--max-stop-chars", type=int, default=defaults.max_stop_chars, help="characters of one stop string at most"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help="size of a request body at most (413 beyond)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=defaults.body_timeout,
        help="seconds to receive a request body, overall (408 beyond)",
    )
    parser.add_argument(
        "--max-messages",
        type=int,
        default=defaults.max_messages,
        help="messages in one request, and content parts in one message, at most; 4x as many parts in all (400)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish after SIGTERM; then they are cut",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level",
    )
    from .distributed import add_serve_options  # parsing the Ray options needs no Ray

    add_serve_options(parser)
    return parser


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an ``argparse`` subparsers object (:func:`run_serve` runs it)."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI Chat Completions API",
        description="Serve a LLaVA-NeXT checkpoint over an OpenAI-compatible HTTP API "
        "(POST /v1/chat/completions, GET /v1/models, /health, /metrics).",
    )
    return _configure(parser)


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, start the engine and serve until SIGINT/SIGTERM (draining in-flight requests)."""
    _check_flags(args)
    if args.ray:
        from .distributed import run_serve as run_serve_on_ray

        if args.ray == "local":  # Serve's proxy listens here: a port taken is said before Ray starts
            _check_port(args)

        return run_serve_on_ray(args)
    from .engine import Engine
    from .server import create_app, default_served_name, run_server
    from .validation import Limits

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    dtype = None if args.dtype in (None, "auto") else args.dtype
    # the flags first: a bad combination is said before minutes of loading a checkpoint
    limits = Limits(
        max_images_per_request=args.max_images_per_request,
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        max_pixels_in_flight=args.max_pixels_in_flight,
        max_image_bytes=args.max_image_bytes,
        url_timeout=args.url_timeout,
        max_stop_chars=args.max_stop_chars,
        max_body_bytes=args.max_body_bytes,
        body_timeout=args.body_timeout,
        max_messages=args.max_messages,
        allowed_url_domains=tuple(d.lower().strip(".") for d in args.allow_url_domain),
    )
    _check_port(args)
    engine = Engine.from_pretrained(
        args.model,
        device=args.device,
        dtype=dtype,  # None: the engine's default
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_context=args.max_model_len,
        prefill_chunk=args.prefill_chunk,
        compile=args.compile,
        model_name=args.served_model_name or default_served_name(args.model),
    )
    app = create_app(
        engine, limits=limits, api_key=args.api_key, drain_timeout=args.drain_timeout, model_aliases=(args.model,)
    )  # the name a client that started us knows
    try:
        run_server(app, host=args.host, port=args.port, log_level=args.log_level, drain_timeout=args.drain_timeout)
    except SystemExit as exc:  # uvicorn's own exit (a port taken since the check above): the command's rule
        if exc.code not in (0, None):
            from .cli import CommandError

            raise CommandError(f"the server could not start on {args.host}:{args.port} (see the log above)") from None
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Numbers that cannot work, said in one line before a model loads."""
    from .cli import CommandError, _positive

    if not 1 <= args.port <= 65535:
        raise CommandError(f"--port must be from 1 to 65535, got {args.port}")
    for flag, value, least in (
        ("--max-batch-size", args.max_batch_size, 1),
        ("--prefill-chunk", args.prefill_chunk, 1),
        ("--max-queue", args.max_queue, 1),  # every request passes through the queue
        ("--max-model-len", 1 if args.max_model_len is None else args.max_model_len, 1),
        ("--drain-timeout", args.drain_timeout, 0),
        ("--body-timeout", args.body_timeout, 0.001),
        ("--max-messages", args.max_messages, 1),
        # request limits under which every request (with an image) would be refused
        ("--max-images-per-request", args.max_images_per_request, 0),  # 0: a text-only deployment
        ("--max-image-pixels", args.max_image_pixels, 1),
        ("--max-request-pixels", args.max_request_pixels, 1),
        ("--max-pixels-in-flight", args.max_pixels_in_flight, 1),
        ("--max-image-bytes", args.max_image_bytes, 1),
        ("--url-timeout", args.url_timeout, 0.001),
        ("--max-stop-chars", args.max_stop_chars, 0),  # 0: no stop strings
        ("--max-body-bytes", args.max_body_bytes, 1),
    ):
        _positive(value, flag, least)


def _check_port(args: argparse.Namespace) -> None:
    """A port already taken (or not ours to take) is said before a model loads."""
    from .cli import CommandError

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((args.host, args.port))
    except OSError as exc:
        raise CommandError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; choose another --port or --host"
        ) from None


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main  # one path: the same defaults, checks and messages as `llava-next serve`

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
