"""Benchmarks: peak GPU memory, prefill and decode throughput per mode and context length.

Each (mode, context) cell runs a chunked prefill of random token ids and a few
decode steps on a random-weight preset. For contexts whose full prefill would
take too long to time, ``--synthetic-from`` fills the cache with random KV for
all but the last chunk (speed and memory do not depend on the values), then runs
the last chunk and the decode steps for real: peak memory is reached there.

Modes are engine modes; ``offload`` takes suffixes for its placement:
``offload/gpu0`` (every head offloaded, the least GPU memory), ``offload/gpuauto``
(the planner fills the GPU first), ``offload/gpu6`` (6 heads of every layer resident),
``offload/cpu3`` and ``offload/cpuauto`` (offloaded heads attended on the host CPU in
decode), ``offload/graphs`` and ``offload/eager`` (decode steps replayed from a CUDA graph or
not, over ``--cuda-graphs``), ``offload/compiled`` and ``offload/uncompiled`` (those steps' layers
compiled or not, over ``--compile-layers``), ``offload/kvint4``, ``offload/kvhost=int4`` and
``offload/kvgpu=fp8+host=int4`` (the KV precision per tier, ``+`` between tiers), combined as in
``offload/gpuauto/cpuauto`` or ``offload/gpuauto/kvhost=int4``. Bare ``offload`` takes
``--gpu-heads`` (default ``auto``) and ``--kv-dtype`` (default ``bf16``; the label then carries
it). A context of ``max`` is the largest this machine
holds in the cell's mode (``full`` or ``offload``), planned after the weights load, in
whole chunks and one chunk short of the limit.

Every cell stores its decode bound: the rate at which a decode step would go if
every byte it reads moved at this machine's measured rate (:func:`decode_bound`),
and the share of it reached.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from headspace.engine.engine import Engine
from headspace.engine.graphs import SETTINGS
from headspace.engine.stats import placement_of
from headspace.errors import HeadspaceError, argument_type
from headspace.kv.cache import HeadspaceCache, OffloadOptions, kv_bytes, parse_gpu_heads
from headspace.kv.layers import OffloadLayer
from headspace.kv.quant.precision import EXACT_KV, KVPrecision
from headspace.kv.split import copy_rate, host_attention_rate
from headspace.kv.tiers import host_empty
from headspace.models import default_device, default_dtype, random_model, weight_bytes
from headspace.placement import largest_context, probe
from headspace.shape import ModelShape
from headspace.units import parse_memory_cap, parse_tokens

GIB = 2**30
SEARCH_STEPS = 32  # most untimed decode steps for the "auto" host/PCIe split search


@dataclass
class Cell:
    """One measured (mode, context) pair; ``error`` is set instead of numbers when it could not run."""

    mode: str
    context: int
    chunk_size: int
    synthetic_prefix: int = 0
    setup_seconds: float | None = None  # building the cache: allocating (and pinning) its memory
    prefill_seconds: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_steps: int = 0
    decode_tokens_per_s: float | None = None
    peak_gpu_bytes: int | None = None
    weight_bytes: int | None = None
    device_kv_bytes: int | None = None
    host_kv_bytes: int | None = None
    decode_bound_tokens_per_s: float | None = None  # see decode_bound
    bound_share: float | None = None  # decode_tokens_per_s / decode_bound_tokens_per_s
    gpu_heads: list[int] | None = None  # resident KV heads per full-attention layer (offload)
    total_heads: int | None = None  # KV heads of all full-attention layers
    host_heads: list[int] | None = None  # per full-attention layer, offloaded heads attended on the host in decode
    host_share: float = 0.0  # of the positions of every streamed head, attended on the host in decode
    group_heads: int | None = None  # offloaded heads streamed per step
    placement: str | None = None  # the cache's own one-line account of the above
    cpu_heads: int | str = 0  # host heads in the layer offloading the most; for "auto", the split found
    kv_dtype: str = "bf16"  # the KV precision per tier (offload)
    search_steps: int = 0  # decode steps the "auto" split search took before the timed ones
    cuda_graph: bool = False  # decode steps were replayed from a CUDA graph (--cuda-graphs)
    error: str | None = None


def fill_prefix(cache, shape: ModelShape, tokens: int, device: torch.device, dtype: torch.dtype,
                piece: int = 16384) -> None:
    """Store ``tokens`` positions of random KV in every layer of ``cache`` without running the model."""
    heads, dim = shape.kv_heads, shape.head_dim
    generator = torch.Generator(device=device).manual_seed(0)
    for layer in cache.layers:
        for start in range(0, tokens, piece):
            n = min(piece, tokens - start)
            keys = torch.randn(1, heads, n, dim, device=device, dtype=dtype, generator=generator)
            layer.update(keys, torch.randn_like(keys))
            if isinstance(layer, OffloadLayer):
                layer.flush()  # stored as if attended: quantized tiers take their rows


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def decode_bound(resident_bytes: int, offloaded_bytes: int, ceilings: dict[str, float],
                 host_attention: bool) -> float | None:
    """Decode tokens/s if a step took no longer than moving what it reads at this machine's measured rates:
    ``resident_bytes`` (the weights and the resident KV) at the HBM rate while ``offloaded_bytes`` cross PCIe,
    or, with ``host_attention``, are shared between PCIe and the host CPU in proportion to their rates (the
    best split). The two overlap (the GPU attends resident heads and runs the weights while the next group
    streams in), so a step takes at least the longer of them; measured on the H100 at 512K, the sum of the
    two was beaten by 20%. None where a rate was not measured (no GPU)."""
    hbm, pcie = ceilings.get("hbm_bytes_per_s"), ceilings.get("h2d_bytes_per_s")
    if hbm is None or pcie is None:
        return None
    offload_rate = pcie + (ceilings["host_attention_bytes_per_s"] if host_attention else 0.0)
    return 1.0 / max(resident_bytes / hbm, offloaded_bytes / offload_rate)


def read_per_step(cache, shape: ModelShape, dtype: torch.dtype,
                  precision: KVPrecision = EXACT_KV) -> tuple[int, int]:
    """KV bytes a decode step moves: (in device memory, across PCIe from host RAM). Decode attends a quantized
    tier's rows as they are (resident, or staged after crossing PCIe): its small bytes are what it reads."""
    if not isinstance(cache, HeadspaceCache):
        return kv_bytes(cache)[0], 0
    row = shape.row_bytes(dtype.itemsize)
    gpu, host = (precision.scheme(tier) for tier in ("gpu", "host"))
    resident_row = gpu.bytes_per_token(shape.head_dim, dtype.itemsize)
    host_row = host.bytes_per_token(shape.head_dim, dtype.itemsize)
    resident = offloaded = 0
    for layer in cache.layers:
        if isinstance(layer, OffloadLayer):
            resident += resident_row * layer.gpu_heads * layer.length
            offloaded += host_row * layer.offloaded * layer.length
            resident += 0 if host.exact else host_row * layer.offloaded * layer.length  # staged rows, read
        else:  # a sliding window
            resident += row * shape.kv_heads * min(layer.length, layer.window)
    return resident, offloaded


