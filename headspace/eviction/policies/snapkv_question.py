"""SnapKV as published, query-aware: the whole prompt is prefilled, then compressed once, with the
question as the observation window.

The layer keeps every prompt token until the prompt's last chunk (``compress_once``);
then the prompt's last ``window`` queries vote as in :class:`SnapKV` and the cache is
cut to the budget. When the prompt ends with the question (as in every evaluation
prompt, and in SnapKV's own setting), those queries are the question's, so the kept
tokens are the ones the question attends: the method is strong for that one question
and blind to any other. Set ``window`` to at least the question's length in tokens
(the evaluation's questions are shorter than the default 64). The window spans chunk
boundaries (a short last chunk borrows the previous chunk's last queries), and in
decode it is the last ``window`` queries, the question's included, so it keeps voting.

Peak memory is the full prompt, not budget + chunk: this is the query-aware upper
reference, not a way to fit a long prompt. In the questions-after setting (document
compressed before any question), the window is the document's end and the method
degrades to query-agnostic SnapKV.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from headspace.eviction.policies.base import ScoreInputs, register_policy
from headspace.eviction.policies.snapkv import SnapKV
from headspace.shape import ModelShape


@register_policy
@dataclass
class SnapKVQuestion(SnapKV):
    name = "snapkv-question"
    compress_once = True
    query_aware = True
    window: int = 64
    recent: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)  # per layer
    layers: list[int] = field(default_factory=list, init=False, repr=False)

    def prepare(self, model: PreTrainedModel) -> SnapKVQuestion:
        ready = dataclasses.replace(self)
        ready.layers = ModelShape.of(model.config).full_attention_layers
        return ready

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        query, positions = inputs.query, inputs.chunk_positions()
        if inputs.chunk < self.window and inputs.layer in self.recent:
            # the kept queries are the ones just before this chunk, at consecutive positions
            before = self.recent[inputs.layer]
            query = torch.cat([before, query], dim=2)
            positions = torch.cat([positions[:1] - before.shape[2] + torch.arange(before.shape[2],
                                                                                 device=positions.device),
                                   positions])
        query, positions = query[:, :, -self.window :], positions[-self.window :]
        self.recent[inputs.layer] = query
        return self.votes(inputs, query, positions)

    def state(self) -> torch.Tensor | None:
        """The window's queries of every budgeted layer ``(layers, B, Hq, w, D)``, for a kept document to
        roll back to (or save); None before any chunk."""
        return torch.stack([self.recent[layer] for layer in self.layers]) if self.recent else None

    def set_state(self, state: torch.Tensor | None) -> None:
        self.recent = {} if state is None else dict(zip(self.layers, state))
