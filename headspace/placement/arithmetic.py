"""KV arithmetic: the bytes a placement of KV heads puts on the device and in host RAM.

A :class:`Placement` says, for a context of ``tokens`` positions, how many KV heads of
each full-attention layer stay resident on the device; the others live in host RAM
and stream through a double buffer of ``group_heads`` heads. Sliding-window layers
are bounded by their window and stay on the device. Each tier stores its heads at
its precision (``kv_dtype``): the bytes per head and token come from the scheme
(:meth:`~headspace.kv.quant.schemes.Scheme.bytes_per_token`, scales included).
Everything here is exact arithmetic on the model's shape: no device is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from headspace.errors import HeadspaceError
from headspace.kv.cache import OffloadOptions, describe_heads
from headspace.kv.quant.precision import EXACT_KV, KVPrecision
from headspace.kv.quant.store import DECODE_BATCH
from headspace.shape import ModelShape

STAGING_BUDGET = 2**30  # the most bytes an automatic group size lets the double buffer take


def staging_row_bytes(shape: ModelShape, dtype: torch.dtype, precision: KVPrecision = EXACT_KV) -> int:
    """Bytes of one head and position in a staging slot: the keys and values attended, in the model's dtype,
    and, when the host tier is quantized, its rows copied over before they are dequantized."""
    host = precision.scheme("host")
    return shape.row_bytes(dtype.itemsize) + (0 if host.exact else host.bytes_per_token(shape.head_dim, 1))


def auto_group_heads(shape: ModelShape, tokens: int, dtype: torch.dtype, gpu_heads: int = 0,
                     budget: int = STAGING_BUDGET, precision: KVPrecision = EXACT_KV) -> int:
    """The most offloaded heads per transfer group whose double buffer fits in ``budget`` bytes, and no more
    than a layer with ``gpu_heads`` resident heads offloads.

    Bigger groups mean fewer, larger attention kernels (better GPU utilization in
    prefill); at very long contexts the budget shrinks them to one head.
    """
    per_head = 2 * staging_row_bytes(shape, dtype, precision) * max(tokens, 1)  # two slots
    return max(1, min(shape.kv_heads - gpu_heads, budget // per_head))


def window_tokens(window: int, tokens: int, chunk_size: int) -> int:
    """Positions a sliding-window layer's device buffer may hold at once: up to ``window - 1`` past positions
    and a chunk (never more than the context), in a buffer that grows by half when full."""
    return -(-3 * min(tokens, window + chunk_size) // 2)


def window_bytes(shape: ModelShape, tokens: int, dtype: torch.dtype, chunk_size: int) -> int:
    """Device bytes of every sliding-window layer's KV."""
    row = shape.row_bytes(dtype.itemsize) * shape.kv_heads
    return sum(row * window_tokens(w, tokens, chunk_size) for w in shape.windows if w is not None)


def budget_bytes(shape: ModelShape, held: int, dtype: torch.dtype, chunk_size: int,
                 precision: KVPrecision = EXACT_KV) -> int:
    """Device bytes of a budgeted (eviction) cache whose full-attention layers hold ``held`` tokens per KV head
    at the device tier's precision; a quantized one adds the working copy that one layer at a time dequantizes
    its tokens into for attention. Sliding-window layers are bounded by their window, exact."""
    gpu = precision.scheme("gpu")
    stored = shape.full_layers * shape.kv_heads * held * gpu.bytes_per_token(shape.head_dim, dtype.itemsize)
    working = 0 if gpu.exact else shape.kv_heads * held * shape.row_bytes(dtype.itemsize)
    return stored + working + window_bytes(shape, held, dtype, chunk_size)


