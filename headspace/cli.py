"""The ``headspace`` command line.

Every subcommand is two small functions registered together in :data:`COMMANDS`:
``add_<name>_parser(subparsers)`` builds its parser and returns it, and
``run_<name>(args)`` does the work and returns the exit code. To add a
subcommand, write both and append the pair to :data:`COMMANDS`.

Handlers raise :class:`~headspace.errors.HeadspaceError` for anything the user can
fix; :func:`main` is the one place that turns it (and argparse usage errors, and
running out of device memory) into ``headspace: error: <one line>`` on stderr and
exit code 2. Checks that need only the model's config run before any weights load.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import psutil
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from headspace import bench
from headspace.cache import kv_heads_and_dim, layer_windows
from headspace.engine import MODES, Engine, Stats, check_positions, max_positions
from headspace.errors import HeadspaceError
from headspace.memory import check_host_ram, plan
from headspace.models import (
    PRESETS,
    SMOLLM2,
    SUPPORTED_TYPES,
    check_supported,
    default_device,
    default_dtype,
    dequantized_dir,
    load_model,
    smollm2_gguf,
)
from headspace.prompts import passkey_prompt

EXIT_ERROR = 2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([km]?)", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 2**10, "m": 2**20}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become HeadspaceError, so main reports them like any other."""

    def error(self, message: str):
        raise HeadspaceError(f"{message} (see '{self.prog} --help')")


# -- argument types -------------------------------------------------------------------------------

def context_size(text: str) -> int:
    """A token count: ``4096``, ``32k`` (32,768), ``1m`` (1,048,576); k and m are powers of two."""
    match = _SIZE.fullmatch(text.strip().replace("_", ""))
    if not match:
        raise argparse.ArgumentTypeError(f"invalid context size '{text}' (examples: 4096, 32k, 1m)")
    value = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"invalid context size '{text}': it must be a whole number of tokens, >= 1")
    return int(value)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not (low < value if low_open else low <= value) or value > high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def count_or_auto(text: str) -> int | str:
    """``auto`` or a count (``--cpu-heads``)."""
    return "auto" if text == "auto" else non_negative_int(text)


# -- shared options and helpers (for every subcommand) -------------------------------------------

def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=SMOLLM2, metavar="M",
                        help=f"a Hugging Face directory, a .gguf file, '{SMOLLM2}' (default) or "
                             f"'random:<preset>' with preset in {', '.join(PRESETS)}")
    parser.add_argument("--device", metavar="D", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="weights and KV dtype (default: bfloat16 on cuda, float32 on cpu)")


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-heads", type=non_negative_int, default=1, metavar="N",
                        help="offload mode: KV heads per layer kept on the device (default 1)")
    parser.add_argument("--group-heads", type=positive_int, metavar="N",
                        help="offload mode: offloaded KV heads streamed in per step (default: automatic)")
    parser.add_argument("--allow-beyond-positions", action="store_true",
                        help="run past the model's max_position_embeddings instead of refusing")


