"""Rolling a cache back: to the document after each question, or (exact modes) to a shorter prefix of it.

Between uses a kept document's cache holds exactly the document. A use appends tokens (a
question and its answer); :meth:`Snapshot.restore` takes them away again. What each kind of
layer keeps in the snapshot, taken right after the document, and how it goes back:

* ``DynamicLayer`` (``full``): its length; going back keeps a view of the first positions.
* ``DynamicSlidingWindowLayer`` (``full``, sliding layers): its key and value tensors, which
  transformers replaces on every update and never writes into, so holding them copies nothing.
* :class:`~headspace.kv.layers.WindowLayer` (sliding layers of the other modes): a copy of its
  newest ``window - 1`` positions (all that the next token can see), copied back.
* :class:`~headspace.kv.layers.OffloadLayer` (``offload``): its length. Its device and host tiers
  are append-only, so going back only shortens them; nothing is copied. A quantized tier's rows
  only shorten too; its newest positions, in full precision, are copied (a few dozen per head).
  Rows cannot be cut: a quantized layer is cut no shorter than the positions it has quantized.
* :class:`~headspace.eviction.budget.BudgetLayer` (eviction modes): a copy of its device store
  (the budget, as rows when it is quantized), positions, scores and merged summaries, and the length of its host
  tier (``offload+locret``, append-only too), plus the eviction policy's state (random eviction's
  generator). Copying the budget back gives the question exactly the state the document left, so
  its answer equals a fresh run with the same document-time evictions.

Exact layers can also be cut to a shorter prefix of the document (:func:`crop`), down to
:func:`floor`: any length for full-attention layers, while a sliding-window layer still holds the
window before the cut. A budgeted layer cannot be cut: what it kept depended on what followed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from headspace.errors import HeadspaceError
from headspace.eviction.budget import BudgetLayer
from headspace.eviction.policies import Policy
from headspace.eviction.summaries import Summaries
from headspace.kv.cache import HeadspaceCache
from headspace.kv.layers import OffloadLayer, WindowLayer
from headspace.kv.quant.store import QuantizedKV
from headspace.kv.tiers import DeviceKV, HostKV


def _window_floor(length: int, held: int, window: int) -> int:
    """The shortest length a sliding-window layer holding the last ``held`` of ``length`` positions can be cut to:
    a cut at r needs positions [r - window + 1, r)."""
    first = length - held
    return 0 if first == 0 else min(first + window - 1, length)


@dataclass
class DynamicSnapshot:
    length: int

    @classmethod
    def take(cls, layer: DynamicLayer) -> DynamicSnapshot:
        return cls(layer.get_seq_length())

    def restore(self, layer: DynamicLayer) -> None:
        self.crop(layer, self.length)

    @staticmethod
    def floor(layer: DynamicLayer) -> int:
        return 0

    @staticmethod
    def crop(layer: DynamicLayer, tokens: int) -> None:
        layer.crop(min(tokens - layer.get_seq_length(), 0))  # transformers takes the count to remove, negated


@dataclass
class SlidingSnapshot:
    keys: torch.Tensor
    values: torch.Tensor
    length: int

    @classmethod
    def take(cls, layer: DynamicSlidingWindowLayer) -> SlidingSnapshot:
        return cls(layer.keys, layer.values, layer.cumulative_length)

    def restore(self, layer: DynamicSlidingWindowLayer) -> None:
        layer.keys, layer.values, layer.cumulative_length = self.keys, self.values, self.length

    @staticmethod
    def floor(layer: DynamicSlidingWindowLayer) -> int:
        return _window_floor(layer.cumulative_length, layer.keys.shape[-2], layer.sliding_window)

    @staticmethod
    def crop(layer: DynamicSlidingWindowLayer, tokens: int) -> None:
        length = layer.cumulative_length
        if tokens >= length:
            return
        first = length - layer.keys.shape[-2]
        start = max(first, tokens - layer.sliding_window + 1)
        layer.keys = layer.keys[:, :, start - first : tokens - first]
        layer.values = layer.values[:, :, start - first : tokens - first]
        layer.cumulative_length = tokens


@dataclass
class WindowSnapshot:
    keys: torch.Tensor
    values: torch.Tensor
    length: int

    @classmethod
    def take(cls, layer: WindowLayer) -> WindowSnapshot:
        keys, values = layer.store.view()
        keep = min(keys.shape[2], layer.window - 1)
        return cls(keys[:, :, keys.shape[2] - keep :].clone(), values[:, :, keys.shape[2] - keep :].clone(),
                   layer.length)

    def restore(self, layer: WindowLayer) -> None:
        layer.store.truncate(0)
        layer.store.append(self.keys, self.values)
        layer.length = self.length

    @staticmethod
    def floor(layer: WindowLayer) -> int:
        return _window_floor(layer.length, layer.store.length, layer.window)

    @staticmethod
    def crop(layer: WindowLayer, tokens: int) -> None:
        if tokens >= layer.length:
            return
        first = layer.length - layer.store.length
        layer.store.truncate(tokens - first)
        layer.store.keep_last(tokens - max(first, tokens - layer.window + 1))
        layer.length = tokens


def _quantized(layer: OffloadLayer) -> list[QuantizedKV]:
    return [store for store in (layer.resident, layer.host) if isinstance(store, QuantizedKV)]


@dataclass
class OffloadSnapshot:
    length: int
    recent: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]  # per quantized tier: its rows and newest positions

    @classmethod
    def take(cls, layer: OffloadLayer) -> OffloadSnapshot:
        return cls(layer.length, [(store.quantized, store.recent) for store in _quantized(layer)])

    def restore(self, layer: OffloadLayer) -> None:
        for store, (rows, recent) in zip(_quantized(layer), self.recent):
            store.truncate(rows, recent)  # ``take_groups`` replaces ``recent``, never writes into it
        self.crop(layer, self.length)

    @staticmethod
    def floor(layer: OffloadLayer) -> int:
        return max((store.quantized for store in _quantized(layer)), default=0)

    @staticmethod
    def crop(layer: OffloadLayer, tokens: int) -> None:
        tokens = min(tokens, layer.length)
        for store in _quantized(layer):
            keys, values = store.recent
            keep = tokens - store.quantized
            store.recent = (keys[:, :, :keep], values[:, :, :keep])
        if isinstance(layer.resident, DeviceKV):
            layer.resident.truncate(tokens)
        if isinstance(layer.host, HostKV):
            layer.host.set_length(tokens)
        layer.length, layer.pending = tokens, None


@dataclass
class BudgetSnapshot:
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor
    length: int
    host_length: int
    host_chunks: int  # entries of ``host_positions``
    host_recent: tuple[torch.Tensor, torch.Tensor] | None = None  # a quantized host tier's newest tokens
    summaries: Summaries | None = None  # what was evicted, merged (``merge``)

    @classmethod
    def take(cls, layer: BudgetLayer) -> BudgetSnapshot:
        keys, values = layer.store.view()
        quantized = isinstance(layer.host, QuantizedKV)
        return cls(keys.clone(), values.clone(), layer.positions.clone(), layer.scores.clone(), layer.length,
                   (layer.host.quantized if quantized else layer.host.length) if layer.host is not None else 0,
                   len(layer.host_positions), layer.host.recent if quantized else None,
                   layer.summaries.clone() if layer.summaries is not None else None)

    def restore(self, layer: BudgetLayer) -> None:
        layer.store.truncate(0)
        layer.store.reserve(layer.budget + layer.chunk_size)  # decode may have shrunk it (per-layer budgets: PyramidKV)
        layer.store.append(self.keys, self.values)
        layer.positions, layer.scores = self.positions.clone(), self.scores.clone()
        layer.length = self.length
        if self.summaries is not None:
            layer.summaries = self.summaries.clone()
        if isinstance(layer.host, QuantizedKV):
            layer.host.truncate(self.host_length, self.host_recent)
        elif layer.host is not None:
            layer.host.set_length(self.host_length)
        if layer.host is not None:
            del layer.host_positions[self.host_chunks :]

    @staticmethod
    def floor(layer: BudgetLayer) -> int:
        return layer.length

    @staticmethod
    def crop(layer: BudgetLayer, tokens: int) -> None:
        if tokens != layer.length:
            raise HeadspaceError("a budgeted (eviction) cache cannot be cut shorter: what it kept depended on "
                                 "the tokens after the cut")


LayerSnapshot = DynamicSnapshot | SlidingSnapshot | WindowSnapshot | OffloadSnapshot | BudgetSnapshot

# the first matching class wins: subclasses before their bases
KINDS: list[tuple[type, type[LayerSnapshot]]] = [
    (DynamicSlidingWindowLayer, SlidingSnapshot),
    (DynamicLayer, DynamicSnapshot),
    (WindowLayer, WindowSnapshot),
    (OffloadLayer, OffloadSnapshot),
    (BudgetLayer, BudgetSnapshot),
]


def kind_of(layer) -> type[LayerSnapshot]:
    for layer_type, kind in KINDS:
        if isinstance(layer, layer_type):
            return kind
    raise HeadspaceError(f"a cache layer of type {type(layer).__name__} cannot be kept as a document")


def policies(cache: Cache) -> list[Policy]:
    """The eviction policies of ``cache``'s budgeted layers, each once (the layers of one cache share one)."""
    found = {id(layer.policy): layer.policy for layer in cache.layers if isinstance(layer, BudgetLayer)}
    return list(found.values())


