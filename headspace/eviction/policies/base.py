"""The policy base class, the inputs it scores, and the registry every policy file adds itself to."""


from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from headspace.errors import HeadspaceError


@dataclass(frozen=True)
class ScoreInputs:
    """What a policy may look at, for one layer after one chunk of ``c`` new tokens (``n`` stored in all)."""

    layer: int  # decoder layer index
    query: torch.Tensor  # (B, Hq, c, D) the chunk's queries, RoPE applied
    keys: torch.Tensor  # (B, Hk, n, D) every stored key, the chunk's last, RoPE applied
    values: torch.Tensor  # (B, Hk, n, D)
    positions: torch.Tensor  # (B, Hk, n) the position of each stored token
    scores: torch.Tensor  # (B, Hk, n - c) the previous scores of the tokens stored before the chunk
    start: int  # position of the chunk's first token
    scaling: float  # the attention's softmax scale

    @property
    def chunk(self) -> int:
        return self.query.shape[2]

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.query.shape[1] // self.keys.shape[1]

    def chunk_positions(self) -> torch.Tensor:
        """The positions ``(c,)`` of the chunk's tokens (and queries)."""
        return torch.arange(self.start, self.start + self.chunk, device=self.keys.device)


@dataclass
class Policy:
    """Base class: ``score`` returns ``(B, Hk, n)`` float scores for the ``n`` tokens a layer stores.

    ``compress_once``: the layer keeps every prompt token until the prompt's last chunk has been
    scored, and evicts from then on (SnapKV as published, which compresses once after a full
    prefill, so that its observation window is the question at the prompt's end).
    """

    name: ClassVar[str] = "policy"
    compress_once: ClassVar[bool] = False
    query_aware: ClassVar[bool] = False  # chooses by the question at the prompt's end (none in a kept document)

    @classmethod
    def budget_defaults(cls, given: dict) -> dict:
        """Budget options (:class:`~headspace.eviction.budget.BudgetOptions` fields) this policy is best run with
        where the user gave none (``given``: those they did give); none by default: a policy runs as published."""
        return {}

    def prepare(self, model: PreTrainedModel) -> Policy:
        """A copy ready to score for ``model`` (one per cache, so state such as a random generator is not
        shared between caches). Policies that need the model (learned heads, its RoPE) load it here."""
        return dataclasses.replace(self)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> torch.Tensor | None:
        """What the policy carries from one call to the next (None: nothing), so that a kept document can be
        rolled back, and saved, with it."""
        return None

    def set_state(self, state: torch.Tensor | None) -> None:
        """Put back what :meth:`state` returned."""

    def layer_budgets(self, budget: int, layers: Sequence[int], kept: int) -> dict[int, int]:
        """Tokens per KV head for each budgeted layer (``layers``: their indices, bottom first), given the
        mean ``budget`` and the ``kept`` tokens (stabilizer + sinks) every layer holds whatever its
        budget. The same budget everywhere unless a policy spreads it (PyramidKV)."""
        return dict.fromkeys(layers, budget)


def attention_probs(inputs: ScoreInputs, query: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``(B, Hk, group, w, n)`` of ``query`` ``(B, Hq, w, D)``, at ``positions`` ``(w,)``, over
    every stored token; a query sees only tokens at or before its own position. In float32: the probabilities
    several policies rank tokens by (SnapKV, TOVA, H2O)."""
    batch, q_heads, width, dim = query.shape
    kv_heads, stored = inputs.keys.shape[1], inputs.keys.shape[2]
    grouped = query.float().reshape(batch, kv_heads, q_heads // kv_heads * width, dim)
    logits = (grouped @ inputs.keys.float().transpose(-1, -2)) * inputs.scaling
    logits = logits.view(batch, kv_heads, q_heads // kv_heads, width, stored)
    later = inputs.positions[:, :, None, None, :] > positions.to(inputs.positions.device)[:, None]
    return logits.masked_fill(later, float("-inf")).softmax(dim=-1)


def append_scores(inputs: ScoreInputs, new: torch.Tensor) -> torch.Tensor:
    """Previous scores followed by ``new`` (B, Hk, c): for policies that score a token once, when first seen."""
    return torch.cat([inputs.scores, new.to(inputs.scores.device, inputs.scores.dtype)], dim=-1)


POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make ``cls`` available under ``cls.name`` (a budgeted mode of that name follows)."""
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, **options) -> Policy:
    """The policy registered as ``name`` with ``options`` as its fields; unknown names and fields are refused."""
    if name not in POLICIES:
        raise HeadspaceError(f"unknown eviction policy '{name}'; choose from {', '.join(POLICIES)}")
    cls = POLICIES[name]
    known = policy_fields(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise HeadspaceError(f"policy '{name}' takes no option(s) {', '.join(unknown)}; "
                             f"it takes: {', '.join(known) or 'none'}")
    return cls(**options)


def policy_fields(cls: type[Policy]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]
