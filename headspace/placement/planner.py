"""Placement plans: fill the device with KV heads first, then host RAM; and the largest context a machine holds.

The device is worth filling: a resident head is read at HBM speed in decode, an
offloaded one crosses PCIe (or is attended by the host CPU). So the automatic plan
(``gpu_heads="auto"``) keeps as many heads resident as the device holds after the
weights, the working set (:mod:`.peak`), the sliding-window layers and the double
buffer that offloaded heads stream through, spread evenly over the full-attention
layers (170 of 256 heads: ten layers keep 6, spaced among the others, which keep 5),
and offloads the rest to host RAM. The granularity is the head, so a plan leaves
less than one head's KV of the device unused.

Every plan, automatic or given, is checked here before anything is allocated; one
that does not fit is refused with the numbers and the largest context that would.
On a CPU both tiers are host RAM and there is no device to fill: ``"auto"`` keeps
one head per full-attention layer resident (the default before plans existed), unless
``gpu_memory`` gives a size in bytes, which then plays the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from headspace.errors import HeadspaceError
from headspace.kv.cache import OffloadOptions
from headspace.kv.quant.precision import EXACT_KV, KVPrecision
from headspace.placement.arithmetic import Placement, auto_group_heads, plan, spread
from headspace.placement.machine import HOST_HEADROOM, Machine
from headspace.placement.peak import full_overhead, working_set
from headspace.shape import ModelShape
from headspace.units import human_bytes

MOST_TOKENS = 2**40  # where the search for the largest context stops


def device_room(shape: ModelShape, dtype: torch.dtype, chunk_size: int, machine: Machine) -> int | None:
    """Device bytes that KV may take: what the run may still allocate less the working set (None: no figure)."""
    if machine.device is None:
        return None
    return machine.device - working_set(shape, chunk_size, dtype, machine.device).total


def fill(shape: ModelShape, tokens: int, dtype: torch.dtype, room: int, chunk_size: int,
         group_heads: int | None = None, precision: KVPrecision = EXACT_KV) -> Placement | None:
    """The automatic plan for ``tokens`` positions in ``room`` device bytes; None when not even every head
    offloaded fits (the sliding-window layers and the double buffer alone exceed ``room``).

    The double buffer holds ``group_heads`` heads (None: the automatic size, shrunk to what the
    most-offloading layer streams and, when the device is that tight, to what fits); the plan
    then holds as many resident heads as the rest of ``room`` takes whole, at the device tier's
    ``precision`` (the double buffer holds exact heads, and host rows when that tier is quantized).
    """
    everything = plan(shape, tokens, dtype, "offload", shape.kv_heads, group_heads, chunk_size, precision)
    if everything.device_kv_bytes <= room:
        return everything
    layers, head, staged = shape.full_layers, everything.head_bytes, everything.staged_head_bytes
    recent = max(everything.recent_bytes, plan(shape, tokens, dtype, "offload", 0, 1, chunk_size,
                                               precision).recent_bytes)
    free = room - everything.window_bytes - recent
    if layers == 0 or free < 0:
        return None
    group = group_heads or auto_group_heads(shape, tokens, dtype, precision=precision)
    while True:
        resident = min(everything.total_heads, (free - 2 * group * staged) // head)
        if resident < 0:
            if group_heads is not None or group == 1:
                return None
            group -= 1
            continue
        # no more than a layer offloads (or, when resident heads are quantized, holds: they are staged too)
        streamed = min(group, shape.kv_heads - resident // layers if precision.scheme("gpu").exact else group)
        if streamed == group:
            break
        group = streamed  # a smaller double buffer may leave room for more resident heads
    return plan(shape, tokens, dtype, "offload", spread(resident, layers, shape.kv_heads), group, chunk_size,
                precision)


def propose(options: OffloadOptions, shape: ModelShape, tokens: int, dtype: torch.dtype, chunk_size: int,
            machine: Machine) -> Placement:
    """The placement ``options`` ask for at ``tokens``, planned for ``"auto"``, not yet checked against the
    machine (:func:`place` checks). An automatic plan that cannot fit keeps no head resident."""
    room = device_room(shape, dtype, chunk_size, machine)
    if options.gpu_heads == "auto" and room is not None:
        planned = fill(shape, tokens, dtype, room, chunk_size, options.group_heads, options.precision)
        if planned is not None:
            return planned
    resident = options.layer_gpu_heads(shape) if options.gpu_heads != "auto" else 0 if room is not None else 1
    return plan(shape, tokens, dtype, "offload", resident, options.group_heads, chunk_size, options.precision)


def _where(machine: Machine) -> str:
    return "the device tier (host RAM here)" if machine.shared else "the GPU"


def _shortfall(placement: Placement, options: OffloadOptions, shape: ModelShape, dtype: torch.dtype,
               chunk_size: int, machine: Machine) -> str | None:
    """Why ``placement`` does not fit this machine, or None when it does."""
    room = device_room(shape, dtype, chunk_size, machine)
    if room is not None and placement.device_kv_bytes > room:
        return (f"not enough GPU memory: gpu_heads={options.gpu_heads} keeps "
                f"{human_bytes(placement.device_kv_bytes)} of KV on {_where(machine)} at {placement.tokens:,} tokens "
                f"({placement.resident_heads} resident heads, the double buffer and any sliding-window layers), "
                f"but {human_bytes(max(room, 0))} is left after the weights and the working set "
                f"({human_bytes(machine.device - room)})")
    host = placement.host_kv_bytes + (placement.device_kv_bytes if machine.shared else 0)
    if host > machine.host_room:
        return (f"not enough host RAM: {placement.tokens:,} tokens need {human_bytes(host)} of KV there "
                f"({placement.resident_heads} of {placement.total_heads} heads on {_where(machine)}), but only "
                f"{human_bytes(machine.host)} is available, {HOST_HEADROOM:.0%} of it for KV")
    return None


def place(options: OffloadOptions, shape: ModelShape, tokens: int, dtype: torch.dtype, chunk_size: int,
          machine: Machine) -> Placement:
    """The placement of a cache for ``tokens`` positions, planned when ``options.gpu_heads`` is ``"auto"``;
    refused, before anything is allocated, when this machine cannot hold it.

    ``tokens`` 0 (a cache that grows as needed): planned for the model's positions, never refused.
    """
    options.check(shape)
    placement = propose(options, shape, tokens or shape.max_positions or chunk_size, dtype, chunk_size, machine)
    problem = _shortfall(placement, options, shape, dtype, chunk_size, machine) if tokens else None
    if problem is not None:
        largest = largest_context(shape, dtype, chunk_size, machine, options)
        raise HeadspaceError(f"{problem}; the largest context this machine holds in offload mode with these options "
                             f"is {largest:,} tokens (shorten the context, free memory, give --gpu-memory or "
                             f"--gpu-heads differently, or use an eviction mode)")
    return placement


def _full_shortfall(shape: ModelShape, tokens: int, dtype: torch.dtype, chunk_size: int,
                    machine: Machine) -> str | None:
    """Why ``full`` (plain transformers, all KV on the device) cannot hold ``tokens``, or None."""
    kv = plan(shape, tokens, dtype, "full", chunk_size=chunk_size).device_kv_bytes
    extra = full_overhead(shape, tokens, chunk_size, dtype)
    room = device_room(shape, dtype, chunk_size, machine)
    if room is not None and kv + extra > room:
        return (f"not enough GPU memory for full: {tokens:,} tokens need {human_bytes(kv)} of KV and "
                f"{human_bytes(extra)} of transformers' attention temporaries, but {human_bytes(max(room, 0))} is "
                f"left after the weights and the working set")
    if room is None and machine.shared and kv + extra > machine.host_room:
        return (f"not enough host RAM for full: {tokens:,} tokens need {human_bytes(kv + extra)} of KV and "
                f"attention temporaries, but only {human_bytes(machine.host)} is available")
    return None


def check_full(shape: ModelShape, tokens: int, dtype: torch.dtype, chunk_size: int, machine: Machine) -> None:
    """Refuse a ``full`` context this machine cannot hold, before anything is allocated."""
    problem = _full_shortfall(shape, tokens, dtype, chunk_size, machine)
    if problem is not None:
        largest = largest_context(shape, dtype, chunk_size, machine)
        raise HeadspaceError(f"{problem}; the largest context in full mode here is {largest:,} tokens "
                             f"(use --mode offload)")


def largest_context(shape: ModelShape, dtype: torch.dtype, chunk_size: int, machine: Machine,
                    options: OffloadOptions | None = None) -> int | None:
    """The most positions this machine holds in ``offload`` with ``options``, or in ``full`` (``options``
    None); None without a device figure (planning for a GPU that is not here, with no cap in bytes)."""
    if machine.device is None and not machine.shared:
        return None
    if options is None:
        return _largest(lambda tokens: _full_shortfall(shape, tokens, dtype, chunk_size, machine) is None)
    return _largest(lambda tokens: _shortfall(propose(options, shape, tokens, dtype, chunk_size, machine),
                                              options, shape, dtype, chunk_size, machine) is None)


def _largest(fits: Callable[[int], bool]) -> int:
    """The largest count ``fits`` accepts (0 if none), for ``fits`` true up to some count and false above."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high < MOST_TOKENS and fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
