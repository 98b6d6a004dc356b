"""Locret (Huang et al. 2024): learned retaining heads score each token once, when first seen.

The chunk's queries and keys arrive rotated by RoPE; they are rotated back to their
pre-RoPE values (the form the heads were trained on, see
:mod:`headspace.eviction.retaining`) and the layer's head predicts a log-importance
per KV head for each new token. The score is stored with the token and never
recomputed. With ``pool`` > 1 (odd), each new token's score is the maximum over
itself and its neighbours within the chunk, so a multi-token value (the digit tokens
of a number) is kept or dropped as a whole rather than torn apart. With ``center``,
each chunk's new scores are shifted so that their median is 0, per KV head. The heads'
scores fall with a token's position: on SmolLM2's 2K-token diagnosis documents, the
second 1K chunk's mean score was below the first's in 347 of 360 (document, layer)
pairs, by 0.27 on average (log scale), although no token had been evicted (likely
learned in training: a token late in a training sequence has fewer later queries to
be attended by). So a later chunk's facts lost the budget to an earlier chunk's
filler; centred, a chunk's tokens compete by their standing within it (a decode
step's single token scores 0: a median token).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from headspace.errors import HeadspaceError
from headspace.eviction.policies.base import Policy, ScoreInputs, append_scores, register_policy
from headspace.eviction.retaining.heads import RetainingHeads, RopeInverse, cached_heads
from headspace.units import parse_switch


@register_policy
@dataclass
class Locret(Policy):
    name = "locret"
    heads: RetainingHeads | str | os.PathLike | None = None  # None: the file shipped for the model
    pool: int = 1  # max-pool new scores over this many neighbouring tokens (odd; 1: off)
    center: bool = False  # shift each chunk's new scores to a median of 0 per KV head (off: it lowered 8x on the H100)
    retaining: RetainingHeads | None = field(default=None, init=False, repr=False)
    rope: RopeInverse | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.pool < 1 or self.pool % 2 == 0:
            raise HeadspaceError(f"locret pool must be an odd number of tokens (1: off), got {self.pool}")
        self.center = parse_switch(self.center, "locret center")

    @classmethod
    def budget_defaults(cls, given: dict) -> dict:
        """Unless chunked prefill (Locret's recipe: ``prefill="chunked"``) or ``once`` is asked for: an exact
        prefill, the evicted tokens waiting in host RAM until the prompt's end, and the evicted tokens merged into
        summaries of ``max(64, 8 x ratio)`` positions (at most an eighth of the slots). On SmolLM2 at 8x this kept
        81 and 50 % of held-out questions asked after compression where the chunked recipe kept 56 and 25 (``full``:
        94 and 56; 4K and 8K, H100, benchmarks/README, issue 14); merged after a chunked prefill, summaries did
        not help, so they come only with the exact prefill."""
        if given.get("once") or given.get("prefill", "exact") != "exact":
            return {}
        ratio = float(given.get("compression") or 4)
        return {"prefill": "exact", "merge": max(64, math.ceil(8 * ratio))}

    def prepare(self, model: PreTrainedModel) -> Locret:
        ready = Locret(self.heads, self.pool, self.center)
        ready.retaining = cached_heads(self.heads, model)
        ready.rope = RopeInverse(model)
        return ready

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        chunk, start = inputs.chunk, inputs.start
        q = self.rope(inputs.query, start)
        k = self.rope(inputs.keys[:, :, -chunk:], start)
        new = self.retaining.score(inputs.layer, q, k, inputs.values[:, :, -chunk:])
        if self.pool > 1:
            new = F.max_pool1d(new, self.pool, stride=1, padding=self.pool // 2)
        if self.center:
            new = new - new.median(dim=-1, keepdim=True).values
        return append_scores(inputs, new)
