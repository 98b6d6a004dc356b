"""Random eviction: a seeded uniform score per token and KV head, drawn when the token is first seen."""

from __future__ import annotations

import torch

from headspace.policies import Policy, append_scores


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def score(self, layer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              scaling: float) -> torch.Tensor:
        batch, heads, chunk = keys.shape[0], keys.shape[1], query.shape[2]
        new = torch.rand(batch, heads, chunk, generator=self.generator)
        return append_scores(layer, new.to(keys.device))
