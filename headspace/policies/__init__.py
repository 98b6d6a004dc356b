"""Eviction policies for budgeted caches: each scores the tokens a layer stores, higher meaning keep.

A :class:`Policy` is asked once per layer per forward chunk, after the chunk's keys
and values have been appended and the chunk's attention computed. It returns one
score per stored token and KV head; :class:`~headspace.budget.BudgetLayer` then
keeps the ``budget`` best-scored tokens of each KV head, always including the
stabilizer window (the newest tokens) and the sinks (the first tokens). Policies:

* ``locret`` - learned retaining heads score each token once, when first seen.
* ``streamingllm`` - position: sinks plus the most recent tokens.
* ``snapkv`` - attention that the last ``window`` queries of the chunk give each token, pooled.
* ``random`` - a seeded random score per token, drawn when first seen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from headspace.budget import BudgetLayer


class Policy:
    """Base class: ``score`` returns ``(B, Hk, n)`` scores for the ``n`` tokens a layer stores on the device."""

    name = "policy"

    def score(self, layer: BudgetLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              scaling: float) -> torch.Tensor:
        """``query`` (B, Hq, c, D) is the chunk's; ``keys``/``values`` (B, Hk, n, D) end with the chunk's c tokens.

        ``layer.scores`` holds the previous scores of the first n - c tokens and
        ``layer.positions`` the positions of all n.
        """
        raise NotImplementedError


def append_scores(layer: BudgetLayer, new: torch.Tensor) -> torch.Tensor:
    """Previous scores followed by ``new`` (B, Hk, c): for policies that score a token once."""
    return torch.cat([layer.scores, new.to(layer.scores.dtype)], dim=-1)


from headspace.policies.locret import LocretPolicy  # noqa: E402
from headspace.policies.random_eviction import RandomPolicy  # noqa: E402
from headspace.policies.snapkv import SnapKVPolicy  # noqa: E402
from headspace.policies.streaming_llm import StreamingLLMPolicy  # noqa: E402

__all__ = ["LocretPolicy", "Policy", "RandomPolicy", "SnapKVPolicy", "StreamingLLMPolicy", "append_scores"]
