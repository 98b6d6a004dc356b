"""StreamingLLM (Xiao et al. 2023) as a budget policy: attention sinks plus a window of recent tokens.

A token's score is its position, so the budget keeps the newest tokens; the sinks
(the first ``sink`` positions) are kept by the budgeted layer itself. Unlike the
original, positions are not re-assigned inside the cache: keys keep the RoPE
rotation of their true position, like every other headspace policy.
"""

from __future__ import annotations

import torch

from headspace.policies import Policy


class StreamingLLMPolicy(Policy):
    name = "streamingllm"

    def score(self, layer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              scaling: float) -> torch.Tensor:
        return layer.positions.to(torch.float32)