def measure(engine: Engine, label: str, context: int, decode_steps: int, synthetic: bool,
            ceilings: dict[str, float]) -> Cell:
    """Prefill ``context`` tokens (the last chunk only, after a random prefix, when ``synthetic``) and decode;
    the decode bound is taken at the rates in ``ceilings``."""
    device, chunk = engine.device, engine.chunk_size
    offload = isinstance(engine.options, OffloadOptions)
    cpu_heads = engine.options.cpu_heads if offload else 0
    precision = engine.options.precision if offload else EXACT_KV
    cell = Cell(label, context, chunk, cpu_heads=cpu_heads, kv_dtype=str(precision))
    cell.weight_bytes = weight_bytes(engine.model)
    vocab = engine.shape.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    prefix = (context - 1) // chunk * chunk if synthetic else 0
    cell.synthetic_prefix = prefix
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = _sync(device)
    cache = engine.new_cache(context + decode_extra(decode_steps))
    cell.setup_seconds = _sync(device) - start
    if prefix:
        fill_prefix(cache, engine.shape, prefix, device, engine.dtype)
    start = _sync(device)
    logits, cache = engine.prefill(ids[:, prefix:], cache=cache)
    cell.prefill_seconds = _sync(device) - start
    cell.prefill_tokens_per_s = (context - prefix) / cell.prefill_seconds
    token = logits.argmax(-1, keepdim=True)
    engine.decode_step(token, cache)  # first decode step: warm-up, not timed
    split = getattr(cache, "split", None)
    while split is not None and not split.done and cell.search_steps < SEARCH_STEPS:  # cpu_heads "auto": untimed
        engine.decode_step(token, cache)
        cell.search_steps += 1
    start = _sync(device)
    for _ in range(decode_steps):
        engine.decode_step(token, cache)
    cell.decode_steps = decode_steps
    cell.cuda_graph = engine.graph_decodes(cache) and device.type == "cuda"
    cell.decode_tokens_per_s = decode_steps / (_sync(device) - start) if decode_steps else None
    if device.type == "cuda":
        cell.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    cell.device_kv_bytes, cell.host_kv_bytes = kv_bytes(cache)
    layers = [layer for layer in getattr(cache, "layers", []) if isinstance(layer, OffloadLayer)]
    if offload and layers:
        cell.gpu_heads = [layer.gpu_heads for layer in layers]
        cell.total_heads = sum(layer.heads for layer in layers)
        cell.host_heads = [layer.cpu_heads for layer in layers]
        cell.cpu_heads = max(cell.host_heads)  # for "auto", the split found
        cell.host_share = max(layer.host_share for layer in layers)
        cell.group_heads = max(min(layer.group_heads, layer.offloaded) for layer in layers)
        cell.placement = placement_of(cache)
    if engine.mode.name in ("full", "offload"):  # where every byte a step reads is known
        resident, offloaded = read_per_step(cache, engine.shape, engine.dtype, precision)
        cell.decode_bound_tokens_per_s = decode_bound(cell.weight_bytes + resident, offloaded, ceilings,
                                                      host_attention=bool(cell.cpu_heads or cell.host_share))
    if cell.decode_bound_tokens_per_s and cell.decode_tokens_per_s:
        cell.bound_share = cell.decode_tokens_per_s / cell.decode_bound_tokens_per_s
    del cache, logits
    return cell


