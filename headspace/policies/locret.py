"""Locret (Huang et al. 2024): learned retaining heads score each token once, when first seen.

The chunk's queries and keys arrive rotated by RoPE; they are rotated back to their
pre-RoPE values (the form the heads were trained on, see :mod:`headspace.retaining`)
and the layer's head predicts a log-importance per KV head for each new token. The
score is stored with the token and never recomputed.
"""

from __future__ import annotations

import torch

from headspace.policies import Policy, append_scores
from headspace.retaining import RetainingHeads, RopeInverse


class LocretPolicy(Policy):
    name = "locret"

    def __init__(self, heads: RetainingHeads, rope: RopeInverse):
        self.heads, self.rope = heads, rope

    def score(self, layer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              scaling: float) -> torch.Tensor:
        chunk = query.shape[2]
        start = layer.length - chunk
        q = self.rope(query, start)
        k = self.rope(keys[:, :, -chunk:], start)
        new = self.heads.score(layer.index, q, k, values[:, :, -chunk:])
        return append_scores(layer, new.to(keys.device))
