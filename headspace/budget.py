"""Budgeted KV caches: a fixed number of tokens per KV head, chosen by an eviction policy.

Every full-attention layer becomes a :class:`BudgetLayer`. A forward chunk is
appended, attended exactly (over everything the layer still stores, the chunk
included, with lower-right causality), scored by the layer's
:class:`~headspace.policies.Policy`, and then cut back, per KV head, to the
``budget`` best-scored tokens. Always kept, whatever their score: the stabilizer
window (the newest ``stabilizer`` positions) and the first ``sink`` positions. So a
layer never stores more than ``budget`` tokens between forward calls and at most
``budget + chunk`` during one: peak KV memory is bounded by the budget plus the
chunk size, whatever the prompt length (once decoding starts, the chunk's room is
released and the device store shrinks to ``budget + 16`` slots). Sliding-window layers keep their window
semantics (a :class:`~headspace.cache.WindowLayer`, bounded by the window).

Decode continues on the compressed cache and is treated like any other chunk: each
new token is scored (Locret: by the retaining head; SnapKV: the one new query
re-scores everything) and the lowest-scored token beyond the budget is evicted, so
the budget holds for the whole generation.

Modes registered here (options are :class:`~headspace.engine.Engine` keyword
options): ``locret``, ``streamingllm``, ``snapkv``, ``random`` and ``offload+locret``.
Options: ``budget`` (tokens per KV head) or ``compression`` (prompt tokens / budget,
default 4), ``stabilizer`` (64), ``sink`` (4); ``heads`` (retaining heads file or
object, default: the file shipped for the model) for the Locret modes; ``window`` (32)
and ``kernel`` (7) for SnapKV; ``seed`` (0) for random; ``decode`` for
``offload+locret``.

``offload+locret`` keeps what Locret would evict in host memory instead of dropping
it. What attention covers there:

* prefill: **everything** - each chunk attends over the device-resident budget plus
  every token evicted to the host (streamed back head group by head group through
  the staging buffers), so the prompt's hidden states, and the logits of the first
  generated token, are exactly those of ``full``;
* decode (``decode="budget"``, the default): the device-resident budget only, so a
  decode step moves nothing over PCIe; tokens evicted during decode go to the host
  too. With ``decode="exact"`` decode also attends over the host tokens, and the
  mode computes exactly what ``full`` (and ``offload``) compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from headspace.attention import causal_attention
from headspace.cache import HeadspaceCache, HeadspaceLayer, WindowLayer, layer_windows
from headspace.engine import Engine, Mode, register_mode
from headspace.errors import HeadspaceError
from headspace.memory import auto_group_heads, check_host_ram, plan
from headspace.policies import LocretPolicy, Policy, RandomPolicy, SnapKVPolicy, StreamingLLMPolicy
from headspace.retaining import RetainingHeads, RopeInverse, resolve_heads
from headspace.streaming import Staging, Transfers
from headspace.tiers import DeviceKV, HostKV

POLICIES = ("locret", "streamingllm", "snapkv", "random")
DECODE_ROOM = 16  # device slots beyond the budget kept for decode, once the prefill chunk's room is released
OPTIONS = {"budget", "compression", "stabilizer", "sink", "heads", "window", "kernel", "seed", "decode"}


@dataclass
class BudgetSettings:
    """Shared by every layer of one cache."""

    budget: int
    stabilizer: int
    sink: int
    prompt_tokens: int | None = None  # positions from here on are decode
    decode_exact: bool = False


class BudgetLayer(HeadspaceLayer):
    """A full-attention layer that keeps at most ``budget`` tokens per KV head on the device.

    Per stored token it keeps the position (``positions``, ``(B, Hk, n)``) and the
    policy's score (``scores``). With ``host`` (``offload+locret``), evicted tokens
    are written to a :class:`~headspace.tiers.HostKV` instead of being dropped.
    """

    def __init__(self, index: int, policy: Policy, settings: BudgetSettings, chunk_size: int,
                 transfers: Transfers | None = None, group_heads: int = 1, block_tokens: int = 1024):
        super().__init__()
        self.index, self.policy, self.settings = index, policy, settings
        self.chunk_size = chunk_size
        self.transfers, self.group_heads, self.block_tokens = transfers, group_heads, block_tokens
        self.store: DeviceKV | None = None
        self.host: HostKV | None = None
        self.host_positions: list[torch.Tensor] = []
        self.positions = self.scores = None
        self.written: torch.cuda.Event | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        self.heads = heads
        self.store = DeviceKV(batch, heads, dim, self.dtype, self.device)
        self.store.reserve(self.settings.budget + self.chunk_size)
        self.positions = torch.empty(batch, heads, 0, dtype=torch.long, device=self.device)
        self.scores = torch.empty(batch, heads, 0, dtype=torch.float32, device=self.device)
        if self.transfers is not None:
            self.host = HostKV(batch, heads, dim, self.dtype, self.transfers.cuda, self.block_tokens)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, chunk, _ = key_states.shape
        self.store.append(key_states, value_states)
        new = torch.arange(self.length, self.length + chunk, device=self.device)
        self.positions = torch.cat([self.positions, new.expand(batch, heads, chunk)], dim=-1)
        self.length += chunk
        return key_states, value_states

    # -- attention --------------------------------------------------------------------------------------
    def decoding(self, chunk: int) -> bool:
        prompt = self.settings.prompt_tokens
        return prompt is not None and self.length - chunk >= prompt

    def attend(self, query: torch.Tensor, scaling: float, staging: Staging) -> torch.Tensor:
        chunk = query.shape[2]
        if self.decoding(chunk) and self.store.capacity > self.settings.budget + DECODE_ROOM:
            self.shrink(self.settings.budget + DECODE_ROOM)
        keys, values = self.store.view()
        exact = self.host is not None and self.host.length > 0 and (
            not self.decoding(chunk) or self.settings.decode_exact)
        if exact:
            out = self.attend_with_host(query, scaling, staging, keys, values)
        else:
            out = causal_attention(query, keys, values, scaling)
        self.scores = self.policy.score(self, query, keys, values, scaling)
        self.evict()
        return out

    def attend_with_host(self, query: torch.Tensor, scaling: float, staging: Staging,
                         keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attention over the host tokens followed by the device ones (order is irrelevant to attention)."""
        batch, q_heads, chunk, dim = query.shape
        ratio = q_heads // self.heads
        offloaded, resident = self.host.length, keys.shape[2]
        total = offloaded + resident
        out = torch.empty(batch, q_heads, chunk, dim, dtype=query.dtype, device=query.device)
        groups = [slice(h, min(h + self.group_heads, self.heads)) for h in range(0, self.heads, self.group_heads)]
        for i, heads in enumerate(groups):
            slot = staging.acquire(self.host, heads, offloaded, total, self.written)
            if i + 1 < len(groups):
                staging.fetch(self.host, groups[i + 1], offloaded, total, self.written, staging.other)
            width = heads.stop - heads.start
            k, v = slot.keys[:, :width, :total], slot.values[:, :width, :total]
            k[:, :, offloaded:] = keys[:, heads]
            v[:, :, offloaded:] = values[:, heads]
            q = slice(heads.start * ratio, heads.stop * ratio)
            out[:, q] = causal_attention(query[:, q], k, v, scaling)
            staging.release(slot)
        return out

    def shrink(self, tokens: int) -> None:
        """Give back the prefill chunk's room once decoding: decode appends one token per step."""
        batch, heads, dim = self.store.shape
        store = DeviceKV(batch, heads, dim, self.dtype, self.device)
        store.reserve(max(tokens, self.store.length))
        store.append(*self.store.view())
        self.store = store

    # -- eviction ---------------------------------------------------------------------------------------
    def evict(self) -> None:
        """Cut every KV head back to ``budget`` tokens: the stabilizer window and sinks, then the best scores."""
        stored, budget = self.store.length, self.settings.budget
        if stored <= budget:
            return
        forced = (self.positions >= self.length - self.settings.stabilizer) | (self.positions < self.settings.sink)
        ranked = self.scores.float().masked_fill(forced, float("inf"))
        top = ranked.topk(budget, dim=-1).indices
        kept = torch.zeros_like(self.positions, dtype=torch.int8).scatter_(-1, top, 1)
        order = torch.sort(kept, dim=-1, stable=True).indices  # evicted first, then kept, each in position order
        drop, keep = order[..., : stored - budget], order[..., stored - budget :]
        if self.host is not None:
            keys, values = self.store.view()
            index = drop.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            self.host.write(keys.gather(2, index), values.gather(2, index))
            self.written = self.transfers.mark()
            self.host_positions.append(self.positions.gather(-1, drop).cpu())
        self.store.keep(keep)
        self.positions = self.positions.gather(-1, keep)
        self.scores = self.scores.gather(-1, keep)

    @property
    def stored(self) -> int:
        return self.store.length if self.store is not None else 0

    @property
    def device_bytes(self) -> int:
        return self.store.nbytes if self.store is not None else 0

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes if self.host is not None else 0


