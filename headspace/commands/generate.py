"""``headspace generate``: prefill a (long) prompt in chunks and stream the answer, or answer from a saved document."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from headspace.commands.common import (
    Progress,
    TokenStream,
    add_chunk_option,
    add_graph_option,
    add_mode_options,
    add_model_options,
    add_sampling_options,
    compile_layers,
    cuda_graphs,
    mode_options,
    note,
    open_document,
    read_prompt,
    resolve_device,
    resolve_dtype,
    sampling,
)
from headspace.engine.engine import Engine
from headspace.errors import HeadspaceError
from headspace.models import SMOLLM2, load_config, load_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="generate text from a (long) prompt, or answer a question from a saved document",
        description="Prefill a prompt in chunks and stream the generated tokens to stdout. Without --prompt or "
                    "--prompt-file, uses the built-in long example (a pass key hidden in ~4K tokens). With --load, "
                    "the prompt is a question about a document saved by 'headspace prefill': it follows the "
                    "document on a new line, and only the question is prefilled.")
    add_model_options(parser, default=None)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt-file", metavar="F", help="read the prompt from file F ('-' for stdin)")
    source.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    parser.add_argument("--load", metavar="DOC.hsc",
                        help="answer from this saved document (its model, mode and dtype unless given)")
    add_mode_options(parser, default=None)
    add_chunk_option(parser)
    add_graph_option(parser)
    add_sampling_options(parser)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--json", metavar="PATH", help="also write text, token ids and stats to PATH as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    # everything that can be checked without weights is checked first
    if args.load and args.prompt is None and args.prompt_file is None:
        raise HeadspaceError("--load answers a question: give it with --prompt or --prompt-file")
    if args.load and args.chat:
        raise HeadspaceError("--chat applies when the document is prefilled: 'headspace prefill --chat'")
    prompt, builtin = read_prompt(args)
    json_path = Path(args.json).expanduser() if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise HeadspaceError(f"cannot write --json {args.json}: directory '{json_path.parent}' does not exist")
    if args.load:
        engine, document = open_document(args, args.load)
        stream = TokenStream()
        with Progress() as progress:
            result = engine.ask(document, "\n" + prompt, on_token=stream, on_chunk=progress, **sampling(args))
    else:
        args.model, args.mode = args.model or SMOLLM2, args.mode or "offload"
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        if args.model.startswith("random:"):
            raise HeadspaceError(f"'{args.model}' has random weights and no tokenizer, so it cannot generate text; "
                                 f"use it with 'headspace info'")
        config = load_config(args.model)
        options = mode_options(args, config)
        if builtin:
            note("no prompt given: using the built-in example, the pass key 68142 hidden in ~4K tokens of filler")
        model, tokenizer = load_model(args.model, device, dtype)
        engine = Engine(model, tokenizer, mode=args.mode, chunk_size=args.chunk_size,
                        allow_beyond_positions=args.allow_beyond_positions, cuda_graphs=cuda_graphs(args),
                        compile_layers=compile_layers(args), **options)
        ids = engine.encode(prompt, chat=args.chat)  # before the bar: a model without a chat template stops here
        stream = TokenStream()
        with Progress() as progress:
            result = engine.generate(ids, on_token=stream, on_chunk=progress, **sampling(args))
    stream.finish()
    if result.stats.placement is not None:
        note(f"placement: {result.stats.placement}")
    print(result.stats.summary(), file=sys.stderr, flush=True)
    if json_path is not None:
        record = {"model": args.model, "mode": args.mode, "text": result.text, "token_ids": result.token_ids,
                  "stats": result.stats.as_dict()}
        try:
            json_path.write_text(json.dumps(record, indent=2) + "\n")
        except OSError as error:
            raise HeadspaceError(f"cannot write --json {args.json}: {error}") from None
    return 0
