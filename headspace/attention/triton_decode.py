"""Decode attention over a layer's resident key slots up to a position read on the device: two Triton kernels.

The static form of decode (:mod:`headspace.kv.static`) writes each new token at a slot computed
on the device, so that a CUDA graph can replay the step. Attending with torch ops then needs the
slots before the static form began (flash attention), the slots after it (a matrix product under
a mask, a softmax), and a log-sum-exp merge of the two: about fifteen small kernels per layer,
each costing a few microseconds even when replayed, ~0.5 ms of a token's 11.6 ms on the H100 at
32K. Here it is two kernels (flash-decoding): :func:`_split` attends one split of the slots of one
(sequence, KV head) pair for all its query heads, reading the last slot from the position tensor
(splits past it do nothing), with an online softmax in base 2; :func:`_merge` combines the splits
by their log-sum-exp. A sliding window is a lower bound on the slots, read the same way. The
split kernel also stores the decoded token's key and value in its slot, when given them: two
copy kernels fewer per layer.

Imported only where it runs (a GPU, half precision, Triton installed); tests run the kernels'
own code in Triton's interpreter on a CPU.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

BLOCK = 64  # slots a program reads per step
WARPS = 4  # warps per split program
SPLITS_PER_UNIT = 8  # split programs per multiprocessor, at most
MIN_BLOCKS = 8  # blocks per split, at least: a split reads at least this many slots' keys and values
MERGE_BLOCK = 16  # splits the merge reads per step
NO_WINDOW = 2**62  # a window no context reaches


@triton.jit
def _split(query, keys, values, position, acc, top_out, total_out, new_key, new_value, HEADS, FIRST, WINDOW,
           PER_SPLIT, scale_log2, key_batch, key_head, key_slot, value_batch, value_head, value_slot,
           new_key_batch, new_key_head, new_value_batch, new_value_head, DIM: tl.constexpr, RATIO: tl.constexpr,
           RATIO_PAD: tl.constexpr, BLOCK_N: tl.constexpr, STORE: tl.constexpr):
    """One split of the slots of one (sequence, KV head): its unnormalized output, running maximum and total.

    The decoded token sits in slot ``position - FIRST``; the slots attended are the ``WINDOW`` up to it, at
    slot 0 at the earliest. With ``STORE``, its key and value are read from ``new_key``/``new_value``: the one
    split whose slots hold it stores them there and attends them from its registers (no other program reads
    that slot), which saves the two copy kernels of storing them first."""
    pair, split = tl.program_id(0), tl.program_id(1)
    b, h = pair // HEADS, pair % HEADS
    last = tl.load(position) - FIRST
    start = tl.maximum(split * PER_SPLIT, tl.maximum(last - WINDOW + 1, 0))
    stop = tl.minimum((split + 1) * PER_SPLIT, last + 1)
    offs_r, offs_d = tl.arange(0, RATIO_PAD), tl.arange(0, DIM)
    live_r = offs_r < RATIO
    q = tl.load(query + (pair * RATIO + offs_r)[:, None] * DIM + offs_d[None, :], mask=live_r[:, None], other=0)
    key_base = keys + b.to(tl.int64) * key_batch + h.to(tl.int64) * key_head
    value_base = values + b.to(tl.int64) * value_batch + h.to(tl.int64) * value_head
    if STORE:
        token_key = tl.load(new_key + b.to(tl.int64) * new_key_batch + h.to(tl.int64) * new_key_head + offs_d)
        token_value = tl.load(new_value + b.to(tl.int64) * new_value_batch + h.to(tl.int64) * new_value_head
                              + offs_d)
        if (start <= last) & (last < stop):
            tl.store(key_base + last.to(tl.int64) * key_slot + offs_d, token_key)
            tl.store(value_base + last.to(tl.int64) * value_slot + offs_d, token_value)
    top = tl.full((RATIO_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((RATIO_PAD,), tl.float32)
    out = tl.zeros((RATIO_PAD, DIM), tl.float32)
    for first in range(start, stop, BLOCK_N):  # every block holds at least one live slot
        offs_n = first + tl.arange(0, BLOCK_N)
        live = offs_n < stop
        k = tl.load(key_base + offs_n[:, None] * key_slot + offs_d[None, :], mask=live[:, None], other=0)
        if STORE:
            k = tl.where((offs_n == last)[:, None], token_key[None, :], k)
        scores = tl.dot(q, tl.trans(k)) * scale_log2
        scores = tl.where(live[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, 1))
        weights = tl.exp2(scores - new_top[:, None])
        rescale = tl.exp2(top - new_top)
        v = tl.load(value_base + offs_n[:, None] * value_slot + offs_d[None, :], mask=live[:, None], other=0)
        if STORE:
            v = tl.where((offs_n == last)[:, None], token_value[None, :], v)
        out = out * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
        total = total * rescale + tl.sum(weights, 1)
        top = new_top
    store_partials(acc, top_out, total_out, out, top, total, pair, split, offs_r, offs_d, live_r, RATIO, DIM)


@triton.jit
def store_partials(acc, top_out, total_out, out, top, total, pair, split, offs_r, offs_d, live_r,
                   RATIO: tl.constexpr, DIM: tl.constexpr):
    """Store one split's unnormalized output, running maximum and total for the query heads of its pair, at the
    rows ``(pair * splits + split) * RATIO + r`` that the merge reads."""
    row = (pair * tl.num_programs(1) + split) * RATIO + offs_r
    tl.store(acc + row[:, None] * DIM + offs_d[None, :], out, mask=live_r[:, None])
    tl.store(top_out + row, top, mask=live_r)
    tl.store(total_out + row, total, mask=live_r)


@triton.jit
def _merge(acc, top_in, total_in, out, SPLITS, DIM: tl.constexpr, RATIO: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """The output of one query head of one pair: its splits weighted by their share of the softmax total."""
    row = tl.program_id(0)
    pair, r = row // RATIO, row % RATIO
    offs_s, offs_d = tl.arange(0, SPLIT_BLOCK), tl.arange(0, DIM)
    best = tl.full((1,), float("-inf"), tl.float32)
    norm = tl.zeros((1,), tl.float32)
    merged = tl.zeros((1, DIM), tl.float32)
    for first in range(0, SPLITS, SPLIT_BLOCK):
        split = first + offs_s
        live = split < SPLITS
        index = (pair * SPLITS + split) * RATIO + r
        top = tl.load(top_in + index, mask=live, other=float("-inf"))
        total = tl.load(total_in + index, mask=live, other=0.0)
        part = tl.load(acc + index[:, None] * DIM + offs_d[None, :], mask=live[:, None], other=0.0)
        new_best = tl.maximum(best, tl.max(top, 0))
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)  # no slot yet (a window's early splits)
        weights = tl.exp2(top - safe)  # an empty split (-inf) weighs 0
        rescale = tl.exp2(best - safe)
        norm = norm * rescale + tl.sum(weights * total, 0)
        merged = merged * rescale[:, None] + tl.sum(weights[:, None] * part, 0)[None, :]
        best = new_best
    result = merged / norm[:, None]
    tl.store(out + row * DIM + offs_d[None, :], result.to(out.dtype.element_ty))


@functools.cache
def _units(device: torch.device) -> int:
    """Programs the device runs at once, about: its multiprocessors (a few for the interpreter on a CPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def splits_of(pairs: int, slots: int, device: torch.device, per_unit: int = SPLITS_PER_UNIT,
              block: int = BLOCK) -> tuple[int, int]:
    """(splits, slots per split, a multiple of ``block``) over ``slots``: up to ``per_unit`` programs per
    multiprocessor, each at least :data:`MIN_BLOCKS` blocks; fixed by the slot count, so a graph replays the
    same grid at every position."""
    splits = max(1, min(-(-per_unit * _units(device) // pairs), -(-slots // (MIN_BLOCKS * block))))
    per_split = -(-slots // (splits * block)) * block
    return -(-slots // per_split), per_split


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, scaling: float,
           first: int = 0, window: int | None = None,
           new: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Decode attention of ``query`` (B, Hk, R, D), the R query heads of each KV head folded, over the slots of
    ``keys``/``values`` (B, Hk, N, D) (slots contiguous in D) up to the decoded token's, slot ``position - first``
    (``position`` a device tensor (1,), read by the kernel), and only the last ``window`` of them with a window.
    Slots past the token's are never read. ``new``, the decoded token's key and value (B, Hk, 1, D), are stored in
    its slot by the kernel itself (without it, the slot must hold them already). Returns (B, Hk, R, D) in the
    query's dtype."""
    batch, heads, ratio, dim = query.shape
    slots = keys.shape[2]
    for tensor in (keys, values, *(new or ())):
        if tensor.stride(3) != 1:
            raise ValueError("key and value slots must be contiguous in the head dimension")
    new_key, new_value = new if new is not None else (keys, values)  # unread without a new token
    splits, per_split = splits_of(batch * heads, slots, query.device)
    acc = torch.empty(batch * heads, splits, ratio, dim, dtype=torch.float32, device=query.device)
    stats = torch.empty(2, batch * heads, splits, ratio, dtype=torch.float32, device=query.device)
    query = query.contiguous()
    _split[(batch * heads, splits)](
        query, keys, values, position, acc, stats[0], stats[1], new_key, new_value, heads, first,
        NO_WINDOW if window is None else window, per_split, scaling * math.log2(math.e),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        new_key.stride(0), new_key.stride(1), new_value.stride(0), new_value.stride(1), DIM=dim, RATIO=ratio,
        RATIO_PAD=max(16, triton.next_power_of_2(ratio)), BLOCK_N=BLOCK, STORE=new is not None, num_warps=WARPS)
    out = torch.empty_like(query)
    _merge[(batch * heads * ratio,)](acc, stats[0], stats[1], out, splits, DIM=dim, RATIO=ratio,
                                     SPLIT_BLOCK=MERGE_BLOCK)
    return out
