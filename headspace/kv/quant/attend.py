"""Decode attention over quantized rows, without dequantizing them into memory first.

Decode reads every stored key and value once per token, so its speed is the bytes it
moves. Dequantizing rows into a bfloat16 buffer and attending that reads the small
rows, writes the large form and reads it again: more traffic than attending bfloat16
KV in the first place. :func:`quantized_decode_lse` instead reads the rows once and
dequantizes them in registers, inside a Triton kernel on a GPU (flash-decoding: the
keys are cut into splits that run in parallel, each with an online softmax, merged
by their log-sum-exp). Anywhere else (a CPU, or a GPU without Triton) it dequantizes
a piece at a time and attends with :func:`~headspace.attention.kernels.decode_lse`:
the reference the kernel is tested against, the Triton interpreter running the
kernel's own code on the CPU.

The kernel knows the row layouts of :mod:`headspace.kv.quant.schemes` byte for byte:
a per-token row is ``head_dim`` codes then a float16 scale; a KIVI key group is 32
tokens' packed codes then per-channel float16 scales and zero points; a KIVI value row
is its packed codes then per-channel-group scales and zero points. Low bits first
within a byte, as :meth:`~headspace.kv.quant.schemes.Grouped._pack` writes them.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from headspace.attention.kernels import accumulation, decode_lse, merge_lse
from headspace.kv.quant.schemes import Scheme
from headspace.kv.quant.store import dequantized_pieces


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed: looked up once, not on every decode step of every layer."""
    return importlib.util.find_spec("triton") is not None


def quantized_decode_lse(query: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, scheme: Scheme,
                         scaling: float, kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``query`` (B, Hk, R, D), the R query heads of each KV head folded, over the keys and
    values stored as ``scheme`` rows (B, Hk, N, width) (tokens contiguous within a head); N >= 1. Returns the
    output (B, Hk, R, D) in the query's dtype and the log-sum-exp (B, Hk, R) in float32 or above.

    ``kernel``: run the Triton kernel (default: on a GPU in half precision when Triton is installed).
    """
    if kernel is None:  # float32 would meet tensor cores as tf32: the portable path keeps it exact
        kernel = query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and triton_available()
    if kernel:
        from headspace.kv.quant import triton_decode  # Triton is imported only where it runs

        return triton_decode.attend(query, key_rows, value_rows, scheme, scaling)
    pieces = dequantized_pieces(scheme, key_rows, value_rows, query.shape[-1], query.dtype)
    out, lse = merge_lse([decode_lse(query, keys, values, scaling) for _, keys, values in pieces])
    return out, lse.to(accumulation(query.dtype))
