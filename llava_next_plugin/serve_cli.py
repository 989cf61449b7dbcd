"""``llava-next serve``: the OpenAI-compatible server's command line.

``llava_next_plugin.cli`` adds the subcommand with :func:`add_serve_parser` and runs it with :func:`run_serve`;
``python -m llava_next_plugin.serve_cli --model PATH`` runs it on its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

for _module in ("starlette", "uvicorn"):
    if importlib.util.find_spec(_module) is None:  # tells llava_next_plugin.cli that serve is not installed
        raise ImportError(f"{_module} is not installed; pip install 'llava-next-plugin[serve]'")

__all__ = ["add_serve_parser", "run_serve", "main"]

API_KEY_ENV = "LLAVA_NEXT_API_KEY"


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .validation import Limits

    defaults = Limits()
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="model id reported to clients (default: --model)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})")
    parser.add_argument("--allow-url-domain", action="append", default=[], metavar="DOMAIN",
                        help="fetch http(s) image URLs from DOMAIN and its subdomains (repeatable; default: none, "
                             "only data: URLs)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: the checkpoint's)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; then 429")
    parser.add_argument("--max-images-per-request", type=int, default=defaults.max_images_per_request)
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests may take to finish after SIGTERM")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    from .distributed import add_serve_options  # parsing the Ray options needs no Ray

    add_serve_options(parser)
    parser.set_defaults(func=run_serve)
    return parser


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an ``argparse`` subparsers object; its ``func`` is :func:`run_serve`."""
    parser = subparsers.add_parser(
        "serve", help="serve a model over the OpenAI Chat Completions API",
        description="Serve a LLaVA-NeXT checkpoint over an OpenAI-compatible HTTP API "
                    "(POST /v1/chat/completions, GET /v1/models, /health, /metrics).")
    return _configure(parser)


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, start the engine and serve until SIGINT/SIGTERM (draining in-flight requests)."""
    if args.ray:
        from .distributed import run_serve as run_serve_on_ray

        return run_serve_on_ray(args)
    from .engine import Engine
    from .server import create_app, run_server
    from .validation import Limits

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    dtype = None if args.dtype in (None, "auto") else args.dtype
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype,  # None: the engine's default
                                    max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                                    model_name=args.served_model_name or args.model)
    limits = Limits(max_images_per_request=args.max_images_per_request, max_image_pixels=args.max_image_pixels,
                    max_body_bytes=args.max_body_bytes,
                    allowed_url_domains=tuple(d.lower().strip(".") for d in args.allow_url_domain))
    app = create_app(engine, limits=limits, api_key=args.api_key, drain_timeout=args.drain_timeout)
    run_server(app, host=args.host, port=args.port, log_level=args.log_level, drain_timeout=args.drain_timeout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="llava-next serve"))
    args = parser.parse_args(argv)
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
