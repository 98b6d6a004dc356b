"""``headspace train-retaining``: train Locret retaining heads for a model, backbone frozen."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch

from headspace.commands.common import (
    add_model_options,
    float_in,
    int_at_least,
    non_negative_int,
    note,
    positive_int,
    resolve_device,
)
from headspace.errors import HeadspaceError
from headspace.eviction.retaining.corpus import random_sequences
from headspace.eviction.retaining.train import (
    GROUP_POOLS,
    LOSSES,
    SPAN_TARGETS,
    TARGET_QUERIES,
    TARGET_SCALES,
    TrainConfig,
    train_command,
    train_retaining_heads,
    training_sequences,
)
from headspace.models import load_model
from headspace.units import human_bytes


def add_parser(subparsers) -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train-retaining", help="train Locret retaining heads for a model (backbone frozen)",
        description="Train one small MLP per layer that predicts each token's future attention (Locret), on "
                    "offline text (Python stdlib docstrings, /usr/share license texts) mixed with synthetic "
                    "needle-retrieval sequences, and save them as safetensors for --mode locret.")
    add_model_options(parser)
    parser.add_argument("--out", required=True, metavar="PATH", help="where to write the heads (.safetensors)")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, metavar="N",
                        help=f"training sequences, each followed by --updates Adam steps (default {defaults.steps})")
    parser.add_argument("--seq-len", type=int_at_least(16), default=defaults.seq_len, metavar="N",
                        help=f"tokens per training sequence (default {defaults.seq_len})")
    parser.add_argument("--lr", type=float_in(0.0, 1.0, low_open=True), default=defaults.lr, metavar="LR",
                        help=f"peak AdamW learning rate, cosine decay (default {defaults.lr})")
    parser.add_argument("--hidden", type=positive_int, default=defaults.hidden, metavar="N",
                        help=f"MLP width per layer (default {defaults.hidden})")
    parser.add_argument("--updates", type=positive_int, default=defaults.updates, metavar="N",
                        help=f"Adam updates per sequence (default {defaults.updates})")
    parser.add_argument("--synthetic", type=float_in(0.0, 1.0), default=defaults.synthetic, metavar="P",
                        help=f"share of needles spliced into offline text (default {defaults.synthetic})")
    parser.add_argument("--prose", type=float_in(0.0, 1.0), default=defaults.prose, metavar="P",
                        help="share of facts stated in generated prose and asked at the end (training-only "
                             f"grammars; default {defaults.prose})")
    parser.add_argument("--seed", type=int, default=defaults.seed, metavar="S", help="data and init seed")
    recipe = parser.add_argument_group("recipe (the Locret paper: --smoothness 0.0025 --lr 5e-4 --steps 3000)")
    recipe.add_argument("--loss", choices=LOSSES, default=defaults.loss,
                        help=f"fit of the predicted to the target log-importance (default {defaults.loss})")
    recipe.add_argument("--smoothness", type=float_in(0.0, float("inf")), default=defaults.smoothness, metavar="W",
                        help="weight of the MSE between adjacent positions' predicted scores (Locret 0.0025; "
                             f"default {defaults.smoothness})")
    recipe.add_argument("--group-pool", choices=GROUP_POOLS, default=defaults.group_pool,
                        help=f"how a KV head's target pools its query group (default {defaults.group_pool})")
    recipe.add_argument("--smooth", type=positive_int, default=defaults.smooth, metavar="N",
                        help=f"max-pool the targets over N neighbouring tokens (default {defaults.smooth}; 1: off)")
    recipe.add_argument("--gap", type=non_negative_int, default=defaults.gap, metavar="N",
                        help=f"targets ignore the N nearest later queries (default {defaults.gap})")
    recipe.add_argument("--span-targets", choices=SPAN_TARGETS, default=defaults.span_targets,
                        help="lift every token of a stated fact's value (value), of its key and value together "
                             "(fact) or of its whole sentence (statement) to their largest target, so they are "
                             f"kept or dropped whole (default {defaults.span_targets})")
    recipe.add_argument("--targets", choices=TARGET_SCALES, default=defaults.targets,
                        help="train to the attention probabilities later queries give a token (probability), or to "
                             "each query's probability times the keys it sees (relative), which does not fall with "
                             f"position (default {defaults.targets})")
    recipe.add_argument("--target-queries", choices=TARGET_QUERIES, default=defaults.target_queries,
                        help="which queries give the targets: every later one (later), or only the questions and "
                             "answers that end each sequence, each fact asked (questions, Locret's; needs "
                             f"--synthetic and --prose adding up to 1; default {defaults.target_queries})")
    recipe.add_argument("--detrend", action="store_true",
                        help="take out of the targets their trend in distance to the questions, which favours the "
                             "document's last tokens (needs --target-queries questions)")
    recipe.add_argument("--weight-decay", type=float_in(0.0, float("inf")), default=defaults.weight_decay,
                        metavar="W", help=f"AdamW weight decay (default {defaults.weight_decay})")
    return parser


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.dtype not in (None, "float32"):
        raise HeadspaceError("retaining heads are trained against the float32 model: drop --dtype")
    config = TrainConfig(steps=args.steps, seq_len=args.seq_len, lr=args.lr, hidden=args.hidden,
                         updates=args.updates, synthetic=args.synthetic, prose=args.prose, seed=args.seed,
                         loss=args.loss, span_targets=args.span_targets,
                         smoothness=args.smoothness, group_pool=args.group_pool, smooth=args.smooth, gap=args.gap,
                         weight_decay=args.weight_decay, targets=args.targets, target_queries=args.target_queries,
                         detrend=args.detrend)
    path = train_for_model(args.model, args.out, config, device=str(device), command=train_command())
    note(f"wrote retaining heads to {path} ({human_bytes(path.stat().st_size)})")
    return 0


def train_for_model(model_name: str, out: str | os.PathLike, config: TrainConfig | None = None,
                    device: str | None = None, progress: bool = True, command: str | None = None) -> Path:
    """Load ``model_name``, train its retaining heads on the offline recipe and save them to ``out``.

    What ``headspace train-retaining`` runs; the config and ``command`` go into the file's metadata.
    """
    config = config or TrainConfig()
    if config.steps < 1 or config.seq_len < 16 or config.lr <= 0:
        raise HeadspaceError("steps must be >= 1, seq-len >= 16 and lr > 0")
    model, tokenizer = load_model(model_name, device=device, dtype=torch.float32)
    if tokenizer is None:
        if config.target_queries == "questions":
            raise HeadspaceError(f"{model_name} has no tokenizer, so its heads would train on random tokens, which "
                                 "ask no questions: pass --target-queries later")
        sequences: Iterable = random_sequences(model.config.vocab_size, config.seq_len, config.seed)
    else:
        sequences = training_sequences(tokenizer, config)
    heads, losses = train_retaining_heads(model, sequences, config, progress=progress)
    recipe = {**asdict(config), "model": model_name, "final_loss": round(losses[-1], 5),
              "first_loss": round(losses[0], 5), "data": "stdlib docstrings + /usr/share licenses/copyright, "
              f"{config.synthetic:.0%} needles spliced into them, {config.prose:.0%} facts in generated prose"
              + (", every fact asked" if config.target_queries == "questions" else ""),
              "command": command or train_command()}
    return heads.save(out, recipe=recipe)
