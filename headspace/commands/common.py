"""What every subcommand shares: the parser class, argument types, model and mode options, prompts, progress.

Handlers raise :class:`~headspace.errors.HeadspaceError` for anything the user can
fix; :func:`headspace.commands.main` turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig

from headspace.documents.document import Document
from headspace.documents.files import DocumentFile
from headspace.engine.engine import Engine
from headspace.engine.graphs import SETTINGS
from headspace.engine.modes import MODES, budgeted_modes
from headspace.errors import HeadspaceError, argument_type
from headspace.kv.cache import OffloadOptions, parse_gpu_heads
from headspace.kv.quant.precision import KVPrecision, choices
from headspace.models import GEMMA3, PRESETS, SMOLLM2, default_device, default_dtype, load_config, load_model
from headspace.prompts import passkey_prompt
from headspace.shape import ModelShape
from headspace.units import human_bytes, parse_bytes, parse_memory_cap, parse_tokens

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become HeadspaceError, so main reports them like any other."""

    def error(self, message: str):
        raise HeadspaceError(f"{message} (see '{self.prog} --help')")


# -- argument types -------------------------------------------------------------------------------

def context_size(text: str) -> int:
    """A token count: ``4096``, ``32k`` (32,768), ``1m`` (1,048,576); k and m are powers of two."""
    try:
        return parse_tokens(text)
    except HeadspaceError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def byte_size(text: str) -> int:
    """A byte amount: ``512MiB``, ``20GiB``, ``1.5TiB`` (binary units)."""
    try:
        return parse_bytes(text)
    except HeadspaceError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def float_in(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not (low < value if low_open else low <= value) or value > high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def count_or_auto(text: str) -> int | str:
    """``auto`` or a count (``--cpu-heads``)."""
    return "auto" if text == "auto" else non_negative_int(text)


def csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    """A comma-separated list of ``kind``."""
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise argparse.ArgumentTypeError(f"'{text}': {error}") from None
    return parse


# -- model, device, dtype -------------------------------------------------------------------------

def add_model_options(parser: argparse.ArgumentParser, default: str | None = SMOLLM2) -> None:
    """``--model``, ``--device``, ``--dtype``; ``default=None`` where a ``--load`` file names the model."""
    parser.add_argument("--model", default=default, metavar="M",
                        help=f"a Hugging Face directory, a .gguf file, '{SMOLLM2}', '{GEMMA3}' or 'random:<preset>' "
                             f"with preset in {', '.join(PRESETS)} (default: "
                             f"{default or f'the one a --load file was saved from, else {SMOLLM2}'})")
    parser.add_argument("--device", metavar="D", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="weights and KV dtype (default: bfloat16 on cuda, float32 on cpu)")


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


def weight_count(config: PretrainedConfig) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# -- modes and their options ----------------------------------------------------------------------

# CLI flag -> engine option; a flag left out is not passed, so each mode's own default applies
MODE_FLAGS = ("gpu_heads", "group_heads", "cpu_heads", "gpu_memory", "kv_dtype", "budget", "compression", "stabilizer",
              "sink", "once", "merge", "prefill", "release", "heads")


def kv_dtype(text: str) -> str:
    """``--kv-dtype``: a KV precision for both tiers or per tier, in its canonical spelling."""
    return str(KVPrecision.parse(text))


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-heads", type=argument_type(parse_gpu_heads), metavar="auto|N|N,N,...",
                        help="offload mode: KV heads kept on the device: 'auto' (default) keeps as many as fit after "
                             "the weights and the working set, the rest in host RAM; N keeps N of every "
                             "full-attention layer (0: the least GPU memory); or one count per full-attention layer")
    parser.add_argument("--gpu-memory", type=argument_type(parse_memory_cap), metavar="BYTES|FRACTION",
                        help="offload mode: the most device memory the run may hold, weights included: bytes (20GiB) "
                             "or a fraction of the device (0.5); default: all that is free")
    parser.add_argument("--group-heads", type=positive_int, metavar="N",
                        help="offload modes: offloaded KV heads streamed in per step (default: automatic)")
    parser.add_argument("--cpu-heads", type=count_or_auto, metavar="N|auto",
                        help="offload mode: offloaded KV heads per layer whose decode attention runs on the host CPU "
                             "beside the streamed ones; 'auto' splits by positions (the first share of every "
                             "offloaded head on the host) and times the first decode steps to find the fastest share")
    parser.add_argument("--kv-dtype", type=argument_type(kv_dtype), metavar="P|host=P|gpu=P,host=P",
                        help=f"offload and eviction modes: the precision KV is stored in, for both tiers (int4) or "
                             f"per tier (host=int4: offloaded heads only; gpu=fp8,host=int4), P one of {choices()}; "
                             f"default bf16, exact. fp8 and int8 keep one scale per token and head; int4 and int2 are "
                             f"KIVI's grouped scheme with the newest tokens in full precision. Eviction modes keep "
                             f"their budget on the GPU in fp8 or int8 (int4 and int2 are refused there: eviction drops "
                             f"single tokens); offload+locret takes host=P for the tokens it evicts to host RAM "
                             f"(gpu=fp8,host=int4 for both)")
    parser.add_argument("--allow-beyond-positions", action="store_true",
                        help="run past the model's max_position_embeddings instead of refusing")


