"""The ``"headspace"`` attention function, registered in transformers' attention-function registry.

When the layer's cache is a headspace cache that has just stored this layer's keys,
the cache computes the attention (head group by head group, streaming offloaded
heads); otherwise the function is plain exact attention from
:mod:`headspace.attention.kernels`, so a patched model still works with any other
cache. The cache announces itself through :data:`active_cache` in its ``update``.

transformers never builds a mask for this implementation (:func:`no_mask`): the
queries are always the last positions of the keys, so causality follows from the
shapes.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from headspace.attention.kernels import causal_attention
from headspace.errors import HeadspaceError

ATTENTION_NAME = "headspace"


class AttendingCache(Protocol):
    """What the hook asks of a cache: whether it holds these keys, and the attention over them."""

    def holds(self, layer_idx: int, keys: torch.Tensor) -> bool: ...

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor: ...


# The cache that stored keys last, so the attention call right after can find it. A weak
# reference: holding the cache here would keep its (possibly huge) host memory alive.
active_cache: ContextVar[weakref.ref[AttendingCache] | None] = ContextVar("headspace_active_cache", default=None)


@torch.compiler.disable  # as the cache's update: compiled decoder layers run around it, never through it
def headspace_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function with transformers' signature; returns (B, c, Hq, D) and no weights."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    ref = active_cache.get()
    cache = ref() if ref is not None else None
    if cache is not None and cache.holds(module.layer_idx, key):
        out = cache.attend(module.layer_idx, query, scaling)
    else:
        out = causal_attention(query, key, value, scaling, sliding_window)
    return out.transpose(1, 2).contiguous(), None


def no_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """Mask function for ``"headspace"``: masks follow from shapes, so padding is refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise HeadspaceError("padded batches are not supported: pass sequences of equal length without padding")
    return None


AttentionInterface.register(ATTENTION_NAME, headspace_attention)
AttentionMaskInterface.register(ATTENTION_NAME, no_mask)
