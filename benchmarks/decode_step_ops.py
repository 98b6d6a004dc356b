"""Kernels of one decode step, split into headspace's (the cache: storing K/V, attention) and transformers' (the rest).

A CUDA graph removes the launch cost of a decode step's kernels, not their fixed cost: each
small kernel still takes a few microseconds on the GPU, so a step of ~1,500 of them carries
milliseconds that no byte explains. This script counts them for one decode step of a model
whose KV heads are all resident, in three forms:

* ``static``: the static step (:mod:`headspace.kv.static`) run eagerly: what a graph captures.
  Each op or launch is attributed to headspace when it runs inside the cache's ``update`` or
  ``attend`` (a profiler range around them), to transformers otherwise. ``/torch-attn``: its
  attention by torch ops (flash prefix, masked tail, merge) instead of the Triton kernel
  (the same on a CPU, where the kernel does not run); ``/compiled``: with ``compile_layers``.
* ``graph`` (CUDA only): the same steps replayed from a CUDA graph: the kernels the GPU ran.
* ``eager``: ordinary eager decode (``cuda_graphs=False``), for comparison.

``--time-steps N`` also times N decode steps of each form (milliseconds per token).

On a CPU the count is of leaf aten ops that compute (views and allocations left out): a fair
proxy for GPU kernels. On CUDA it is of kernel launches (runtime calls) in eager forms and of
kernels the GPU ran in the graph. Counts do not depend on the context or the widths, so on a
CPU ``--shrink`` keeps the architecture's layers and heads with small widths.

Run: ``python3 benchmarks/decode_step_ops.py --context 32k --time-steps 100 --json out.json`` (CUDA:
``random:llama-3-8b`` in bf16; on a CPU add ``--shrink --layers 4``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AutoModelForCausalLM

import headspace.kv.layers
from headspace import Engine
from headspace.engine.graphs import GraphDecoder
from headspace.kv.cache import HeadspaceCache
from headspace.models import default_device, default_dtype, load_config
from headspace.shape import ModelShape
from headspace.units import parse_tokens

SCOPE = "headspace-cache"  # the profiler range around the cache's update and attend
# aten ops that launch no kernel: views, shape changes, allocations
NO_KERNEL = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t", "aten::permute",
             "aten::slice", "aten::select", "aten::as_strided", "aten::expand", "aten::unsqueeze", "aten::squeeze",
             "aten::alias", "aten::detach", "aten::unflatten", "aten::flatten", "aten::empty", "aten::empty_strided",
             "aten::empty_like", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::split",
             "aten::chunk", "aten::unbind", "aten::narrow", "aten::_unsafe_view", "aten::contiguous",
             "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
             "aten::view_as", "aten::expand_as", "aten::size", "aten::stride", "aten::dim", "aten::to",
             "aten::_to_copy", "aten::promote_types", "aten::resize_", "aten::clone", "aten::type_as"}
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaMemcpyAsync",
            "cudaMemsetAsync", "cudaLaunchCooperativeKernel")


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    config = load_config(args.model)
    if args.layers:
        config.num_hidden_layers = args.layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: args.layers]
    if args.shrink:  # the same layers and heads, small widths: a CPU holds it and the op counts stay the same
        config.head_dim = 16
        config.hidden_size = config.num_attention_heads * 16
        config.intermediate_size, config.vocab_size = 2 * config.hidden_size, 512
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@contextlib.contextmanager
def attributed():
    """Wrap the cache's ``update`` and ``attend`` in a profiler range: what runs inside is headspace's."""
    real = HeadspaceCache.update, HeadspaceCache.attend

    def update(self, *args, **kwargs):
        with record_function(SCOPE):
            return real[0](self, *args, **kwargs)

    def attend(self, *args, **kwargs):
        with record_function(SCOPE):
            return real[1](self, *args, **kwargs)

    HeadspaceCache.update, HeadspaceCache.attend = update, attend
    try:
        yield
    finally:
        HeadspaceCache.update, HeadspaceCache.attend = real


def computes(event) -> bool:
    return event.name.startswith("aten::") and event.name not in NO_KERNEL


def below(event) -> bool:
    """Whether an op under ``event`` computes (then that op is counted, not ``event``)."""
    return any(computes(child) or below(child) for child in event.cpu_children)


def counted(events, cuda: bool, graph: bool) -> dict:
    """Kernels (or, on a CPU, computing leaf ops) of the profiled step: total, ours, theirs, and ours by name."""
    scopes = [(e.time_range.start, e.time_range.end) for e in events if e.name == SCOPE]

    def ours(event) -> bool:
        return any(start <= event.time_range.start <= end for start, end in scopes)

    if graph:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        return {"total": len(kernels), "by_name": dict(Counter(e.name for e in kernels).most_common(40))}
    if cuda:
        picked = [e for e in events if e.device_type == DeviceType.CPU and e.name in LAUNCHES]
        named = [e.cpu_parent.name if e.cpu_parent is not None else e.name for e in picked]
    else:
        picked = [e for e in events if e.device_type == DeviceType.CPU and computes(e) and not below(e)]
        named = [e.name for e in picked]
    mine = [name for event, name in zip(picked, named, strict=True) if ours(event)]
    return {"total": len(picked), "ours": len(mine), "theirs": len(picked) - len(mine),
            "ours_by_name": dict(Counter(mine).most_common())}


def profile_step(engine: Engine, cache, token: int, cuda: bool, graph: bool = False) -> dict:
    """Counts of one decode step (after two unprofiled ones: captures and first-call setup are done)."""
    for _ in range(2):
        engine.decode_step(token, cache)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with attributed(), profile(activities=activities) as prof:
        engine.decode_step(token, cache)
        if cuda:
            torch.cuda.synchronize()
    return counted(prof.events(), cuda, graph)


def step_ms(engine: Engine, cache, token: int, steps: int, cuda: bool) -> float:
    """Milliseconds per decode step, over ``steps`` steps (the static form begins again as it would in decode)."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.decode_step(token, cache)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


