"""``headspace serve``: the model behind an OpenAI-compatible HTTP API that keeps documents between requests."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from headspace.commands.common import (
    add_chunk_option,
    add_mode_options,
    add_model_options,
    byte_size,
    int_at_least,
    mode_options,
    non_negative_int,
    note,
    positive_int,
    resolve_device,
    resolve_dtype,
)
from headspace.engine.engine import Engine
from headspace.errors import HeadspaceError
from headspace.models import load_config, load_model
from headspace.units import human_bytes

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def keep_size(text: str) -> int | str:
    """``--cache-bytes``: ``auto``, ``0`` or a size."""
    return text if text in ("auto", "0") else byte_size(text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models (OpenAI's API, streaming included), "
                    "/health and /metrics. Requests run one at a time; prompts that start with a kept document "
                    "reuse its KV instead of prefilling it again.")
    add_model_options(parser)
    add_mode_options(parser)
    add_chunk_option(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 for every interface)")
    server.add_argument("--port", type=int_at_least(0), default=8000, help="default 8000; 0 picks a free port")
    server.add_argument("--api-key", metavar="KEY", default=os.environ.get("HEADSPACE_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $HEADSPACE_API_KEY, else no key)")
    server.add_argument("--served-model-name", metavar="NAME", help="the model name clients send (default: --model)")
    server.add_argument("--cache-bytes", type=keep_size, default="auto", metavar="SIZE",
                        help="memory for the KV of kept prompts and documents, least recently used dropped first: "
                             "a size (64GiB), 'auto' (default: half the host RAM) or 0 to keep none")
    server.add_argument("--load", action="append", default=[], metavar="FILE",
                        help="a saved document cache (.hsc) to keep from the start; repeat for several")
    server.add_argument("--max-body-bytes", type=byte_size, default="32MiB", metavar="SIZE",
                        help="largest request body accepted (default 32MiB); larger ones get a 413")
    server.add_argument("--queue-size", type=positive_int, default=64, metavar="N",
                        help="requests waiting for the model before new ones get a 429 (default 64)")
    server.add_argument("--drain-seconds", type=non_negative_int, default=30, metavar="S",
                        help="on SIGTERM or Ctrl-C, how long the running request may finish before it is cancelled "
                             "(default 30); queued requests are answered with 503 at once")
    return parser


def run(args: argparse.Namespace) -> int:
    # here, not at the top: every other command runs without the web packages (fastapi, uvicorn) installed
    from headspace.server import ServerSettings, bind, create_app, serve

    # everything that can be checked without weights is checked first, and the port is taken before loading
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = load_config(args.model)
    options = mode_options(args, config)
    documents = [Path(path).expanduser() for path in args.load]
    for path in documents:
        if not path.is_file():
            raise HeadspaceError(f"--load {path}: no such file")
    sock = bind(args.host, args.port)
    if args.host not in LOOPBACK and args.api_key is None:
        note(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use the model")

    model, tokenizer = load_model(args.model, device, dtype)
    engine = Engine(model, tokenizer, mode=args.mode, chunk_size=args.chunk_size,
                    allow_beyond_positions=args.allow_beyond_positions, keep_bytes=args.cache_bytes, **options)
    for path in documents:
        engine.load(path)
        note(f"keeping the document cache {path}")
    name = args.served_model_name or args.model
    settings = ServerSettings(name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                              queue_size=args.queue_size)
    host, port = sock.getsockname()[:2]
    kept = "half the host RAM" if args.cache_bytes == "auto" else human_bytes(int(args.cache_bytes))
    note(f"serving '{name}' ({args.mode}, keeping up to {kept} of prompts) on http://{host}:{port}/v1")
    serve(create_app(engine, settings, options), sock, drain_seconds=args.drain_seconds)
    return 0
