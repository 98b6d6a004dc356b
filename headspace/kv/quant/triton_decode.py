"""The Triton kernel behind :func:`~headspace.kv.quant.attend.quantized_decode_lse` (imported only where it runs).

One program attends one split of the keys of one (sequence, KV head) pair for all the
query heads of that KV head, a block of :data:`BLOCK` tokens at a time: it loads the
block's rows (each row's codes as one contiguous load), unpacks and scales them in
registers as :meth:`~headspace.kv.quant.schemes.Scheme.dequantize` does, meets the query
in its dtype (bfloat16 on a GPU) with float32 products, and keeps an online softmax in
base 2. The splits' partial outputs are merged by their log-sum-exp afterwards.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from headspace.attention.triton_decode import splits_of, store_partials
from headspace.kv.quant.schemes import Grouped, PerToken, Scheme

BLOCK = 64  # tokens a program reads per step: two KIVI key groups (measured on the H100 with WARPS)
WARPS = 2  # warps per program
SPLITS_PER_UNIT = 16  # programs per multiprocessor, at most (small programs, many loads in flight)


@triton.jit
def _halves(rows, offsets, live, scale_at):
    """Float16 numbers at byte ``offsets`` + ``scale_at`` of the rows (2-byte aligned), as float32."""
    pointers = (rows + offsets + scale_at).to(tl.pointer_type(tl.float16))
    return tl.load(pointers, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _codes(rows, row_start, live, DIM: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr):
    """The codes of rows starting at byte ``row_start`` (BLOCK_N,), as float32 (BLOCK_N, DIM): fp8 or int8 values
    (KIND 0, 1), or unsigned BITS-bit integers packed low bits first (KIND 2)."""
    CODE_BYTES: tl.constexpr = DIM * BITS // 8
    offs = tl.arange(0, CODE_BYTES)
    packed = tl.load(rows + row_start[:, None] + offs[None, :], mask=live[:, None], other=0)
    MASK: tl.constexpr = (1 << BITS) - 1
    if KIND == 0:
        codes = packed.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif KIND == 1:
        codes = packed.to(tl.int8, bitcast=True).to(tl.float32)
    elif BITS == 4:  # channel 2j in the low half of byte j, 2j+1 in the high half
        codes = tl.reshape(tl.join(packed & MASK, packed >> 4), (row_start.shape[0], DIM)).to(tl.float32)
    else:  # BITS 2: channel 4j+i in bits 2i..2i+1 of byte j
        codes = tl.join(tl.join(packed & MASK, (packed >> 4) & MASK), tl.join((packed >> 2) & MASK, packed >> 6))
        codes = tl.reshape(codes, (row_start.shape[0], DIM)).to(tl.float32)
    return codes


@triton.jit
def decode(query, key_rows, value_rows, acc, top_out, total_out, HEADS, N, PER_SPLIT, scale_log2,
           key_batch, key_head, value_batch, value_head, WIDTH: tl.constexpr, DIM: tl.constexpr,
           RATIO: tl.constexpr, RATIO_PAD: tl.constexpr, BLOCK_N: tl.constexpr, KIND: tl.constexpr,
           BITS: tl.constexpr, GROUP: tl.constexpr, GROUP_CHANNELS: tl.constexpr):
    """One split of one (sequence, KV head): an online softmax over its tokens, in log2 units.

    Per-token rows (KIND 0, 1) scale after the products: a key's scale multiplies its score, a value's its
    probability. KIVI rows (KIND 2) are dequantized in registers: keys with the scale and zero point of their
    channel in their group of GROUP tokens, values with those of their channel group in their own row."""
    pair, split = tl.program_id(0), tl.program_id(1)
    b, h = pair // HEADS, pair % HEADS
    offs_r, offs_d = tl.arange(0, RATIO_PAD), tl.arange(0, DIM)
    live_r = offs_r < RATIO
    q = tl.load(query + (pair * RATIO + offs_r)[:, None] * DIM + offs_d[None, :], mask=live_r[:, None], other=0)
    key_base = b.to(tl.int64) * key_batch + h.to(tl.int64) * key_head
    value_base = b.to(tl.int64) * value_batch + h.to(tl.int64) * value_head
    top = tl.full((RATIO_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((RATIO_PAD,), tl.float32)
    out = tl.zeros((RATIO_PAD, DIM), tl.float32)
    GROUPS: tl.constexpr = BLOCK_N // GROUP  # KIND 2: key groups per block
    COUNT: tl.constexpr = DIM // GROUP_CHANNELS  # KIND 2: channel groups per value row
    CODE_BYTES: tl.constexpr = DIM * BITS // 8
    for block in range(0, PER_SPLIT // BLOCK_N):  # the last split's blocks past N are masked out
        first = split * PER_SPLIT + block * BLOCK_N
        offs_n = first + tl.arange(0, BLOCK_N)
        live = offs_n < N
        value_start = value_base + offs_n * WIDTH
        if KIND < 2:
            key_start = key_base + offs_n * WIDTH
            keys = _codes(key_rows, key_start, live, DIM, KIND, BITS).to(q.dtype)
            key_scale = _halves(key_rows, key_start, live, DIM)
            scores = tl.dot(q, tl.trans(keys)) * (key_scale * scale_log2)[None, :]
        else:
            in_group = offs_n % GROUP
            key_start = key_base + (offs_n - in_group) * WIDTH + in_group * CODE_BYTES
            # the scales and zero points of the block's groups, each spread over its tokens (in registers: loading
            # them per token was 2.7x slower on the H100)
            groups = key_base + (first + tl.arange(0, GROUPS) * GROUP) * WIDTH + GROUP * CODE_BYTES
            group_live = first + tl.arange(0, GROUPS) * GROUP < N
            params = groups[:, None] + 2 * offs_d[None, :]
            key_scale = _halves(key_rows, params, group_live[:, None], 0)
            key_zero = _halves(key_rows, params, group_live[:, None], 2 * DIM)
            key_scale = tl.reshape(tl.broadcast_to(key_scale[:, None, :], (GROUPS, GROUP, DIM)), (BLOCK_N, DIM))
            key_zero = tl.reshape(tl.broadcast_to(key_zero[:, None, :], (GROUPS, GROUP, DIM)), (BLOCK_N, DIM))
            keys = (_codes(key_rows, key_start, live, DIM, KIND, BITS) * key_scale + key_zero).to(q.dtype)
            scores = tl.dot(q, tl.trans(keys)) * scale_log2
        scores = tl.where(live[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, 1))
        safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)  # a block wholly past N changes nothing
        weights = tl.exp2(scores - safe_top[:, None])
        rescale = tl.exp2(top - safe_top)
        values = _codes(value_rows, value_start, live, DIM, KIND, BITS)
        if KIND < 2:
            value_scale = _halves(value_rows, value_start, live, DIM)
            part = tl.dot((weights * value_scale[None, :]).to(q.dtype), values.to(q.dtype))
        else:
            params = value_start[:, None] + CODE_BYTES + 2 * tl.arange(0, COUNT)[None, :]
            value_scale = _halves(value_rows, params, live[:, None], 0)
            value_zero = _halves(value_rows, params, live[:, None], 2 * COUNT)
            value_scale = tl.reshape(tl.broadcast_to(value_scale[:, :, None], (BLOCK_N, COUNT, GROUP_CHANNELS)),
                                     (BLOCK_N, DIM))
            value_zero = tl.reshape(tl.broadcast_to(value_zero[:, :, None], (BLOCK_N, COUNT, GROUP_CHANNELS)),
                                    (BLOCK_N, DIM))
            part = tl.dot(weights.to(q.dtype), (values * value_scale + value_zero).to(q.dtype))
        out = out * rescale[:, None] + part
        total = total * rescale + tl.sum(weights, 1)
        top = new_top
    store_partials(acc, top_out, total_out, out, top, total, pair, split, offs_r, offs_d, live_r, RATIO, DIM)


def _layout(scheme: Scheme, dim: int) -> dict:
    """The kernel's compile-time constants for ``scheme`` rows of a ``dim``-wide head."""
    if isinstance(scheme, PerToken):
        return {"KIND": 0 if scheme.name == "fp8" else 1, "BITS": 8, "GROUP": 1, "GROUP_CHANNELS": dim}
    if isinstance(scheme, Grouped):
        if BLOCK % scheme.group:
            raise ValueError(f"the kernel reads blocks of {BLOCK} tokens, not a multiple of {scheme.group}")
        return {"KIND": 2, "BITS": scheme.bits, "GROUP": scheme.group, "GROUP_CHANNELS": min(scheme.group, dim)}
    raise ValueError(f"no quantized-attention kernel for the '{scheme.name}' scheme")