@dataclass(frozen=True)
class Placement:
    """Where the KV of ``tokens`` positions lives: ``gpu_heads[i]`` heads of the i-th full-attention layer on
    the device, the rest in host RAM, streamed ``group_heads`` at a time (0: nothing is offloaded)."""

    tokens: int
    gpu_heads: tuple[int, ...]
    group_heads: int
    kv_heads: int
    row_bytes: int  # keys and values of one head for one position, exact
    window_layers: int
    window_bytes: int  # the sliding-window layers' KV, all on the device
    kv_bytes_per_token: int  # every head of every layer at the device tier's precision, as if no window bounded them
    precision: KVPrecision = EXACT_KV
    resident_row_bytes: int = 0  # row_bytes at each tier's precision (0: exact, row_bytes)
    host_row_bytes: int = 0
    staging_row_bytes: int = 0  # a head and position of a staging slot (0: row_bytes)
    recent_bytes: int = 0  # newest positions that quantized tiers keep in full precision on the device

    def _row(self, value: int) -> int:
        return value or self.row_bytes

    @property
    def head_bytes(self) -> int:
        """One resident head of one layer over the whole context: the unit a plan fills the device with."""
        return self._row(self.resident_row_bytes) * self.tokens

    @property
    def host_head_bytes(self) -> int:
        return self._row(self.host_row_bytes) * self.tokens

    @property
    def staged_head_bytes(self) -> int:
        """One head over the whole context in a staging slot."""
        return self._row(self.staging_row_bytes) * self.tokens

    @property
    def total_heads(self) -> int:
        return self.kv_heads * len(self.gpu_heads)

    @property
    def resident_heads(self) -> int:
        return sum(self.gpu_heads)

    @property
    def offloaded_heads(self) -> int:
        return self.total_heads - self.resident_heads

    @property
    def staging_bytes(self) -> int:
        """The double buffer that offloaded groups stream through."""
        return 2 * self.group_heads * self.staged_head_bytes

    @property
    def resident_kv_bytes(self) -> int:
        return self.resident_heads * self.head_bytes

    @property
    def device_kv_bytes(self) -> int:
        return self.resident_kv_bytes + self.window_bytes + self.staging_bytes + self.recent_bytes

    @property
    def host_kv_bytes(self) -> int:
        return self.offloaded_heads * self.host_head_bytes

    def describe(self, device: torch.device) -> str:
        """One line, as a cache built from this placement describes itself."""
        return describe_heads(device, self.kv_heads, self.gpu_heads, self.group_heads,
                              windows=self.window_layers, precision=self.precision)


def spread(resident: int, layers: int, kv_heads: int) -> tuple[int, ...]:
    """``resident`` heads over ``layers`` layers as evenly as they go, the layers with one more spaced evenly
    among the others: every layer streams about the same bytes (decode's host/PCIe split balances in each),
    and layers that stream are interleaved with resident ones, whose compute hides the next prefetch."""
    if not layers:
        return ()
    base, extra = divmod(resident, layers)
    return tuple(min(kv_heads, base + (i + 1) * extra // layers - i * extra // layers) for i in range(layers))


def plan(shape: ModelShape, tokens: int, dtype: torch.dtype, mode: str = "offload",
         gpu_heads: int | Sequence[int] = 1, group_heads: int | None = None, chunk_size: int = 4096,
         precision: KVPrecision = EXACT_KV) -> Placement:
    """The placement of ``tokens`` positions in ``mode``: ``full`` keeps every head on the device; ``offload``
    keeps ``gpu_heads`` (a count for every full-attention layer, or one count per layer) and streams the rest
    ``group_heads`` at a time (None: automatic). ``chunk_size`` bounds what sliding-window layers hold.
    ``precision``: what each tier stores (``full``, plain transformers, is always exact)."""
    if mode not in ("full", "offload"):
        raise HeadspaceError(f"memory plans exist for the modes full and offload, not '{mode}'")
    if mode == "full":
        gpu_heads = shape.kv_heads
    resident = OffloadOptions(gpu_heads=tuple(gpu_heads) if not isinstance(gpu_heads, int) else gpu_heads)
    counts = resident.layer_gpu_heads(shape)
    gpu, host = precision.scheme("gpu"), precision.scheme("host")
    most = shape.kv_heads - min(counts, default=shape.kv_heads)  # the most heads a layer offloads
    if not gpu.exact and any(counts):
        most = max(most, max(counts))  # quantized resident heads are dequantized through the staging buffer too
    group = min(group_heads or auto_group_heads(shape, tokens, dtype, shape.kv_heads - most, precision=precision),
                most)
    row, dim = shape.row_bytes(dtype.itemsize), shape.head_dim
    resident_row, host_row = gpu.bytes_per_token(dim, dtype.itemsize), host.bytes_per_token(dim, dtype.itemsize)
    quantized_heads = sum(counts) * (not gpu.exact) + (shape.kv_heads * len(counts) - sum(counts)) * (not host.exact)
    recent = quantized_heads * row * max(gpu.residual + DECODE_BATCH, host.residual + DECODE_BATCH)
    return Placement(tokens, counts, group, shape.kv_heads, row, shape.layers - shape.full_layers,
                     window_bytes(shape, tokens, dtype, chunk_size), resident_row * shape.kv_heads * shape.layers,
                     precision, resident_row, host_row, staging_row_bytes(shape, dtype, precision), recent)