def resolve_device(name: str | None, must_exist: bool = True) -> torch.device:
    """``--device`` as a torch device; ``must_exist=False`` for planning (``info``) on another machine."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise HeadspaceError(f"unknown device '{name}' (examples: cpu, cuda, cuda:1)") from None
    if not must_exist:
        return device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HeadspaceError(f"device '{name}' requested but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise HeadspaceError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    return DTYPES[name] if name else default_dtype(device)


def model_directory(name: str) -> Path:
    """The Hugging Face directory ``name`` loads from (a GGUF file maps to its dequantized copy)."""
    if name == SMOLLM2:
        return dequantized_dir(smollm2_gguf())
    path = Path(name).expanduser()
    if not path.exists():
        raise HeadspaceError(f"model path '{name}' does not exist (give a directory, a .gguf file, "
                             f"'{SMOLLM2}' or 'random:<preset>' with preset in {', '.join(PRESETS)})")
    if path.is_file() and path.suffix == ".gguf":
        try:
            return dequantized_dir(path)
        except HeadspaceError:
            raise
        except (ValueError, KeyError, OSError) as error:
            raise HeadspaceError(f"cannot load GGUF file '{name}': {error} "
                                 f"(supported architectures: {', '.join(SUPPORTED_TYPES)})") from None
    if not (path / "config.json").is_file():
        raise HeadspaceError(f"'{path}' has no config.json: not a Hugging Face model directory")
    return path


def load_config(name: str) -> PretrainedConfig:
    """The config of model ``name`` without loading weights; refuses unsupported architectures."""
    if name.startswith("random:"):
        preset = name.removeprefix("random:")
        if preset not in PRESETS:
            raise HeadspaceError(f"unknown preset '{preset}'; choose from {', '.join(PRESETS)}")
        fields = dict(PRESETS[preset])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        path = model_directory(name)
        try:
            config = AutoConfig.from_pretrained(path)
        except (ValueError, KeyError) as error:
            model_type = _raw_model_type(path)
            if model_type is not None and model_type not in SUPPORTED_TYPES:
                raise HeadspaceError(f"architecture '{model_type}' is not supported; "
                                     f"supported: {', '.join(SUPPORTED_TYPES)}") from None
            raise HeadspaceError(f"cannot read the config of '{name}': {error}") from None
        except OSError as error:
            raise HeadspaceError(f"cannot read the config of '{name}': {error}") from None
    check_supported(config)
    return config


def _raw_model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_heads(config: PretrainedConfig, gpu_heads: int, group_heads: int | None) -> None:
    """Refuse a head placement the model cannot have, before anything is loaded (``group_heads`` None: automatic)."""
    heads, _ = kv_heads_and_dim(config)
    if gpu_heads > heads:
        raise HeadspaceError(f"--gpu-heads {gpu_heads} is more than the {heads} KV heads per layer this model has; "
                             f"choose 0 to {heads}")
    if group_heads is not None and group_heads < 1:
        raise HeadspaceError(f"--group-heads must be at least 1, got {group_heads}")


def weight_count(config: PretrainedConfig) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _note(message: str) -> None:
    print(f"headspace: {message}", file=sys.stderr, flush=True)


# -- generate -------------------------------------------------------------------------------------

def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="generate text from a (long) prompt",
        description="Prefill a prompt in chunks and stream the generated tokens to stdout. Without --prompt or "
                    "--prompt-file, uses the built-in long example (a pass key hidden in ~4K tokens).")
    add_model_options(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt-file", metavar="F", help="read the prompt from file F ('-' for stdin)")
    source.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    parser.add_argument("--mode", choices=list(MODES), default="offload", help="KV cache mode (default offload)")
    add_placement_options(parser)
    parser.add_argument("--chunk-size", type=positive_int, metavar="N",
                        help="prefill chunk in tokens (default 4096 on cuda, 1024 on cpu)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="default 64")
    parser.add_argument("--temperature", type=_float_in(0.0, float("inf")), default=0.0, metavar="T",
                        help="0 (default) is greedy")
    parser.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=1.0, metavar="P")
    parser.add_argument("--top-k", type=non_negative_int, default=0, metavar="K", help="0 (default) keeps all")
    parser.add_argument("--seed", type=int, metavar="S", help="sampling seed")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--json", metavar="PATH", help="also write text, token ids and stats to PATH as JSON")
    eviction = parser.add_argument_group("eviction modes (locret, streamingllm, snapkv, random, offload+locret)")
    eviction.add_argument("--budget", type=positive_int, metavar="N", help="tokens kept per KV head per layer")
    eviction.add_argument("--compression", type=_float_in(1.0, float("inf")), metavar="X",
                          help="prompt tokens / budget, instead of --budget (default 4)")
    eviction.add_argument("--stabilizer", type=non_negative_int, metavar="N", help="newest tokens always kept (64)")
    eviction.add_argument("--sink", type=non_negative_int, metavar="N", help="first tokens always kept (4)")
    eviction.add_argument("--heads", metavar="FILE",
                          help="retaining heads file (default: the one shipped for the model)")
    parser.add_argument("--cpu-heads", type=count_or_auto, metavar="N|auto",
                        help="offload mode: offloaded KV heads per layer whose decode attention runs on the host CPU "
                             "beside the streamed ones; 'auto' times the first decode steps to find the fastest split")
    return parser


def read_prompt(args: argparse.Namespace) -> tuple[str, bool]:
    """The prompt text and whether it is the built-in example."""
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            name, text = "the prompt read from standard input", sys.stdin.read()
        else:
            name, path = f"prompt file '{args.prompt_file}'", Path(args.prompt_file).expanduser()
            if not path.exists():
                raise HeadspaceError(f"{name} does not exist")
            if path.is_dir():
                raise HeadspaceError(f"{name} is a directory")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise HeadspaceError(f"cannot read {name}: {error}") from None
        if not text.strip():
            raise HeadspaceError(f"{name} is empty")
        return text, False
    if args.prompt is not None:
        if not args.prompt.strip():
            raise HeadspaceError("the prompt is empty (--prompt)")
        return args.prompt, False
    return passkey_prompt(), True


class PrefillProgress:
    """A tqdm bar over prefilled tokens, fed by the engine's ``on_chunk(done, total)``.

    Started on entering, so its clock includes the first chunk; the total is set by the first call.
    """

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __enter__(self) -> PrefillProgress:
        self.bar = tqdm(total=None, desc="prefill", unit="tok", file=sys.stderr, dynamic_ncols=True)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None or self.bar.disable:
            return
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.close()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.bar is not None:
            self.bar.leave = False  # an error follows: do not leave a half-drawn bar above it
        self.close()


class TokenStream:
    """Writes the engine's text pieces to stdout as tokens arrive, for ``on_token``."""

    def __call__(self, token: int, piece: str) -> None:
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def stats_dict(stats: Stats) -> dict:
    return {**asdict(stats), "prefill_tokens_per_s": stats.prefill_tokens_per_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s}


