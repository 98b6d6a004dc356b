"""``headspace info``: the largest context each mode holds on this machine, and the memory a context needs.

Reads the config alone (no weights are loaded): the weights' size is counted, the
device's free memory and the host RAM are measured (or, for a GPU that is not here,
taken from ``--gpu-memory``), and the placement planner answers for both modes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from headspace.commands.common import (
    add_chunk_option,
    add_model_options,
    add_placement_options,
    context_size,
    resolve_device,
    resolve_dtype,
    weight_count,
)
from headspace.kv.cache import OffloadOptions
from headspace.kv.quant.schemes import LOSSY, SCHEMES
from headspace.models import default_chunk_size, load_config
from headspace.placement import (
    Machine,
    Placement,
    largest_context,
    place,
    plan,
    probe,
    propose,
    working_set,
)
from headspace.placement.machine import HOST_HEADROOM
from headspace.shape import ModelShape
from headspace.units import human_bytes


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info", help="the largest context per mode and KV precision on this machine, and what a context needs, "
                     "without loading weights",
        description="Print KV bytes per token, this machine's device memory (after the weights) and host RAM, the "
                    "largest context each mode holds here with the placement offload would use (and with KV "
                    "stored at each precision; sliding-window layers stay exact), and, with "
                    "--context, the device and host KV memory that context needs; exit 2 if offload cannot hold "
                    "it.")
    add_model_options(parser)
    parser.add_argument("--context", type=context_size, metavar="N",
                        help="a context length to plan for, in tokens: 4096, 32k, 1m (k = 1024, m = 1024^2)")
    add_chunk_option(parser, ", which sets the working set")
    add_placement_options(parser)
    return parser


def _cell(n: int) -> str:
    return f"{human_bytes(n)} ({n:,} bytes)"


def _device_line(device, machine: Machine) -> str:
    if machine.device is None:
        if machine.shared:
            return f"{device.type}: no memory of its own; both tiers are host RAM"
        return f"{device}: not here to measure (give --gpu-memory BYTES to plan for one)"
    capped = ", capped by --gpu-memory" if machine.capped else ""
    return f"{device}: {_cell(machine.device)} usable after the weights{capped}"


def _largest_line(tokens: int | None, placement: Placement | None, device) -> str:
    if tokens is None:
        return "unknown without a device figure"
    if not tokens:
        return "0 tokens: nothing fits"
    return f"{tokens:,} tokens" + (f": {placement.describe(device)}" if placement is not None else "")


def _spec(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _print_precisions(shape: ModelShape, dtype, chunk: int, machine: Machine, options: OffloadOptions) -> None:
    """Bytes per token and the largest offload context with KV stored at each precision in both tiers."""
    print(f"{'kv_dtype':<13} {'KV per token':<36} largest offload")
    for name, scheme in SCHEMES.items():
        precise = dataclasses.replace(options, kv_dtype=name)
        per_token = scheme.bytes_per_token(shape.head_dim, dtype.itemsize) * shape.kv_heads * shape.layers
        tokens = largest_context(shape, dtype, chunk, machine, precise)
        label = f"{name} (lossy)" if name in LOSSY else name
        print(f"{label:<13} {_cell(per_token):<36} {f'{tokens:,} tokens' if tokens is not None else 'unknown'}")


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device, must_exist=False)
    dtype = resolve_dtype(args.dtype, device)
    config = load_config(args.model)
    shape = ModelShape.of(config)
    options = OffloadOptions(**{k: getattr(args, k) for k in ("gpu_heads", "group_heads", "gpu_memory", "kv_dtype")
                                if getattr(args, k) is not None})
    options.check(shape)
    chunk = args.chunk_size or default_chunk_size(device)
    params = weight_count(config)
    weights = params * dtype.itemsize
    machine = probe(device, weights, options.memory_cap, loaded=False)
    limit = shape.max_positions

    print(f"model         {args.model}: {shape.model_type}, {shape.layers} layers ({shape.full_layers} full "
          f"attention), {shape.kv_heads} KV heads x {shape.head_dim} dims, "
          f"{f'{limit:,}' if limit else 'unlimited'} positions")
    print(f"dtype         {str(dtype).removeprefix('torch.')}")
    print(f"weights       {human_bytes(weights)} ({weights:,} bytes, {params:,} parameters)")
    print(f"KV per token  {_cell(plan(shape, 1, dtype, 'full').kv_bytes_per_token)}")
    print(f"device        {_device_line(device, machine)}")
    if machine.device is not None:
        needs = working_set(shape, chunk, dtype, machine.device)
        print(f"working set   {_cell(needs.total)}: activations of a {chunk}-token chunk "
              f"{human_bytes(needs.activations)}, logits {human_bytes(needs.logits)}, kernel workspaces "
              f"{human_bytes(needs.workspace)}, allocator slack {human_bytes(needs.slack)}, margin "
              f"{human_bytes(needs.margin)}")
    print(f"host RAM      {human_bytes(machine.host)} available, KV may take {HOST_HEADROOM:.0%}: "
          f"{_cell(machine.host_room)}")
    largest_full = largest_context(shape, dtype, chunk, machine)
    largest_offload = largest_context(shape, dtype, chunk, machine, options)
    at_largest = propose(options, shape, largest_offload, dtype, chunk, machine) if largest_offload else None
    print(f"largest full     {_largest_line(largest_full, None, device)}")
    print(f"largest offload  {_largest_line(largest_offload, at_largest, device)}")
    _print_precisions(shape, dtype, chunk, machine, options)
    if args.context is None:
        sys.stdout.flush()
        return 0

    tokens = args.context
    offload = propose(options, shape, tokens, dtype, chunk, machine)
    print(f"context       {tokens:,} tokens")
    print(f"{'mode':<13} {'device KV':<36} host KV")
    print(f"{'full':<13} {_cell(plan(shape, tokens, dtype, 'full', chunk_size=chunk).device_kv_bytes):<36} "
          f"{_cell(0)}")
    group = "auto" if options.group_heads is None else options.group_heads
    print(f"{'offload':<13} {_cell(offload.device_kv_bytes):<36} {_cell(offload.host_kv_bytes):<36} "
          f"gpu_heads={_spec(options.gpu_heads)}, group_heads={group}: {offload.describe(device)}")
    sys.stdout.flush()

    shape.check_positions(tokens, args.allow_beyond_positions)
    place(options, shape, tokens, dtype, chunk, machine)
    return 0