# -- building caches ------------------------------------------------------------------------------------
def resolve_budget(prompt_tokens: int, budget: int | None = None, compression: float | None = None) -> int:
    """Tokens per KV head: ``budget`` as given, or ``ceil(prompt_tokens / compression)`` (default 4x)."""
    if budget is not None and compression is not None:
        raise HeadspaceError("give either budget (tokens) or compression (ratio), not both")
    if budget is None:
        compression = 4.0 if compression is None else float(compression)
        if not compression >= 1:
            raise HeadspaceError(f"compression must be at least 1 (prompt tokens per kept token), got {compression}")
        budget = math.ceil(prompt_tokens / compression)
    budget = int(budget)
    if budget < 1 and prompt_tokens < 1:
        raise HeadspaceError("a compression ratio needs the prompt length: pass budget=... (tokens) instead")
    if budget < 1:
        raise HeadspaceError(f"budget must be at least 1 token, got {budget}")
    return budget


_HEADS_MEMO: dict[tuple, RetainingHeads] = {}


def _heads(model: PreTrainedModel, heads) -> RetainingHeads:
    if isinstance(heads, (str, Path)) or heads is None:
        key = (str(heads), str(model.device), id(model.config))
        if key not in _HEADS_MEMO:
            _HEADS_MEMO.clear()
            _HEADS_MEMO[key] = resolve_heads(heads, model.config, model.device)
        return _HEADS_MEMO[key]
    return resolve_heads(heads, model.config, model.device)