def run_generate(args: argparse.Namespace) -> int:
    # everything that can be checked without weights is checked first
    prompt, builtin = read_prompt(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model.startswith("random:"):
        raise HeadspaceError(f"'{args.model}' has random weights and no tokenizer, so it cannot generate text; "
                             f"use it with 'headspace info'")
    config = load_config(args.model)
    check_heads(config, args.gpu_heads, args.group_heads)
    json_path = Path(args.json).expanduser() if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise HeadspaceError(f"cannot write --json {args.json}: directory '{json_path.parent}' does not exist")
    if builtin:
        _note("no prompt given: using the built-in example, the pass key 68142 hidden in ~4K tokens of filler")

    model, tokenizer = load_model(args.model, device, dtype)
    names = ("budget", "compression", "stabilizer", "sink", "heads", "cpu_heads")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    engine = Engine(model, tokenizer, mode=args.mode, gpu_heads=args.gpu_heads, group_heads=args.group_heads,
                    chunk_size=args.chunk_size, allow_beyond_positions=args.allow_beyond_positions, **options)
    stream = TokenStream()
    with PrefillProgress() as progress:
        result = engine.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, seed=args.seed, chat=args.chat,
                                 on_token=stream, on_chunk=progress)
    stream.finish()
    print(result.stats.summary(), file=sys.stderr, flush=True)
    if json_path is not None:
        record = {"model": args.model, "mode": args.mode, "text": result.text, "token_ids": result.token_ids,
                  "stats": stats_dict(result.stats)}
        try:
            json_path.write_text(json.dumps(record, indent=2) + "\n")
        except OSError as error:
            raise HeadspaceError(f"cannot write --json {args.json}: {error}") from None
    return 0


# -- info -----------------------------------------------------------------------------------------

def add_info_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info", help="memory a context needs, per mode, without loading weights",
        description="Print KV bytes per token, the device and host KV memory a context needs in each mode, and "
                    "the weights' size; exit 2 if host RAM cannot hold the offloaded KV.")
    add_model_options(parser)
    parser.add_argument("--context", type=context_size, required=True, metavar="N",
                        help="context length in tokens: 4096, 32k, 1m (k = 1024, m = 1024^2)")
    add_placement_options(parser)
    return parser