@dataclass
class Snapshot:
    """Every layer's state (and the eviction policy's) at one moment of a cache, to go back to."""

    layers: list[LayerSnapshot]
    policy_states: list[tuple[Policy, torch.Tensor | None]]

    @classmethod
    @torch.inference_mode()  # a prefilled cache's tensors are inference tensors: only written in this mode
    def take(cls, cache: Cache) -> Snapshot:
        if getattr(cache, "offloading", False):
            raise HeadspaceError("transformers' offloaded cache (hf-offload) cannot be kept as a document; "
                                 "use the offload mode")
        return cls([kind_of(layer).take(layer) for layer in cache.layers],
                   [(policy, policy.state()) for policy in policies(cache)])

    @torch.inference_mode()
    def restore(self, cache: Cache) -> None:
        for layer, state in zip(cache.layers, self.layers):
            state.restore(layer)
        for policy, state in self.policy_states:
            policy.set_state(state)
        if isinstance(cache, HeadspaceCache):
            cache.rolled_back()


def floor(cache: Cache) -> int:
    """The shortest length :func:`crop` can cut ``cache`` to."""
    return max(kind_of(layer).floor(layer) for layer in cache.layers)


@torch.inference_mode()
def crop(cache: Cache, tokens: int) -> None:
    """Cut ``cache`` to its first ``tokens`` positions (at least :func:`floor`)."""
    if tokens < floor(cache):
        raise HeadspaceError(f"this cache cannot be cut to {tokens} positions (its sliding windows or budget "
                             f"need at least {floor(cache)})")
    for layer in cache.layers:
        kind_of(layer).crop(layer, tokens)
    if isinstance(cache, HeadspaceCache):
        cache.rolled_back()