def attend(query: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, scheme: Scheme,
           scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~headspace.kv.quant.attend.quantized_decode_lse` on the kernel: its arguments, its results."""
    batch, heads, ratio, dim = query.shape
    tokens, width = key_rows.shape[2], key_rows.shape[3]
    for rows in (key_rows, value_rows):
        if rows.stride(3) != 1 or rows.stride(2) != width:
            raise ValueError("quantized rows must be contiguous within a head")
    splits, per_split = splits_of(batch * heads, tokens, query.device, per_unit=SPLITS_PER_UNIT, block=BLOCK)
    acc = torch.empty(batch, heads, splits, ratio, dim, dtype=torch.float32, device=query.device)
    stats = torch.empty(2, batch, heads, splits, ratio, dtype=torch.float32, device=query.device)
    query = query.contiguous()
    decode[(batch * heads, splits)](
        query, key_rows, value_rows, acc, stats[0], stats[1],
        heads, tokens, per_split, scaling * math.log2(math.e),
        key_rows.stride(0), key_rows.stride(1), value_rows.stride(0), value_rows.stride(1),
        WIDTH=width, DIM=dim, RATIO=ratio, RATIO_PAD=max(16, triton.next_power_of_2(ratio)), BLOCK_N=BLOCK,
        num_warps=WARPS, **_layout(scheme, dim))
    # merge the splits: each holds an unnormalized output, its running maximum (log2 units) and its total
    top, total = stats[0], stats[1]
    best = top.amax(dim=2, keepdim=True)
    weight = torch.exp2(top - best) * (total > 0)
    norm = (weight * total).sum(2)
    out = (acc * weight[..., None]).sum(2) / norm[..., None]
    lse = (best.squeeze(2) + torch.log2(norm)) / math.log2(math.e)
    return out.to(query.dtype), lse