def make_policy(name: str, model: PreTrainedModel, heads=None, window: int = 32, kernel: int = 7,
                seed: int = 0) -> Policy:
    if name == "locret":
        return LocretPolicy(_heads(model, heads), RopeInverse(model))
    if name == "streamingllm":
        return StreamingLLMPolicy()
    if name == "snapkv":
        if window < 1 or kernel < 1:
            raise HeadspaceError(f"snapkv needs window >= 1 and kernel >= 1, got {window} and {kernel}")
        return SnapKVPolicy(window, kernel)
    if name == "random":
        return RandomPolicy(seed)
    raise HeadspaceError(f"unknown eviction policy '{name}'; choose from {', '.join(POLICIES)}")


def budget_cache(
    model: PreTrainedModel,
    policy: str | Policy = "locret",
    prompt_tokens: int = 0,
    budget: int | None = None,
    compression: float | None = None,
    stabilizer: int = 64,
    sink: int = 4,
    chunk_size: int = 1024,
    offload: bool = False,
    decode: str = "budget",
    group_heads: int = 1,
    block_tokens: int | None = None,
    **policy_options,
) -> HeadspaceCache:
    """A cache keeping ``budget`` tokens per KV head of each full-attention layer, chosen by ``policy``.

    ``prompt_tokens`` is the prompt's length: ``compression`` is resolved against it,
    and positions from it on count as decode (the engine passes it; without it every
    forward call is treated as prefill). ``offload=True`` keeps evicted tokens in host
    memory (the ``offload+locret`` semantics in the module docstring); ``decode`` is
    ``"budget"`` or ``"exact"`` there, and host memory grows in blocks of ``block_tokens``
    (default: what the prompt evicts plus 1024). Other keyword options go to the policy
    (``heads``, ``window``, ``kernel``, ``seed``).
    """
    budget = resolve_budget(prompt_tokens, budget, compression)
    if stabilizer < 0 or sink < 0:
        raise HeadspaceError(f"stabilizer and sink must be non-negative, got {stabilizer} and {sink}")
    if budget < stabilizer + sink:
        raise HeadspaceError(
            f"budget {budget} is smaller than the stabilizer window ({stabilizer}) plus sinks ({sink}) that are "
            f"always kept; raise the budget (or lower compression) or shrink stabilizer/sink")
    if decode not in ("budget", "exact"):
        raise HeadspaceError(f"decode must be 'budget' or 'exact', got '{decode}'")
    if group_heads < 1:
        raise HeadspaceError(f"group_heads must be at least 1, got {group_heads}")
    settings = BudgetSettings(budget, stabilizer, sink, prompt_tokens or None, decode == "exact")
    if block_tokens is None:  # host blocks: what the prompt will evict, plus room for decode
        block_tokens = max(prompt_tokens - budget, 0) + 1024
    device = model.device
    transfers = Transfers(device)
    layers: list[HeadspaceLayer] = []
    for index, window in enumerate(layer_windows(model.config)):
        if window is not None:
            layers.append(WindowLayer(window))
            continue
        chosen = policy if isinstance(policy, Policy) else None
        if chosen is None:
            chosen = make_policy(policy, model, **policy_options)
            policy = chosen  # one policy object per cache: shared state (random generator) across layers
        layers.append(BudgetLayer(index, chosen, settings, chunk_size, transfers if offload else None,
                                  group_heads, block_tokens))
    cache = HeadspaceCache(layers, Staging(transfers, device, model.dtype))
    cache.settings = settings
    return cache


