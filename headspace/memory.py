"""Memory arithmetic: KV bytes per token and what a context needs in each mode.

Used by ``headspace info`` and by the engine to refuse a context that host RAM
cannot hold before allocating anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
from transformers import PretrainedConfig

from headspace.cache import check_gpu_heads, kv_heads_and_dim, layer_windows
from headspace.errors import HeadspaceError

STAGING_BUDGET = 2**30


def auto_group_heads(config: PretrainedConfig, tokens: int, dtype: torch.dtype, gpu_heads: int,
                     budget: int = STAGING_BUDGET) -> int:
    """The most offloaded heads per transfer group whose double buffer fits in ``budget`` bytes.

    Bigger groups mean fewer, larger attention kernels (better GPU utilization in
    prefill); at very long contexts the budget shrinks them to one head.
    """
    heads, dim = kv_heads_and_dim(config)
    per_head = 2 * 2 * dim * dtype.itemsize * max(tokens, 1)  # two slots, keys and values
    return max(1, min(heads - gpu_heads, budget // per_head))


@dataclass
class MemoryPlan:
    """Bytes that ``tokens`` positions of KV need on the device and in host memory."""

    tokens: int
    kv_bytes_per_token: int
    device_kv_bytes: int
    host_kv_bytes: int


def plan(config: PretrainedConfig, tokens: int, dtype: torch.dtype, mode: str = "offload",
         gpu_heads: int = 1, group_heads: int | None = None) -> MemoryPlan:
    """KV placement for ``tokens`` positions: ``full`` keeps all on the device; ``offload`` keeps
    ``gpu_heads`` per full layer plus a double buffer of ``group_heads`` heads (default: automatic)
    there and the rest on the host."""
    heads, dim = kv_heads_and_dim(config)
    if mode not in ("full", "offload"):
        raise HeadspaceError(f"memory plans exist for the modes full and offload, not '{mode}'")
    check_gpu_heads(config, gpu_heads)
    group_heads = group_heads or auto_group_heads(config, tokens, dtype, gpu_heads)
    row = 2 * dim * dtype.itemsize  # one head, one token, keys and values
    windows = layer_windows(config)
    per_token = row * heads * len(windows)
    window_bytes = sum(row * heads * min(tokens, w) for w in windows if w is not None)
    full_layers = sum(w is None for w in windows)
    if mode == "full":
        return MemoryPlan(tokens, per_token, window_bytes + full_layers * row * heads * tokens, 0)
    staging = 2 * row * min(group_heads, heads - gpu_heads) * tokens if full_layers else 0
    device = window_bytes + full_layers * row * gpu_heads * tokens + staging
    host = full_layers * row * (heads - gpu_heads) * tokens
    return MemoryPlan(tokens, per_token, device, host)


def check_host_ram(host_bytes: int, headroom: float = 0.9) -> None:
    """Refuse before allocating when host RAM cannot hold ``host_bytes`` of KV."""
    available = psutil.virtual_memory().available
    if host_bytes > headroom * available:
        raise HeadspaceError(
            f"not enough host RAM: the offloaded KV needs {gib(host_bytes)} but only {gib(available)} is available "
            f"(shorten the context, keep more heads on the GPU, or use an eviction mode)"
        )


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
