"""``headspace prefill``: prefill a document once and save its cache, to answer questions from it later."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from headspace.commands.common import (
    Progress,
    add_chunk_option,
    add_mode_options,
    add_model_options,
    mode_options,
    moved,
    note,
    read_prompt,
    resolve_device,
    resolve_dtype,
)
from headspace.engine.engine import Engine
from headspace.errors import HeadspaceError
from headspace.models import load_config, load_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prefill", help="prefill a document once and save its KV cache (.hsc) to ask it questions later",
        description="Prefill a document in chunks and save the cache, atomically, to one file. Then "
                    "'headspace generate --load FILE --prompt QUESTION' or 'headspace chat --load FILE' answer "
                    "questions about it without prefilling it again.")
    add_model_options(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", metavar="F", help="read the document from file F ('-' for stdin)")
    source.add_argument("--prompt", metavar="TEXT", help="the document text")
    parser.add_argument("--save", required=True, metavar="DOC.hsc", help="where to write the cache")
    add_mode_options(parser)
    add_chunk_option(parser)
    parser.add_argument("--chat", action="store_true",
                        help="open the chat template's user turn with the document; each question closes it")
    return parser


def run(args: argparse.Namespace) -> int:
    document_text = read_prompt(args)[0].rstrip("\n")  # a file's last newline: each question starts on a new line
    save = Path(args.save).expanduser()
    if not save.parent.is_dir():
        raise HeadspaceError(f"cannot save {args.save}: directory '{save.parent}' does not exist")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model.startswith("random:"):
        raise HeadspaceError(f"'{args.model}' has random weights and no tokenizer: it cannot read a document")
    options = mode_options(args, load_config(args.model))
    model, tokenizer = load_model(args.model, device, dtype)
    engine = Engine(model, tokenizer, mode=args.mode, chunk_size=args.chunk_size,
                    allow_beyond_positions=args.allow_beyond_positions, keep_bytes=0, **options)
    start = time.perf_counter()
    with Progress() as progress:
        document = engine.prefill_document(document_text, chat=args.chat, on_chunk=progress)
    seconds = time.perf_counter() - start
    note(f"prefilled {document.length:,} tokens in {seconds:.2f} s ({document.length / seconds:,.0f} tok/s)")
    start = time.perf_counter()
    with Progress("save", "B") as progress:
        size = engine.save(document, save, model_name=args.model, on_progress=progress)
    note(moved("saved", save, size, time.perf_counter() - start))
    return 0
