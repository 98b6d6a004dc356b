"""What a budgeted layer evicted, merged into one summary per KV head and block of positions.

Evicting a token removes its share of every later query's softmax. Most of a long
document is text that each query attends a little, and together that mass is large:
dropped, it flows to the tokens that were kept, and a question asked of the
compressed document attends another fact as strongly as the one it names. On
SmolLM2 at 8x, forcing every needle's words and digits to be kept in every layer and
head did not bring the answers back (CPU, 90 questions: 30 against 28, ``full`` 48;
benchmarks/README.md), while keeping the evicted mass did.

A summary stands for the ``n`` tokens evicted from one block of ``block`` positions
of one KV head: their mean key and mean value, attended with a bonus of ``log n`` on
its score. If the ``n`` keys were equal, that is exactly their attention (``n``
copies of one key weigh ``n`` times one); for keys that differ, it is the attention
of their mean. The block keeps nearby tokens together, so their RoPE rotations
(which vary with position) stay close. Sums are kept in float32, so evicting more
tokens into a block later updates its mean exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Summaries:
    """Per KV head and block of ``block`` positions: the sums of the evicted keys and values, and their count."""

    block: int
    keys: torch.Tensor  # (B, Hk, blocks, D) float32 sums
    values: torch.Tensor  # (B, Hk, blocks, D)
    counts: torch.Tensor  # (B, Hk, blocks) float32

    @classmethod
    def empty(cls, batch: int, heads: int, dim: int, block: int, device: torch.device) -> Summaries:
        keys = torch.zeros(batch, heads, 0, dim, dtype=torch.float32, device=device)
        return cls(block, keys, keys.clone(), torch.zeros(batch, heads, 0, dtype=torch.float32, device=device))

    def add(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Merge evicted tokens: ``positions`` (B, Hk, e), ``keys``/``values`` (B, Hk, e, D)."""
        if positions.shape[-1] == 0:
            return
        blocks = positions // self.block
        grow = int(blocks.max()) + 1 - self.counts.shape[-1]
        if grow > 0:  # zero sums and counts for the new blocks (axis 2 of all three)
            self.keys, self.values, self.counts = (
                torch.cat([t, t.new_zeros(*t.shape[:2], grow, *t.shape[3:])], 2)
                for t in (self.keys, self.values, self.counts))
        index = blocks.unsqueeze(-1).expand_as(keys)
        self.keys.scatter_add_(2, index, keys.float())
        self.values.scatter_add_(2, index, values.float())
        self.counts.scatter_add_(-1, blocks, torch.ones_like(blocks, dtype=torch.float32))

    @property
    def any(self) -> bool:
        """Whether anything was merged: blocks are only made for evicted tokens (read from the shape, so a
        decode step does not wait for the device)."""
        return self.counts.shape[-1] > 0

    def attended(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every block's mean key and value (B, Hk, blocks, D) and its score bonus ``log n`` (B, Hk, blocks), minus
        infinity (not attended) where a head merged nothing into that block."""
        share = self.counts.clamp_min(1)
        bonus = torch.where(self.counts > 0, share.log(), torch.full_like(share, float("-inf")))
        return self.keys / share.unsqueeze(-1), self.values / share.unsqueeze(-1), bonus

    def clone(self) -> Summaries:
        return Summaries(self.block, self.keys.clone(), self.values.clone(), self.counts.clone())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.counts))