def _factory(policy: str, offload: bool = False):
    def make_cache(engine: Engine, tokens: int) -> HeadspaceCache:
        unknown = sorted(set(engine.options) - OPTIONS)
        if unknown:
            raise HeadspaceError(f"unknown option(s) {unknown} for mode '{engine.mode.name}'; known: "
                                 f"{', '.join(sorted(OPTIONS))}")
        options = dict(engine.options)
        if not offload and "decode" in options:
            raise HeadspaceError("decode=... applies only to offload+locret")
        if policy != "locret":
            options.pop("heads", None)
        if policy != "snapkv":
            options.pop("window", None), options.pop("kernel", None)
        if policy != "random":
            options.pop("seed", None)
        prompt = getattr(engine, "prompt_tokens", None) or tokens
        group = engine.group_heads or auto_group_heads(engine.model.config, tokens, engine.dtype, 0)
        if offload:
            check_host_ram(plan(engine.model.config, tokens, engine.dtype, "offload", 0, group).host_kv_bytes)
        return budget_cache(engine.model, policy, prompt_tokens=prompt, chunk_size=engine.chunk_size,
                            offload=offload, group_heads=group, **options)

    return make_cache


for _name in POLICIES:
    register_mode(Mode(_name, "headspace", _factory(_name)))
register_mode(Mode("offload+locret", "headspace", _factory("locret", offload=True)))
