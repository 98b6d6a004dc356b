"""Attention kernels: exact causal attention over a query chunk, and decode attention.

Pure functions of tensors, no state: the cache layers call them for the heads they
hold, on the device or (decode) on the host CPU. Queries are always the last
positions of the keys (no padding), so causality follows from the shapes and no
mask is ever materialized (one for a 4K-token chunk over a 1M-token prefix would
be 4 GB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headspace.attention.host_decode import host_decode_lse


def causal_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (B, Hq, c, D), the last c positions, over ``keys``/``values`` (B, Hk, L, D).

    Causality is aligned lower-right (query i sits at position L - c + i); with a
    ``window``, a query sees only keys less than ``window`` positions back, as in
    transformers' sliding-window mask. Returns (B, Hq, c, D).
    """
    batch, q_heads, chunk, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    if chunk == 1 and (window is None or length <= window):
        # One query sees every key: fold the query heads of each KV head into the query axis.
        folded = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)
        if query.device.type == "cuda" and query.dtype in (torch.bfloat16, torch.float16):
            # flash attention splits long key ranges over the GPU (flash-decoding): 512K keys of two
            # heads in 0.22 ms on the H100, 8x faster than two matrix products and nearer to float64
            out = torch.ops.aten._scaled_dot_product_flash_attention(
                folded, keys, values, 0.0, False, False, scale=scaling)[0]
        else:
            out = decode_attention(folded, [(keys, values)], scaling)
        return out.reshape(batch, q_heads, 1, dim)
    gqa = q_heads != kv_heads
    if window is not None:
        q_pos = torch.arange(length - chunk, length, device=query.device)[:, None]
        k_pos = torch.arange(length, device=query.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    if chunk == length:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling, enable_gqa=gqa)
    return chunk_attention(query, keys, values, scaling)


def accumulation(dtype: torch.dtype) -> torch.dtype:
    """Float32 for half precision (as flash attention accumulates), the input's own type above that."""
    return torch.promote_types(dtype, torch.float32)


def attention_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                  causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp of the scores per query (B, H, L), equal head counts.

    Uses the kernels behind SDPA that also return the log-sum-exp: cuDNN for half
    precision on CUDA, memory-efficient attention for float32 there, the fused
    CPU kernel otherwise.
    """
    if query.device.type == "cuda" and query.dtype in (torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, keys, values, None, True, 0.0, causal, False, scale=scaling)[:2]
    elif query.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, keys, values, None, True, 0.0, causal, scale=scaling)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, causal, scale=scaling)
    batch, heads, length = query.shape[:3]
    # some kernels pad the query axis of the log-sum-exp
    return out, lse.reshape(batch, heads, -1)[..., :length].to(accumulation(query.dtype))


def chunk_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Lower-right causal attention of a chunk as two mask-free parts merged by their log-sum-exp.

    Every query sees all of the prefix, so that part needs no mask, and grouped
    query heads fold into the query axis (plain multi-head attention). The chunk
    over itself is a square causal mask. Both run on the fastest kernel (cuDNN on
    Hopper: about twice flash-attention-2's rate, which a lower-right mask forces).
    """
    return chunk_attention_lse(query, keys, values, scaling)[0].to(query.dtype)