def human(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1 (``128.00 KiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _cell(n: int) -> str:
    return f"{human(n)} ({n:,} bytes)"


def run_info(args: argparse.Namespace) -> int:
    dtype = resolve_dtype(args.dtype, resolve_device(args.device, must_exist=False))
    config = load_config(args.model)
    check_heads(config, args.gpu_heads, args.group_heads)
    tokens = args.context
    text = config.get_text_config(decoder=True)
    heads, dim = kv_heads_and_dim(config)
    windows = layer_windows(config)
    full_layers = sum(w is None for w in windows)
    limit = max_positions(config)
    params = weight_count(config)
    plans = {mode: plan(config, tokens, dtype, mode, args.gpu_heads, args.group_heads) for mode in ("full", "offload")}
    dtype_name = str(dtype).removeprefix("torch.")

    print(f"model         {args.model}: {text.model_type}, {len(windows)} layers ({full_layers} full attention), "
          f"{heads} KV heads x {dim} dims, {f'{limit:,}' if limit else 'unlimited'} positions")
    print(f"dtype         {dtype_name}")
    print(f"weights       {human(params * dtype.itemsize)} ({params * dtype.itemsize:,} bytes, {params:,} parameters)")
    print(f"KV per token  {_cell(plans['full'].kv_bytes_per_token)}")
    print(f"context       {tokens:,} tokens")
    print(f"{'mode':<13} {'device KV':<36} host KV")
    for mode, needs in plans.items():
        group = "auto" if args.group_heads is None else args.group_heads
        placement = f"gpu_heads={args.gpu_heads}, group_heads={group}" if mode == "offload" else ""
        print(f"{mode:<13} {_cell(needs.device_kv_bytes):<36} {_cell(needs.host_kv_bytes):<36} {placement}".rstrip())
    print(f"host RAM      {human(psutil.virtual_memory().available)} available")
    sys.stdout.flush()

    check_positions(config, tokens, args.allow_beyond_positions)
    check_host_ram(plans["offload"].host_kv_bytes)
    return 0


# -- train-retaining ------------------------------------------------------------------------------

def add_train_retaining_parser(subparsers) -> argparse.ArgumentParser:
    from headspace.retaining import TrainConfig

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
    parser.add_argument("--seq-len", type=_int_at_least(16), default=defaults.seq_len, metavar="N",
                        help=f"tokens per training sequence (default {defaults.seq_len})")
    parser.add_argument("--lr", type=_float_in(0.0, 1.0, low_open=True), default=defaults.lr, metavar="LR",
                        help=f"peak Adam learning rate, cosine decay (default {defaults.lr})")
    parser.add_argument("--hidden", type=positive_int, default=defaults.hidden, metavar="N",
                        help=f"MLP width per layer (default {defaults.hidden})")
    parser.add_argument("--updates", type=positive_int, default=defaults.updates, metavar="N",
                        help=f"Adam updates per sequence (default {defaults.updates})")
    parser.add_argument("--synthetic", type=_float_in(0.0, 1.0), default=defaults.synthetic, metavar="P",
                        help=f"share of synthetic retrieval sequences (default {defaults.synthetic})")
    parser.add_argument("--seed", type=int, default=defaults.seed, metavar="S", help="data and init seed")
    return parser


def run_train_retaining(args: argparse.Namespace) -> int:
    from headspace.retaining import TrainConfig, train_command, train_for_model

    device = resolve_device(args.device)
    if args.dtype not in (None, "float32"):
        raise HeadspaceError("retaining heads are trained against the float32 model: drop --dtype")
    config = TrainConfig(steps=args.steps, seq_len=args.seq_len, lr=args.lr, hidden=args.hidden,
                         updates=args.updates, synthetic=args.synthetic, seed=args.seed)
    path = train_for_model(args.model, args.out, config, device=str(device), command=train_command())
    _note(f"wrote retaining heads to {path} ({human(path.stat().st_size)})")
    return 0


# -- eval -----------------------------------------------------------------------------------------

def _csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise argparse.ArgumentTypeError(f"'{text}': {error}") from None
    return parse


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    from headspace.evaluation import TASKS

    parser = subparsers.add_parser(
        "eval", help="RULER-style synthetic long-context tasks, modes side by side",
        description="Generate RULER-style tasks (needles at several depths, multi-key, multi-value, variable "
                    "tracking, common words) and score every mode on the same prompts with greedy decoding. "
                    "Budgeted modes run once per --compressions ratio (and --budgets size).")
    add_model_options(parser)
    parser.add_argument("--modes", type=_csv(str), default="full,offload,locret,streamingllm,snapkv,random",
                        metavar="LIST", help="comma-separated modes (default full,offload,locret,streamingllm,"
                                             "snapkv,random)")
    parser.add_argument("--compressions", type=_csv(float), default="4,8", metavar="LIST",
                        help="compression ratios for budgeted modes (default 4,8)")
    parser.add_argument("--budgets", type=_csv(int), default="", metavar="LIST",
                        help="fixed budgets (tokens per KV head) for budgeted modes, in addition")
    parser.add_argument("--tasks", type=_csv(str), default=",".join(TASKS), metavar="LIST",
                        help=f"default: all ({', '.join(TASKS)})")
    parser.add_argument("--lengths", type=_csv(context_size), default="4096", metavar="LIST",
                        help="prompt lengths in tokens (default 4096)")
    parser.add_argument("--depths", type=_csv(float), default="0.1,0.5,0.9", metavar="LIST",
                        help="needle depths for niah_single, 0 = start (default 0.1,0.5,0.9)")
    parser.add_argument("--samples", type=positive_int, default=1, metavar="N", help="per cell (default 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--chunk-size", type=positive_int, metavar="N",
                        help="prefill chunk in tokens (default 4096 on cuda, 1024 on cpu)")
    parser.add_argument("--stabilizer", type=non_negative_int, metavar="N", help="budgeted modes (default 64)")
    parser.add_argument("--sink", type=non_negative_int, metavar="N", help="budgeted modes (default 4)")
    parser.add_argument("--heads", metavar="PATH", help="retaining heads for locret (default: the shipped file)")
    parser.add_argument("--out", default="eval.json", metavar="PATH",
                        help="results JSON, rewritten after every run; an existing file is resumed")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out exists")
    parser.add_argument("--heatmap", metavar="PNG", help="also draw niah_single depth x length per mode")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")
    parser.add_argument("--verbose", action="store_true", help="print every generation")
    return parser


def run_eval(args: argparse.Namespace) -> int:
    from headspace.evaluation import TASKS, EvalConfig, evaluate, heatmap, mode_specs, table

    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        raise HeadspaceError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if any(not 0 <= d <= 1 for d in args.depths):
        raise HeadspaceError("depths must be between 0 and 1")
    specs = mode_specs(args.modes, args.compressions, args.budgets, stabilizer=args.stabilizer, sink=args.sink,
                       heads=args.heads)
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    chunk = args.chunk_size or (4096 if device.type == "cuda" else 1024)
    config = EvalConfig(tuple(args.tasks), tuple(args.lengths), tuple(args.depths), args.samples, args.seed, chunk)
    results = evaluate(model, tokenizer, specs, config, out=args.out, resume=not args.no_resume,
                       log=_note if args.verbose else None)
    text = table(results["table"])
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.heatmap and "niah_single" in args.tasks:
        heatmap(results["records"], args.heatmap, [s.label for s in specs])
        _note(f"wrote {args.heatmap}")
    _note(f"wrote {args.out}")
    return 0


# -- entry point ----------------------------------------------------------------------------------

Command = tuple[Callable[..., argparse.ArgumentParser], Callable[[argparse.Namespace], int]]

# (add_<name>_parser, run_<name>) for every subcommand, in the order --help lists them
def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="peak GPU memory and prefill/decode tokens/s per mode and context, as a table, JSON and plot",
        description=bench.__doc__)
    bench.add_arguments(parser)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    return bench.run_from_args(args)


COMMANDS: list[Command] = [
    (add_generate_parser, run_generate),
    (add_info_parser, run_info),
    (add_train_retaining_parser, run_train_retaining),
    (add_eval_parser, run_eval),
    (add_bench_parser, run_bench),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="headspace", description="Long-context LLM inference with head-wise KV offloading.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser, handler in COMMANDS:
        add_parser(subparsers).set_defaults(handler=handler)
    return parser


def report(error: BaseException) -> int:
    """The one place errors become output: one line on stderr, exit code 2."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"headspace: error: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args) or 0
    except HeadspaceError as error:
        return report(error)
    except torch.OutOfMemoryError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return report(HeadspaceError(f"out of device memory ({first}); try --mode offload, fewer --gpu-heads, "
                                     f"a smaller --chunk-size or a shorter context"))
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print("\nheadspace: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