# form -> (cuda_graphs, captured, compile_layers, the Triton kernel where it runs); captured forms need CUDA
FORMS = {
    "eager": (False, False, False, True),
    "static": (True, False, False, True),
    "static/torch-attn": (True, False, False, False),
    "static/compiled": (True, False, True, True),
    "graph": (True, True, False, True),
    "graph/torch-attn": (True, True, False, False),
    "graph/compiled": (True, True, True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--layers", type=int, default=0, help="keep the first N layers (default: all)")
    parser.add_argument("--shrink", action="store_true", help="small widths, same layers and heads (for a CPU)")
    parser.add_argument("--context", type=parse_tokens, default=2048, help="prompt tokens before the counted step")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"of {', '.join(FORMS)}")
    parser.add_argument("--time-steps", type=int, default=0, help="also time this many decode steps per form")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = default_device()
    dtype = default_dtype(device)
    cuda = device.type == "cuda"
    model = build(args, device, dtype)
    shape = ModelShape.of(model.config)
    ids = torch.randint(3, model.config.vocab_size, (1, args.context), device=device)
    forms: dict[str, dict] = {}
    for name in args.forms.split(","):
        graphs, captured, compiled, kernel = FORMS[name]
        if captured and not cuda:
            continue
        engine = Engine(model, mode="offload", gpu_heads=shape.kv_heads, cuda_graphs=graphs, compile_layers=compiled,
                        keep_bytes=0)
        _, cache = engine.prefill(ids, reserve=args.context + 16 + args.time_steps)
        if graphs and cuda and not captured:  # the captured step, launched kernel by kernel
            engine._graphs = GraphDecoder(model, capture=False, compile_layers=compiled)
        with patched_kernel(kernel):
            forms[name] = profile_step(engine, cache, 5, cuda, graph=captured)
            if args.time_steps:
                forms[name]["ms_per_step"] = step_ms(engine, cache, 5, args.time_steps, cuda)
        del engine, cache
    layers = model.config.num_hidden_layers
    unit = "kernels" if cuda else "leaf ops"
    print(f"{args.model}: {layers} layers, context {args.context}, {unit} per decode step ({device}, {dtype})")
    print(f"{'form':>18} {'total':>7} {'ours':>6} {'theirs':>7} {'ours/layer':>11} {'theirs/layer':>13} {'ms/step':>8}")
    for name, row in forms.items():
        ours, theirs = row.get("ours"), row.get("theirs")
        cells = [f"{ours / layers:.1f}" if ours is not None else "-", f"{theirs / layers:.1f}" if theirs is not None
                 else "-", f"{row['ms_per_step']:.3f}" if "ms_per_step" in row else "-"]
        print(f"{name:>18} {row['total']:>7} {ours if ours is not None else '-':>6} "
              f"{theirs if theirs is not None else '-':>7} {cells[0]:>11} {cells[1]:>13} {cells[2]:>8}")
    for name in ("static", "static/torch-attn"):
        if name in forms:
            print(f"ours in {name}, by op: {forms[name]['ours_by_name']}")
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "layers": layers, "shrink": args.shrink,
                "context": args.context, "device": torch.cuda.get_device_name() if cuda else "cpu",
                "dtype": str(dtype), "torch": torch.__version__, "unit": unit}
        args.json.write_text(json.dumps({"meta": meta, "forms": forms}, indent=1))


@contextlib.contextmanager
def patched_kernel(allowed: bool):
    """Static steps use the Triton attention kernel where it runs (``allowed``), or the torch path."""
    real = headspace.kv.layers.slot_kernel
    if not allowed:
        headspace.kv.layers.slot_kernel = lambda query: False
    try:
        yield
    finally:
        headspace.kv.layers.slot_kernel = real


if __name__ == "__main__":
    main()