def chunk_attention_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunk_attention` with its log-sum-exp (B, Hq, c), the output at float32 or above."""
    batch, q_heads, chunk, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    ratio, past = q_heads // kv_heads, length - chunk
    folded = query.reshape(batch, kv_heads, ratio * chunk, dim)
    out_past, lse_past = attention_lse(folded, keys[:, :, :past], values[:, :, :past], scaling, causal=False)
    out_past = out_past.reshape(batch, q_heads, chunk, dim)
    lse_past = lse_past.reshape(batch, q_heads, chunk)
    own_keys = keys[:, :, past:].repeat_interleave(ratio, dim=1)
    own_values = values[:, :, past:].repeat_interleave(ratio, dim=1)
    out_own = attention_lse(query.contiguous(), own_keys, own_values, scaling, causal=True)
    return merge_lse([(out_past.to(accumulation(query.dtype)), lse_past), out_own])


def causal_attention_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_attention` (no window) with the log-sum-exp of each query's scores: (B, Hq, c, D) at
    float32 or above and (B, Hq, c), so that attention over further keys can be merged in (:func:`merge_lse`)."""
    batch, q_heads, chunk, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    ratio = q_heads // kv_heads
    acc = accumulation(query.dtype)
    if chunk == 1:
        out, lse = decode_lse(query.reshape(batch, kv_heads, ratio, dim), keys, values, scaling)
        return out.to(acc).reshape(batch, q_heads, 1, dim), lse.reshape(batch, q_heads, 1)
    if chunk == length:
        out, lse = attention_lse(query.contiguous(), keys.repeat_interleave(ratio, dim=1),
                                 values.repeat_interleave(ratio, dim=1), scaling, causal=True)
        return out.to(acc), lse
    return chunk_attention_lse(query, keys, values, scaling)


def biased_attention_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bonus: torch.Tensor,
                         scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` (B, Hq, c, D) over ``keys``/``values`` (B, Hk, m, D) that are all in every query's
    past, each key's score raised by ``bonus`` (B, Hk, m; minus infinity: not attended). Output (B, Hq, c, D)
    and log-sum-exp (B, Hq, c), in float32: merged summaries of evicted tokens
    (:mod:`headspace.eviction.summaries`), few enough for two matrix products."""
    batch, q_heads, chunk, dim = query.shape
    kv_heads = keys.shape[1]
    folded = query.float().reshape(batch, kv_heads, q_heads // kv_heads * chunk, dim)
    scores = folded @ keys.float().transpose(-1, -2) * scaling + bonus.float().unsqueeze(2)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    out = weights.nan_to_num(0.0) @ values.float()
    return out.reshape(batch, q_heads, chunk, dim), lse.reshape(batch, q_heads, chunk)


def merge_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the union of key sets from the attention over each: ``(out, lse)`` pairs of the same
    queries (out (..., D), lse (...)), each part weighted by its share of the softmax total. Returns the output in
    the first part's dtype and the total's log-sum-exp, both computed at float32 or above."""
    if len(parts) == 1:
        return parts[0]
    acc = accumulation(parts[0][0].dtype)
    lse = torch.stack([part[1] for part in parts]).to(acc)
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total)  # a part with no keys (lse -inf) weighs 0
    out = sum(w[..., None] * part[0].to(acc) for w, part in zip(weights, parts, strict=True))
    return out.to(parts[0][0].dtype), total


def decode_attention(
    query: torch.Tensor,
    spans: list[tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
    piece: int = 131072,
) -> torch.Tensor:
    """Attention of a few queries per KV head, ``query`` (B, Hk, R, D), over keys/values given as
    consecutive ``spans`` of (B, Hk, n, D) tensors (one span, or the blocks of a host tier).

    The portable decode path (CPU, and float32 on CUDA where flash attention does
    not run): two matrix products per piece. Scores and softmax are in float32 as in
    flash attention, probabilities meet the values in their dtype. Keys are taken
    ``piece`` at a time with an online softmax, which bounds the float32 temporaries
    at long contexts.
    """
    acc = accumulation(query.dtype)
    out = running_max = total = None
    for span_keys, span_values in spans:
        for start in range(0, span_keys.shape[2], piece):
            keys = span_keys[:, :, start : start + piece]
            scores = torch.matmul(query.to(acc), keys.to(acc).transpose(-1, -2)) * scaling
            top = scores.amax(-1, keepdim=True)
            if running_max is not None:
                top = torch.maximum(top, running_max)
            weights = torch.exp(scores - top)
            part = torch.matmul(weights.to(span_values.dtype), span_values[:, :, start : start + piece]).to(acc)
            if out is None:
                out, total = part, weights.sum(-1, keepdim=True)
            else:
                rescale = torch.exp(running_max - top)
                out = out * rescale + part
                total = total * rescale + weights.sum(-1, keepdim=True)
            running_max = top
    return (out / total).to(query.dtype)


def decode_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention with its log-sum-exp: ``query`` (B, Hk, R, D), the R query heads of each KV head
    folded into the query axis, over every key of ``keys``/``values`` (B, Hk, L, D). Returns the output
    (B, Hk, R, D) and the log-sum-exp (B, Hk, R) in float32 or above.

    Flash attention on the GPU in half precision (it splits long key ranges over the GPU), the kernels of
    :func:`attention_lse` otherwise.
    """
    if query.device.type == "cuda" and query.dtype in (torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, keys, values, 0.0, False, False, scale=scaling)[:2]
        batch, heads, length = query.shape[:3]
        return out, lse.reshape(batch, heads, -1)[..., :length]
    return attention_lse(query, keys, values, scaling)


def masked_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    mask: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode attention over a fixed number of key slots of which ``mask`` says which count: the shape stays
    the same from token to token, so a CUDA graph can replay it while the slots fill.

    ``query`` (B, Hk, R, D) (query heads folded per KV head) over ``keys``/``values`` (B, Hk, N, D), with
    ``mask`` (N,) added to the float32 scores: 0 for a slot that counts, -inf for one that does not (at
    least one counts). ``prefix``: the output and log-sum-exp (:func:`decode_lse`) of the same queries over
    keys before these, merged exactly: the prefix enters the softmax as one more score, its log-sum-exp,
    and its weight there scales its output. Returns (B, Hk, R, D).
    """
    acc = accumulation(query.dtype)
    scores = torch.matmul(query.to(acc) * scaling, keys.to(acc).transpose(-1, -2)) + mask
    if prefix is not None:
        scores = torch.cat([prefix[1].to(acc)[..., None], scores], dim=-1)
    weights = torch.softmax(scores, dim=-1)
    slots = keys.shape[2]
    out = torch.matmul(weights[..., -slots:].to(values.dtype), values).to(acc)
    if prefix is not None:
        out = torch.addcmul(out, weights[..., :1], prefix[0].to(acc))
    return out.to(query.dtype)


def split_decode_attention(
    query: torch.Tensor, spans: list[tuple[torch.Tensor, torch.Tensor]], scaling: float, splits: int
) -> torch.Tensor:
    """:func:`decode_attention` for the host CPU: keys cut into ``splits`` parts run in parallel.

    A fused attention kernel parallelizes over batch and heads, which a single
    decode query of one or two heads leaves to one or two cores; cutting each span
    into parts (flash-decoding) and merging by log-sum-exp uses them all.
    """
    return split_decode_lse(query, spans, scaling, splits)[0]


def split_decode_lse(
    query: torch.Tensor, spans: list[tuple[torch.Tensor, torch.Tensor]], scaling: float, splits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_decode_attention` with its log-sum-exp (B, Hk, R) in float32 or above, to be merged with the
    attention over other positions (:func:`merge_lse`). The compiled host kernel takes it where it can
    (:mod:`.host_decode`: several times torch's rate), on as many threads as torch has."""
    compiled = host_decode_lse(query, spans, scaling, torch.get_num_threads())
    if compiled is not None:
        return compiled
    batch, heads, ratio, dim = query.shape
    rows = query.reshape(batch * heads, 1, ratio, dim)
    outs, lses = [], []
    for keys, values in spans:
        length = keys.shape[2]
        parts = max(1, min(splits, length // 256))
        size = length // parts
        pieces = [(keys[:, :, : parts * size].unflatten(2, (parts, size)).flatten(0, 1),
                   values[:, :, : parts * size].unflatten(2, (parts, size)).flatten(0, 1))]
        if length > parts * size:
            pieces.append((keys[:, :, parts * size :].flatten(0, 1)[:, None],
                           values[:, :, parts * size :].flatten(0, 1)[:, None]))
        for piece_keys, piece_values in pieces:
            piece_query = rows.expand(-1, piece_keys.shape[1], -1, -1).contiguous()
            out, lse = attention_lse(piece_query, piece_keys, piece_values, scaling)
            outs.append(out.to(accumulation(query.dtype)))
            lses.append(lse)
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)  # (B*H, parts, R, D), (B*H, parts, R)
    total = torch.logsumexp(lse, dim=1)
    weights = torch.exp(lse - total[:, None])[..., None]
    return ((out * weights).sum(1).reshape(batch, heads, ratio, dim).to(query.dtype),
            total.reshape(batch, heads, ratio))
