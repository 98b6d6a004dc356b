"""``headspace chat``: questions about one document, one per line, each answered from its kept cache."""

from __future__ import annotations

import argparse
import sys
import time

from headspace.commands.common import (
    Progress,
    TokenStream,
    add_chunk_option,
    add_mode_options,
    add_model_options,
    add_sampling_options,
    mode_options,
    note,
    open_document,
    read_prompt,
    resolve_device,
    resolve_dtype,
    sampling,
)
from headspace.documents.document import Document
from headspace.engine.engine import Engine
from headspace.errors import HeadspaceError
from headspace.models import SMOLLM2, load_config, load_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "chat", help="ask many questions about one document (saved, or prefilled once here)",
        description="Read questions from standard input, one per line (with a prompt on a terminal), and "
                    "answer each from the document's kept cache: each question follows the document on a new "
                    "line, only it is prefilled, and the cache is rolled back after the answer. Prints each "
                    "question's time to first token on stderr.")
    add_model_options(parser, default=None)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", metavar="DOC.hsc", help="a document saved by 'headspace prefill'")
    source.add_argument("--prompt-file", metavar="F", help="prefill the document in file F first")
    add_mode_options(parser, default=None)
    add_chunk_option(parser)
    parser.add_argument("--chat", action="store_true",
                        help="with --prompt-file: the document opens the chat template's user turn")
    add_sampling_options(parser)
    return parser


class TimedStream(TokenStream):
    """Streams the answer and notes when its first token came."""

    first: float | None = None

    def __call__(self, token: int, piece: str) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        super().__call__(token, piece)


def prefilled(args: argparse.Namespace) -> tuple[Engine, Document]:
    """The engine and the document of ``--prompt-file``, prefilled once."""
    args.prompt = None
    text = read_prompt(args)[0].rstrip("\n")  # a file's last newline: each question starts on a new line
    args.model, args.mode = args.model or SMOLLM2, args.mode or "offload"
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    options = mode_options(args, load_config(args.model))
    model, tokenizer = load_model(args.model, device, dtype)
    engine = Engine(model, tokenizer, mode=args.mode, chunk_size=args.chunk_size,
                    allow_beyond_positions=args.allow_beyond_positions, keep_bytes=0, **options)
    with Progress() as progress:
        return engine, engine.prefill_document(text, chat=args.chat, on_chunk=progress)


def run(args: argparse.Namespace) -> int:
    if args.prompt_file == "-":
        raise HeadspaceError("standard input carries the questions: give the document as a file")
    if args.load and args.chat:
        raise HeadspaceError("--chat applies when the document is prefilled: 'headspace prefill --chat'")
    engine, document = open_document(args, args.load) if args.load else prefilled(args)
    interactive = sys.stdin.isatty()
    note(f"the document holds {document.length:,} tokens; ask one question per line"
         + (" (end with Ctrl-D)" if interactive else ""))
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        stream = TimedStream()
        start = time.perf_counter()
        result = engine.ask(document, "\n" + line.rstrip("\n"), on_token=stream, **sampling(args))
        stream.finish()
        prefilled_tokens = result.stats.prompt_tokens - result.stats.cached_tokens
        note(f"time to first token {stream.first - start:.3f} s ({prefilled_tokens} question tokens prefilled, "
             f"{result.stats.cached_tokens:,} kept) | {result.stats.summary()}")