def add_chunk_option(parser: argparse.ArgumentParser, what: str = "") -> None:
    """``--chunk-size``, the prefill chunk; ``what`` says what else it sets, where it sets more."""
    parser.add_argument("--chunk-size", type=positive_int, metavar="N",
                        help=f"prefill chunk in tokens{what} (default 4096 on cuda, 1024 on cpu)")


def add_graph_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuda-graphs", choices=list(SETTINGS), default="auto",
                        help="replay decode steps from a CUDA graph: 'auto' (default) when every KV head is on the "
                             "GPU at the model's precision, 'on' to insist (refused for a plan that offloads or "
                             "quantizes heads), 'off' to decode eagerly")
    parser.add_argument("--compile-layers", choices=list(SETTINGS), default="auto", nargs="?", const="on",
                        help="run the decoder layers through torch.compile in graph decode steps (fewer kernels "
                             "per token; compiles on the first step, seconds with torch's cache warm): 'auto' "
                             "(default) for CUDA graph steps, falling back if compiling fails; 'on' (or the bare "
                             "flag) to insist, 'off' never")


def cuda_graphs(args: argparse.Namespace) -> bool | str:
    """The engine's ``cuda_graphs`` from ``--cuda-graphs`` (``"auto"`` where the command has no such flag)."""
    return SETTINGS[getattr(args, "cuda_graphs", "auto")]


def compile_layers(args: argparse.Namespace) -> bool | str:
    """The engine's ``compile_layers`` from ``--compile-layers`` (``"auto"`` where the command has no such flag)."""
    return SETTINGS[getattr(args, "compile_layers", "auto")]


def add_mode_options(parser: argparse.ArgumentParser, default: str | None = "offload") -> None:
    """``--mode`` and the options of every mode (placement and eviction); ``default=None`` where a ``--load`` file
    names the mode."""
    parser.add_argument("--mode", choices=list(MODES), default=default,
                        help=f"KV cache mode (default: {default or 'that of a --load file, else offload'})")
    add_placement_options(parser)
    eviction = parser.add_argument_group(f"eviction modes ({', '.join(budgeted_modes())})")
    eviction.add_argument("--budget", type=positive_int, metavar="N", help="tokens kept per KV head per layer")
    eviction.add_argument("--compression", type=float_in(1.0, float("inf")), metavar="X",
                          help="prompt tokens / budget, instead of --budget (default 4)")
    eviction.add_argument("--stabilizer", type=non_negative_int, metavar="N", help="newest tokens always kept (64)")
    eviction.add_argument("--sink", type=non_negative_int, metavar="N", help="first tokens always kept (4)")
    eviction.add_argument("--once", action="store_true", default=None,
                          help="prefill the whole prompt exactly, then compress it once (device memory: the prompt)")
    eviction.add_argument("--merge", type=non_negative_int, metavar="N",
                          help="merge evicted tokens into one summary per KV head and block of N positions, "
                               "attended with the weight of the tokens it stands for (0: drop them; locret's "
                               "default with its exact prefill: max(64, 8 x compression), otherwise 0)")
    eviction.add_argument("--prefill", choices=("chunked", "exact"),
                          help="chunked: each prompt chunk attends what the budget kept of the earlier ones (Locret's "
                               "recipe; the default of every policy but locret); exact: it attends the whole prompt, "
                               "the evicted tokens waiting in host RAM until the prompt's end (locret's default)")
    eviction.add_argument("--release", action="store_true", default=None,
                          help="offload+locret: free the host RAM once the prompt is prefilled (exact), so what "
                               "follows sees the device budget only (with --merge: --once without its device memory)")
    eviction.add_argument("--heads", metavar="FILE",
                          help="retaining heads file (default: the one shipped for the model)")


