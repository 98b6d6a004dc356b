"""``headspace eval``: RULER-style synthetic tasks, cache modes side by side."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from headspace.commands.common import (
    add_chunk_option,
    add_model_options,
    context_size,
    csv,
    non_negative_int,
    note,
    positive_int,
    resolve_device,
    resolve_dtype,
)
from headspace.engine.modes import MODES
from headspace.errors import HeadspaceError
from headspace.evaluation.harness import SETTINGS, EvalConfig, evaluate, mode_specs
from headspace.evaluation.report import heatmap, table
from headspace.evaluation.tasks import HAYSTACKS, TASKS
from headspace.models import load_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="RULER-style synthetic long-context tasks, modes side by side",
        description="Generate RULER-style tasks (needles at several depths, multi-key, multi-value, variable "
                    "tracking, common words) on a repetitive or a varied haystack, and a held-out prompt family "
                    "(a ship's log, reported apart), and score every mode on the same prompts with greedy "
                    "decoding, with the digits kept of every numeric answer. Budgeted modes run once per "
                    "--compressions ratio (and --budgets size). Two settings: the question inside the prompt "
                    "that is compressed, and questions after compression (a document with several facts is "
                    "prefilled and compressed once, then asked one question per fact).")
    add_model_options(parser)
    parser.add_argument("--modes", type=csv(str), default="full,offload,locret,streamingllm,snapkv,random",
                        metavar="LIST", help="comma-separated modes (default full,offload,locret,streamingllm,"
                                             "snapkv,random)")
    parser.add_argument("--compressions", type=csv(float), default="4,8", metavar="LIST",
                        help="compression ratios for budgeted modes (default 4,8)")
    parser.add_argument("--budgets", type=csv(int), default="", metavar="LIST",
                        help="fixed budgets (tokens per KV head) for budgeted modes, in addition")
    parser.add_argument("--tasks", type=csv(str), default=",".join(TASKS), metavar="LIST",
                        help=f"default: all ({', '.join(TASKS)})")
    parser.add_argument("--haystacks", type=csv(str), default="noise", metavar="LIST",
                        help=f"haystacks of the main tasks: {', '.join(HAYSTACKS)} (default noise; the held-out "
                             f"family always has its own)")
    parser.add_argument("--settings", type=csv(str), default=",".join(SETTINGS), metavar="LIST",
                        help="inside: the question is part of the compressed prompt; after: a document is "
                             "compressed once, then asked several questions (default inside,after)")
    parser.add_argument("--lengths", type=csv(context_size), default="4096", metavar="LIST",
                        help="prompt lengths in tokens (default 4096)")
    parser.add_argument("--depths", type=csv(float), default="0.1,0.5,0.9", metavar="LIST",
                        help="needle depths for niah_single, 0 = start (default 0.1,0.5,0.9)")
    parser.add_argument("--samples", type=positive_int, default=1, metavar="N", help="per cell (default 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    add_chunk_option(parser)
    parser.add_argument("--stabilizer", type=non_negative_int, metavar="N", help="budgeted modes (default 64)")
    parser.add_argument("--sink", type=non_negative_int, metavar="N", help="budgeted modes (default 4)")
    parser.add_argument("--heads", metavar="PATH", help="retaining heads for locret (default: the shipped file)")
    parser.add_argument("--option", action="append", type=mode_option, default=[], metavar="MODE.FIELD=VALUE",
                        help="an option of one mode's policy, e.g. locret.pool=3 or snapkv-question.window=96 "
                             "(repeatable)")
    parser.add_argument("--out", default="eval.json", metavar="PATH",
                        help="results JSON, rewritten after every run; an existing file is resumed")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out exists")
    parser.add_argument("--heatmap", metavar="PNG", help="also draw niah_single depth x length per mode (questions "
                                                         "after compression in a second file, NAME_after.png)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")
    parser.add_argument("--verbose", action="store_true", help="print every generation")
    return parser


def mode_option(text: str) -> tuple[str, str, int | float | str]:
    """``MODE.FIELD=VALUE`` as (mode, field, value), the value an int or float where it reads as one."""
    key, sep, raw = text.partition("=")
    mode, dot, name = key.rpartition(".")
    if not (sep and dot and mode and name):
        raise argparse.ArgumentTypeError(f"'{text}' is not MODE.FIELD=VALUE (e.g. locret.pool=3)")
    for kind in (int, float):
        try:
            return mode, name, kind(raw)
        except ValueError:
            pass
    return mode, name, raw


def run(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        raise HeadspaceError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if any(not 0 <= d <= 1 for d in args.depths):
        raise HeadspaceError("depths must be between 0 and 1")
    unknown = sorted(set(args.haystacks) - set(HAYSTACKS))
    if unknown or not args.haystacks:
        raise HeadspaceError(f"unknown or no haystack(s) {unknown}; choose from {', '.join(HAYSTACKS)}")
    config = EvalConfig(tuple(args.tasks), tuple(args.lengths), tuple(args.depths), args.samples, args.seed,
                        args.chunk_size or 0, tuple(args.haystacks), tuple(args.settings))  # checked before loading
    per_mode: dict[str, dict] = {}
    for mode, name, value in args.option:
        per_mode.setdefault(mode, {})[name] = value
    specs = mode_specs(args.modes, args.compressions, args.budgets, per_mode, stabilizer=args.stabilizer,
                       sink=args.sink, heads=args.heads)
    for spec in specs:  # unknown fields are refused here, before the model loads
        MODES[spec.mode].parse(dict(spec.options))
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    if not args.chunk_size:
        config = dataclasses.replace(config, chunk_size=4096 if device.type == "cuda" else 1024)
    results = evaluate(model, tokenizer, specs, config, out=args.out, resume=not args.no_resume,
                       log=note if args.verbose else None)
    text = table(results["table"])
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.heatmap and "niah_single" in args.tasks:
        for setting in config.settings:
            png = Path(args.heatmap)
            png = png.with_name(f"{png.stem}_after{png.suffix}") if setting == "after" else png
            heatmap(results["records"], png, [s.label for s in specs], args.haystacks[0], setting)
            note(f"wrote {png}")
    note(f"wrote {args.out}")
    return 0