def decode_extra(decode_steps: int) -> int:
    """Positions a cell reserves beyond its context: the timed decode steps, the most the split search takes,
    and the warm-up step."""
    return decode_steps + SEARCH_STEPS + 1


def warm_up(engine: Engine) -> None:
    """Prefill two chunks and decode a step, so that one-time costs (CUDA context, kernel loading,
    cuBLAS handles) are not charged to the first measured cell. Kernel choices that depend on the
    context length (cuDNN builds a plan for each new key length) stay in the measurement."""
    vocab = engine.shape.vocab_size
    ids = torch.randint(0, vocab, (1, 2 * engine.chunk_size), generator=torch.Generator().manual_seed(1))
    logits, cache = engine.prefill(ids.to(engine.device))
    engine.decode_step(logits.argmax(-1, keepdim=True), cache)
    del cache


def measure_ceilings(device: torch.device, gib: int = 1) -> dict[str, float]:
    """This machine's limits, measured in the same run as the cells: the device memory's rate (a
    device-to-device copy, counting the bytes read and the bytes written), pinned host-to-device and
    device-to-host copy rates, and the rate at which the host CPU attends KV while copies stream (what the
    host side of decode can add). The decode bound (:func:`decode_bound`) takes the first, second and last."""
    ceilings, copying = {}, None
    if device.type == "cuda":
        host = host_empty((gib * GIB // 2,), torch.bfloat16, pin=True)
        dev, other = torch.empty_like(host, device=device), torch.empty_like(host, device=device)
        copies = (("hbm_bytes_per_s", other, dev, 2), ("h2d_bytes_per_s", dev, host, 1),
                  ("d2h_bytes_per_s", host, dev, 1))
        for name, dst, src, moved in copies:
            ceilings[name] = moved * copy_rate(dst, src, device)
        copying = (dev, host)  # the host side is measured while these copies stream, as in decode
    ceilings["host_attention_bytes_per_s"] = host_attention_rate(copying)
    return ceilings


GRAPH_SUFFIXES = {"graphs": True, "eager": False}  # a cell's own cuda_graphs, over --cuda-graphs
COMPILE_SUFFIXES = {"compiled": True, "uncompiled": False}  # a cell's own compile_layers, over --compile-layers


def mode_options(mode: str, gpu_heads: int | str | tuple[int, ...], group_heads: int | None,
                 gpu_memory: int | float | None, kv_dtype: str = "bf16") -> tuple[str, dict]:
    """The engine mode and options of a bench mode: ``offload`` with ``/gpu<N|auto>``, ``/cpu<N|auto>``,
    ``/graphs`` or ``/eager`` (decode from a CUDA graph or not, whatever ``--cuda-graphs`` says), ``/compiled`` or
    ``/uncompiled`` (graph steps with the decoder layers compiled or not, whatever ``--compile-layers`` says) and
    ``/kv<precision>`` suffixes (bare: ``gpu_heads``, ``kv_dtype``), any other mode as it is."""
    name, *suffixes = mode.split("/")
    if name != "offload":
        if suffixes:
            raise HeadspaceError(f"bench mode '{mode}': only offload takes /gpu, /cpu and /kv suffixes")
        return name, {}
    options = dict(gpu_heads=gpu_heads, group_heads=group_heads, cpu_heads=0, gpu_memory=gpu_memory,
                   kv_dtype=kv_dtype)
    for suffix in suffixes:
        kind, value = suffix[:3], suffix[3:]
        if kind == "gpu" and value:
            options["gpu_heads"] = parse_gpu_heads(value)
        elif kind == "cpu" and (value == "auto" or value.isdigit()):
            options["cpu_heads"] = value if value == "auto" else int(value)
        elif suffix in GRAPH_SUFFIXES:
            options["cuda_graphs"] = GRAPH_SUFFIXES[suffix]
        elif suffix in COMPILE_SUFFIXES:
            options["compile_layers"] = COMPILE_SUFFIXES[suffix]
        elif suffix.startswith("kv") and suffix[2:]:
            options["kv_dtype"] = str(KVPrecision.parse(suffix[2:].replace("+", ",")))
        else:
            raise HeadspaceError(f"bench mode '{mode}': '{suffix}' is neither /gpu<N|auto>, /cpu<N|auto>, /graphs, "
                                 f"/eager, /compiled, /uncompiled nor /kv<precision> (example: "
                                 f"offload/gpuauto/cpuauto, offload/kvhost=int4)")
    return name, options


def label(mode: str, kv_dtype: str) -> str:
    """A bench mode's label: as written, with a ``--kv-dtype`` other than bf16 added where no /kv suffix says."""
    if mode.split("/")[0] != "offload" or kv_dtype == "bf16" or "/kv" in mode:
        return mode
    return f"{mode}/kv{kv_dtype.replace(',', '+')}"


def largest(engine: Engine, decode_steps: int) -> int:
    """The largest context this machine holds in ``engine``'s mode with what a cell reserves beyond it, in whole
    chunks and one chunk short of the limit: host RAM may move a little between planning and allocating."""
    if engine.mode.name not in ("full", "offload"):
        raise HeadspaceError(f"context 'max' is planned for the modes full and offload, not '{engine.mode.name}'")
    offload = engine.options if engine.mode.name == "offload" else None
    machine = probe(engine.device, weight_bytes(engine.model), offload.memory_cap if offload else None)
    most = largest_context(engine.shape, engine.dtype, engine.chunk_size, machine, offload) or 0
    chunks = (most - decode_extra(decode_steps)) // engine.chunk_size - 1
    if chunks < 1:
        raise HeadspaceError(f"this machine holds no context of two chunks for mode {engine.mode.name}")
    return chunks * engine.chunk_size


def run(preset: str, contexts: list[int | str], modes: dict[str, tuple[str, dict]], chunk_size: int,
        decode_steps: int, synthetic_from: int | None, device: torch.device, ceilings: dict[str, float],
        cuda_graphs: bool | str = "auto", compile_layers: bool | str = "auto") -> list[Cell]:
    """Measure every (mode, context) cell; ``modes`` maps each bench mode to its engine mode and options
    (:func:`mode_options`); ``cuda_graphs`` and ``compile_layers`` are the engines' (``"auto"``: where every
    head is resident)."""
    model = random_model(preset, device, default_dtype(device))
    cells, warm = [], set()
    for context in contexts:
        for mode, (name, options) in modes.items():
            graphs = cuda_graphs if cuda_graphs is not True or name == "offload" else "auto"  # full has none
            engine = Engine(model, None, mode=name, chunk_size=chunk_size, allow_beyond_positions=True,
                            **{"cuda_graphs": graphs, "compile_layers": compile_layers, **options})
            tokens = context if isinstance(context, int) else 0
            try:
                if mode not in warm:
                    warm_up(engine)
                    warm.add(mode)
                tokens = tokens or largest(engine, decode_steps)
                synthetic = synthetic_from is not None and tokens >= synthetic_from
                cell = measure(engine, mode, tokens, decode_steps, synthetic, ceilings)
            except (torch.OutOfMemoryError, RuntimeError, HeadspaceError) as error:
                first = (str(error).splitlines() or [repr(error)])[0]
                if isinstance(error, torch.OutOfMemoryError):
                    first = f"out of device memory ({first}); leave room with --gpu-memory"
                cell = Cell(mode, tokens, chunk_size, error=first)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(row(cell), flush=True)
            cells.append(cell)
    return cells


HEADER = (f"{'mode':<30}{'context':>9}{'setup s':>9}{'prefill tok/s':>15}{'decode tok/s':>14}{'bound':>9}"
          f"{'of bound':>10}{'peak GPU GiB':>14}{'KV dev GiB':>12}{'KV host GiB':>13}{'GPU heads':>11}  note")


def split_found(cell: Cell) -> str:
    """What the host attends in decode: a share of the positions, or whole heads."""
    if cell.host_share:
        return f"the first {cell.host_share:.0%} of positions on the host"
    return f"{cell.cpu_heads} host heads"


def row(cell: Cell) -> str:
    def num(value, fmt):
        return format(value, fmt) if value is not None else "-"

    heads = f"{sum(cell.gpu_heads)}/{cell.total_heads}" if cell.gpu_heads is not None else None
    notes = [f"synthetic prefix {cell.synthetic_prefix}" if cell.synthetic_prefix else "",
             f"split found: {split_found(cell)} in {cell.search_steps} steps" if cell.search_steps else ""]
    note = cell.error or ", ".join(n for n in notes if n)
    return (f"{cell.mode:<30}{cell.context:>9}{num(cell.setup_seconds, '.2f'):>9}"
            f"{num(cell.prefill_tokens_per_s, ',.0f'):>15}"
            f"{num(cell.decode_tokens_per_s, '.2f'):>14}{num(cell.decode_bound_tokens_per_s, '.2f'):>9}"
            f"{num(cell.bound_share, '.0%'):>10}"
            f"{num(cell.peak_gpu_bytes and cell.peak_gpu_bytes / GIB, '.2f'):>14}"
            f"{num(cell.device_kv_bytes is not None and cell.device_kv_bytes / GIB or None, '.2f'):>12}"
            f"{num(cell.host_kv_bytes is not None and cell.host_kv_bytes / GIB or None, '.2f'):>13}"
            f"{num(heads, 's'):>11}  {note}")


def plot(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    metrics = [("peak_gpu_bytes", "peak GPU memory (GiB)", 1 / GIB), ("prefill_tokens_per_s", "prefill tokens/s", 1),
               ("decode_tokens_per_s", "decode tokens/s", 1)]
    for axis, (field, label, scale) in zip(axes, metrics):
        for mode in dict.fromkeys(c.mode for c in cells):
            points = [(c.context, getattr(c, field) * scale) for c in cells if c.mode == mode and getattr(c, field)]
            if points:
                axis.plot(*zip(*points), marker="o", label=mode)
        axis.set_xscale("log", base=2)
        if field != "peak_gpu_bytes":
            axis.set_yscale("log")  # rates span two orders of magnitude across contexts
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if axis.lines:  # on CPU there is no GPU memory to draw
            axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headspace bench", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="llama-3-8b")
    parser.add_argument("--contexts", default="32k,128k",
                        help="token counts (32k, 1m, 1310720); 'max': the largest this machine holds in each mode")
    parser.add_argument("--modes", default="full,hf-offload,offload",
                        help="engine modes; offload takes /gpu<N|auto>, /cpu<N|auto> and /graphs or /eager suffixes "
                             "(offload/gpu0, offload/gpuauto/cpuauto, offload/gpuauto/eager)")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--gpu-heads", type=argument_type(parse_gpu_heads), default="auto",
                        help="resident KV heads of bare 'offload': auto (default), N, or one count per layer")
    parser.add_argument("--gpu-memory", type=argument_type(parse_memory_cap), default=None,
                        help="cap on the device memory of offload cells, weights included: 20GiB or 0.5")
    parser.add_argument("--group-heads", type=int, default=None, help="default: automatic")
    parser.add_argument("--kv-dtype", type=argument_type(lambda text: str(KVPrecision.parse(text))), default="bf16",
                        help="KV precision of offload cells without a /kv suffix: int4, host=int4, gpu=fp8,host=int4")
    parser.add_argument("--synthetic-from", type=parse_tokens, default=None,
                        help="contexts at or above this use a random-KV prefix and time only the last chunk")
    parser.add_argument("--cuda-graphs", choices=list(SETTINGS), default="auto",
                        help="decode from a CUDA graph: auto (default: offload cells whose heads are all resident), "
                             "on (offload cells refuse a plan that offloads heads), off (eager, as before)")
    parser.add_argument("--compile-layers", choices=list(SETTINGS), default="auto", nargs="?", const="on",
                        help="graph decode steps run the decoder layers through torch.compile: auto (default: "
                             "on CUDA), on (or the bare flag), off")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, default=Path("bench.json"))
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: draw --plot from the cells of these results files")


def run_from_args(args: argparse.Namespace) -> int:
    if args.replot:
        if args.plot is None:
            raise HeadspaceError("--replot draws a plot: give --plot FILE.png")
        known = {field.name for field in fields(Cell)}  # files written before a field was renamed still draw
        cells = [Cell(**{k: v for k, v in cell.items() if k in known})
                 for path in args.replot for cell in json.loads(path.read_text())["cells"]]
        plot(cells, args.plot)
        return 0
    contexts = [c if c == "max" else parse_tokens(c) for c in args.contexts.split(",")]
    modes = {label(mode, args.kv_dtype): mode_options(mode, args.gpu_heads, args.group_heads, args.gpu_memory,
                                                      args.kv_dtype)
             for mode in args.modes.split(",")}
    device = torch.device(args.device) if args.device else default_device()
    ceilings = measure_ceilings(device)
    print("ceilings: " + ", ".join(f"{name.removesuffix('_bytes_per_s')} {rate / 1e9:.1f} GB/s"
                                   for name, rate in ceilings.items()), flush=True)
    print(HEADER, flush=True)
    cells = run(args.preset, contexts, modes, args.chunk_size, args.decode_steps, args.synthetic_from, device,
                ceilings, SETTINGS[args.cuda_graphs], SETTINGS[args.compile_layers])
    meta = {"preset": args.preset, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpu_heads": args.gpu_heads, "group_heads": args.group_heads, "gpu_memory": args.gpu_memory,
            "cuda_graphs": args.cuda_graphs, "compile_layers": SETTINGS[args.compile_layers], "kv_dtype": args.kv_dtype,
            "ceilings": ceilings}
    args.json.write_text(json.dumps({"meta": meta, "cells": [asdict(c) for c in cells]}, indent=1))
    if args.plot:
        plot(cells, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