def mode_options(args: argparse.Namespace, config: PretrainedConfig) -> dict:
    """The mode options given on the command line, checked against the mode and the model before any
    weights load."""
    options = {name: getattr(args, name) for name in MODE_FLAGS if getattr(args, name, None) is not None}
    parsed = MODES[args.mode].parse(options)
    if isinstance(parsed, OffloadOptions):
        parsed.check(ModelShape.of(config))
    return options


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="default 64")
    parser.add_argument("--temperature", type=float_in(0.0, float("inf")), default=0.0, metavar="T",
                        help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=1.0, metavar="P")
    parser.add_argument("--top-k", type=non_negative_int, default=0, metavar="K", help="0 (default) keeps all")
    parser.add_argument("--seed", type=int, metavar="S", help="sampling seed")


def sampling(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``Engine.generate`` and ``Engine.ask`` that :func:`add_sampling_options` adds."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed)


def note(message: str) -> None:
    print(f"headspace: {message}", file=sys.stderr, flush=True)


# -- prompts and progress -------------------------------------------------------------------------

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


class Progress:
    """A tqdm bar on stderr fed by ``(done, total)`` callbacks: prefilled tokens (the engine's ``on_chunk``),
    or bytes saved or loaded (``unit="B"``).

    Started on entering, so its clock includes the first step; the total is set by the first call.
    """

    def __init__(self, desc: str = "prefill", unit: str = "tok") -> None:
        self.desc, self.unit = desc, unit
        self.bar: tqdm | None = None

    def __enter__(self) -> Progress:
        self.bar = tqdm(total=None, desc=self.desc, unit=self.unit, unit_scale=self.unit == "B",
                        unit_divisor=1024, file=sys.stderr, dynamic_ncols=True)
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


# -- kept documents -------------------------------------------------------------------------------

def moved(what: str, path: str | Path, nbytes: int, seconds: float) -> str:
    """One line saying how fast a document file was written or read."""
    return f"{what} {path}: {human_bytes(nbytes)} in {seconds:.2f} s ({nbytes / max(seconds, 1e-9) / 1e9:.2f} GB/s)"


def open_document(args: argparse.Namespace, path: str) -> tuple[Engine, Document]:
    """The engine a saved document needs, and the document loaded into it with a progress bar.

    The model, mode, dtype and mode options are the file's wherever the command line gives none;
    the file's header is checked before any weights load.
    """
    file = DocumentFile.open(path)
    manifest = file.manifest
    args.model = args.model or manifest.get("model_name")
    if not args.model:
        raise HeadspaceError(f"'{path}' does not say which model it was saved from: pass --model")
    args.mode = args.mode or manifest["mode"]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or manifest["dtype"], device)
    config = load_config(args.model)
    options = {**(manifest["options"] if args.mode == manifest["mode"] else {}), **mode_options(args, config)}
    model, tokenizer = load_model(args.model, device, dtype)
    engine = Engine(model, tokenizer, mode=args.mode, chunk_size=args.chunk_size,
                    allow_beyond_positions=args.allow_beyond_positions, cuda_graphs=cuda_graphs(args),
                    compile_layers=compile_layers(args), **options)
    start = time.perf_counter()
    with Progress("load", "B") as progress:
        document = engine.load(file.path, on_progress=progress)
    note(moved(f"loaded {document.length:,} tokens from", file.path, file.nbytes, time.perf_counter() - start))
    return engine, document
