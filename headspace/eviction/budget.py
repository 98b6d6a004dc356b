"""Budgeted KV caches: a fixed number of tokens per KV head, chosen by an eviction policy.

Every full-attention layer becomes a :class:`BudgetLayer`. A forward chunk is
appended, attended exactly (over everything the layer still stores, the chunk
included, with lower-right causality), scored by the layer's
:class:`~headspace.eviction.policies.Policy`, and then cut back, per KV head, to the
``budget`` best-scored tokens. Always kept, whatever their score: the stabilizer
window (the newest ``stabilizer`` positions) and the first ``sink`` positions. So a
layer never stores more than ``budget`` tokens between forward calls and at most
``budget + chunk`` during one: peak KV memory is bounded by the budget plus the
chunk size, whatever the prompt length (once decoding starts, the chunk's room is
released and the device store shrinks to ``budget + 16`` slots). Sliding-window layers keep their window
semantics (a :class:`~headspace.kv.layers.WindowLayer`, bounded by the window).

Decode continues on the compressed cache and is treated like any other chunk: each
new token is scored (Locret: by the retaining head; SnapKV: the one new query
re-scores everything) and the lowest-scored token beyond the budget is evicted, so
the budget holds for the whole generation.

A policy may spread the budget unevenly over layers (``Policy.layer_budgets``:
PyramidKV gives lower layers more, the total unchanged), and a policy that
``compress_once`` (query-aware SnapKV) makes the layer keep the whole prompt until
its last chunk has been scored, then cut to the budget once and evict as usual
from there (peak memory is then the prompt, not budget + chunk: :func:`held_tokens`,
which the layer reserves up front and the mode's footprint counts).

Three options change what eviction leaves behind, for every policy:

* ``prefill``: ``"chunked"`` (Locret's recipe; every policy's default but Locret's) attends each chunk over
  what the budget kept of the earlier ones; ``"exact"`` (Locret's default, with ``merge``: see
  :meth:`~headspace.eviction.policies.locret.Locret.budget_defaults`) keeps the evicted tokens in a host tier,
  as ``offload+locret`` does, until the prompt's last chunk has attended them, then frees it: the prompt's
  logits are ``full``'s, device memory is the chunked budget's, and host RAM holds what was evicted while
  the prompt is prefilled. Locret's scores do not depend on what was kept, so both keep the same tokens.
* ``once``: the layer holds the whole prompt (exact attention, the prompt's own logits are
  ``full``'s) and cuts to the budget once, at its end, as query-aware SnapKV always does. Peak KV
  memory is the prompt. Locret's scores do not depend on what was kept, so the same tokens are kept
  as in chunked eviction; what changes is that the later chunks were computed over everything.
* ``merge``: evicted tokens are not dropped but merged, per KV head and block of ``merge``
  positions, into a summary (:mod:`headspace.eviction.summaries`) that later queries attend with
  the weight of the tokens it stands for. Its slots come out of the budget that ``compression``
  resolves to (``prompt / compression - prompt / merge`` tokens), so the ratio stays one of slots (a
  summary is float32 sums: twice the bytes of a bf16 token, the same as a float32 one).

Options (:class:`BudgetOptions`): ``budget`` (tokens per KV head) or ``compression``
(prompt tokens / budget, default 4), ``stabilizer`` (64), ``sink`` (4), ``kv_dtype`` (below),
``prefill``, ``once`` and ``merge`` (above), and for ``offload+locret`` ``decode``, ``group_heads`` and ``release``; the
policy's own fields (e.g. Locret's ``heads``, SnapKV's ``window`` and ``kernel``) configure the policy. A
prompt too short to need eviction (a budget from ``compression`` below ``stabilizer + sink``) keeps every token.

``offload+locret`` keeps what Locret would evict in host memory instead of dropping
it. What attention covers there:

* prefill: **everything** - each chunk attends over the device-resident budget plus
  every token evicted to the host (streamed back head group by head group through
  the staging buffers), so the prompt's hidden states, and the logits of the first
  generated token, are exactly those of ``full`` (with both tiers exact);
* decode (``decode="budget"``, the default): the device-resident budget only, so a
  decode step moves nothing over PCIe; tokens evicted during decode go to the host
  too. With ``decode="exact"`` decode also attends over the host tokens, and the
  mode computes exactly what ``full`` (and ``offload``) compute;
* with ``merge`` (``decode="budget"`` only): evicted tokens go to the host and into the summaries, which
  decode attends beside the budget;
* with ``release``: the host tier is freed once the prompt has been prefilled, so later chunks (a
  kept document's questions) and decode attend the budget (and summaries) only. With ``merge``, this is
  ``once`` and ``merge`` (Locret's scores do not depend on what was kept, so the budget ends up holding
  the same tokens), but the prompt waits in host RAM instead of device memory.

``kv_dtype`` (:mod:`headspace.kv.quant`) stores KV in fewer bits. The budget on the device (the gpu
tier: ``kv_dtype="fp8"`` or ``"int8"``) is kept as rows of one scale per token and head: eviction drops
single tokens per head, and such a row is whole on its own, so keeping tokens gathers rows exactly as it
gathers exact KV. KIVI's ``int4``/``int2`` quantize keys per channel over groups of 32 tokens, which
eviction would tear apart: refused on the device. A chunk is quantized as it is stored, but the layer
attends it (and the policy scores it) as computed; the tokens stored before it are dequantized, a layer at
a time, into one working copy that attention, the policy's scores and the tokens evicted to the host all
read: what the policy scores is what attention saw. With ``offload+locret`` the evicted tokens take the
host tier's precision (``kv_dtype="host=int4"``, ``"gpu=fp8,host=int4"``): their whole groups as rows in
host RAM, the newest ones in full precision on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from headspace.attention.kernels import biased_attention_lse, causal_attention, causal_attention_lse, merge_lse
from headspace.errors import HeadspaceError
from headspace.eviction.policies import POLICIES, Policy, ScoreInputs, make_policy, policy_fields
from headspace.eviction.summaries import Summaries
from headspace.kv.cache import HeadspaceCache
from headspace.kv.layers import HeadspaceLayer, Phase, WindowLayer, head_groups
from headspace.kv.quant.precision import EXACT, EXACT_KV, KVPrecision
from headspace.kv.quant.store import QuantizedKV
from headspace.kv.streaming import Staging, Transfers
from headspace.kv.tiers import DeviceKV, HostKV
from headspace.shape import ModelShape
from headspace.units import parse_switch

DECODE_ROOM = 16  # device slots beyond the budget kept for decode, once the prefill chunk's room is released


@dataclass(frozen=True)
class BudgetOptions:
    """How many tokens a budgeted layer keeps per KV head, which it always keeps, and their precision."""

    budget: int | None = None  # tokens per KV head; or
    compression: float | None = None  # prompt tokens / budget (default 4 when neither is given)
    stabilizer: int = 64  # the newest tokens, always kept
    sink: int = 4  # the first tokens, always kept
    kv_dtype: str = "bf16"  # the budget's precision on the device: "fp8" or "int8" (one scale per token)
    once: bool = False  # prefill the whole prompt exactly, then compress it once at its end (peak: the prompt)
    merge: int = 0  # evicted tokens merged into one summary per KV head and block of this many positions (0: off)
    prefill: str = "chunked"  # "exact": every chunk attends the whole prompt, evicted tokens waiting in host RAM

    host_tier: ClassVar[bool] = False  # whether evicted tokens are kept (in host RAM), at the host precision

    def __post_init__(self) -> None:
        if self.budget is not None and self.compression is not None:
            raise HeadspaceError("give either budget (tokens) or compression (ratio), not both")
        if self.compression is not None and not self.compression >= 1:
            raise HeadspaceError(
                f"compression must be at least 1 (prompt tokens per kept token), got {self.compression}")
        if self.budget is not None and self.budget < 1:
            raise HeadspaceError(f"budget must be at least 1 token, got {self.budget}")
        if self.stabilizer < 0 or self.sink < 0:
            raise HeadspaceError(f"stabilizer and sink must be non-negative, got {self.stabilizer} and {self.sink}")
        if self.budget is not None and self.budget < self.stabilizer + self.sink:
            raise HeadspaceError(
                f"budget {self.budget} is smaller than the stabilizer window ({self.stabilizer}) plus sinks "
                f"({self.sink}) that are always kept; raise the budget or shrink stabilizer/sink")
        precision = KVPrecision.parse(self.kv_dtype)
        if precision.scheme("gpu").group != 1:
            raise HeadspaceError(
                f"kv_dtype '{self.kv_dtype}': eviction keeps the budget on the device exact (bf16) or one scale "
                f"per token (fp8, int8), as it drops single tokens and {precision.gpu} quantizes keys over "
                f"groups of tokens; {precision.gpu} fits the host tier of offload+locret (kv_dtype=host="
                f"{precision.gpu} or gpu=fp8,host={precision.gpu})")
        if not self.host_tier and precision.host not in (EXACT, precision.gpu):
            raise HeadspaceError(f"kv_dtype '{self.kv_dtype}': this mode keeps no host tier (offload+locret does); "
                                 f"give the budget's precision on the device: fp8, int8 or bf16")
        object.__setattr__(self, "kv_dtype", str(precision))
        object.__setattr__(self, "once", parse_switch(self.once, "once"))
        if self.prefill not in ("chunked", "exact"):
            raise HeadspaceError(f"prefill must be 'chunked' or 'exact', got '{self.prefill}'")
        if self.once and self.prefill == "exact" and not self.host_tier:
            raise HeadspaceError("once=1 prefills exactly on the device and prefill='exact' does it with the "
                                 "evicted tokens in host RAM: give one of them (prefill=chunked with once=1)")
        if self.merge < 0:
            raise HeadspaceError(f"merge must be a block of positions (0: off), got {self.merge}")
        ratio = 4.0 if self.compression is None else float(self.compression)
        if self.merge and self.budget is None and self.merge <= ratio:
            raise HeadspaceError(f"merge blocks of {self.merge} positions at {ratio:g}x compression would take the "
                                 f"whole budget (one summary per {self.merge} positions); use blocks larger than "
                                 f"the ratio")

    @property
    def precision(self) -> KVPrecision:
        return KVPrecision.parse(self.kv_dtype)

    def resolve(self, prompt_tokens: int | None) -> int:
        """Tokens per KV head for a prompt of ``prompt_tokens``: ``budget`` as given, or
        ``ceil(prompt_tokens / compression)`` less the summaries' ``ceil(prompt_tokens / merge)`` slots (the
        ratio is of the slots), but never below ``stabilizer + sink`` (a short prompt keeps what it has
        instead of being refused)."""
        if self.budget is not None:
            return self.budget
        if not prompt_tokens:
            raise HeadspaceError("a compression ratio needs the prompt length: pass prompt_tokens (the engine does "
                                 "when it prefills) or budget=... (tokens) instead")
        ratio = 4.0 if self.compression is None else float(self.compression)
        budget = math.ceil(prompt_tokens / ratio) - (math.ceil(prompt_tokens / self.merge) if self.merge else 0)
        return max(budget, self.stabilizer + self.sink)


@dataclass(frozen=True)
class OffloadBudgetOptions(BudgetOptions):
    """``offload+locret``: evicted tokens go to host RAM (at ``kv_dtype``'s host precision: ``host=int4``);
    ``decode`` attends the budget or everything."""

    decode: str = "budget"  # "budget": the device-resident tokens only; "exact": host tokens too
    group_heads: int | None = None  # heads streamed back per step in prefill (None: automatic)
    release: bool = False  # free the host tier once the prompt is prefilled: what follows sees the budget only
    prefill: str = field(default="exact", init=False)  # always: every evicted token stays in the host tier

    host_tier: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decode not in ("budget", "exact"):
            raise HeadspaceError(f"decode must be 'budget' or 'exact', got '{self.decode}'")
        object.__setattr__(self, "release", parse_switch(self.release, "release"))
        if self.decode == "exact" and (self.merge or self.release):
            raise HeadspaceError("decode='exact' attends every evicted token whole from host RAM, so "
                                 f"{'merge' if self.merge else 'release'} has nothing to do; use decode='budget'")
        if self.group_heads is not None and self.group_heads < 1:
            raise HeadspaceError(f"group_heads must be at least 1, got {self.group_heads}")


@dataclass
class BudgetSettings:
    """Shared by every layer of one cache."""

    budget: int  # tokens per KV head: the mean over layers when ``layer_budgets`` spreads it
    stabilizer: int
    sink: int
    decode_exact: bool = False
    layer_budgets: dict[int, int] = field(default_factory=dict)  # per layer index, where the policy spreads it
    prompt_tokens: int | None = None  # where the prompt ends (policies that compress once, at its end)
    once: bool = False  # every policy compresses once, at the prompt's end
    merge: int = 0  # positions per summary block of evicted tokens (0: evicted tokens are dropped)
    release: bool = False  # the host tier (an exact prefill's, or offload+locret's) is freed at the prompt's end

    def budget_of(self, layer: int) -> int:
        return self.layer_budgets.get(layer, self.budget)


def split_options(policy: str, options: dict, offload: bool = False) -> tuple[BudgetOptions, dict]:
    """``options`` as the budget's typed options and the policy's fields; anything else is refused."""
    kind = OffloadBudgetOptions if offload else BudgetOptions
    budget_names = [f.name for f in fields(kind) if f.init]
    policy_names = policy_fields(POLICIES[policy]) if policy in POLICIES else []
    unknown = sorted(set(options) - set(budget_names) - set(policy_names))
    if unknown:
        raise HeadspaceError(f"option(s) {', '.join(unknown)} not taken by eviction with policy '{policy}'"
                             f"{' and offload' if offload else ''}; it takes: {', '.join(budget_names + policy_names)}")
    given = {k: v for k, v in options.items() if k in budget_names}
    if not offload and policy in POLICIES:
        given = {**POLICIES[policy].budget_defaults(given), **given}
    return kind(**given), {k: v for k, v in options.items() if k in policy_names}


def held_tokens(policy: Policy, budget: int, chunk_size: int, prompt_tokens: int | None, once: bool = False) -> int:
    """The most tokens per KV head a budgeted layer stores at once: the budget and a chunk, or, for a policy that
    compresses once, the whole prompt until its last chunk (the layer reserves it up front, so the store never
    grows past it)."""
    held = budget + chunk_size
    if (once or policy.compress_once) and prompt_tokens:
        held = max(held, prompt_tokens)
    return held


def summary_bytes(shape: ModelShape, tokens: int, merge: int) -> int:
    """Device bytes of the summaries of evicted tokens (float32 key and value sums and a count per KV head and
    block of ``merge`` positions) for ``tokens`` positions; 0 without ``merge``."""
    if not merge:
        return 0
    blocks = -(-tokens // merge)
    return len(shape.full_attention_layers) * shape.kv_heads * blocks * (2 * shape.head_dim + 1) * 4


class BudgetLayer(HeadspaceLayer):
    """A full-attention layer that keeps at most ``budget`` tokens per KV head on the device.

    Per stored token it keeps the position (``positions``, ``(B, Hk, n)``) and the
    policy's score (``scores``). With ``host`` (``offload+locret``), evicted tokens
    are written to a :class:`~headspace.tiers.HostKV` instead of being dropped.
    ``precision`` says how ``store`` (the budget) and ``host`` keep them: a quantized
    device tier stores rows of bytes, and the newest chunk waits in ``chunk``, as
    computed, until the layer has attended it.
    """

    def __init__(self, index: int, policy: Policy, settings: BudgetSettings, chunk_size: int,
                 transfers: Transfers | None = None, group_heads: int = 1, block_tokens: int = 1024,
                 precision: KVPrecision = EXACT_KV):
        super().__init__()
        self.index, self.policy, self.settings = index, policy, settings
        self.budget = settings.budget_of(index)
        self.chunk_size = chunk_size
        self.transfers, self.group_heads, self.block_tokens = transfers, group_heads, block_tokens
        self.scheme, self.host_scheme = precision.scheme("gpu"), precision.scheme("host")
        self.store: DeviceKV | None = None
        self.chunk: tuple[torch.Tensor, torch.Tensor] | None = None  # the newest keys and values, as computed
        self.host: HostKV | QuantizedKV | None = None
        self.host_positions: list[torch.Tensor] = []
        self.positions = self.scores = None
        self.summaries: Summaries | None = None
        self.written: torch.cuda.Event | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        self.heads, self.head_dim = heads, dim
        if self.scheme.exact:
            self.store = DeviceKV(batch, heads, dim, self.dtype, self.device)
        else:
            self.store = DeviceKV(batch, heads, self.scheme.width(dim), torch.uint8, self.device)
        self.store.reserve(held_tokens(self.policy, self.budget, self.chunk_size, self.settings.prompt_tokens,
                                       self.settings.once))
        self.positions = torch.empty(batch, heads, 0, dtype=torch.long, device=self.device)
        self.scores = torch.empty(batch, heads, 0, dtype=torch.float32, device=self.device)
        if self.settings.merge:
            self.summaries = Summaries.empty(batch, heads, dim, self.settings.merge, self.device)
        if self.transfers is not None:
            scheme = self.host_scheme
            if scheme.exact:
                self.host = HostKV(batch, heads, dim, self.dtype, self.transfers.cuda, self.block_tokens)
            else:  # blocks of whole groups: rows are written a group at a time
                block = -(-self.block_tokens // scheme.group) * scheme.group
                rows = HostKV(batch, heads, scheme.width(dim), torch.uint8, self.transfers.cuda, block)
                self.host = QuantizedKV(scheme, rows, dim, self.dtype, self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, chunk, _ = key_states.shape
        if self.scheme.exact:
            self.store.append(key_states, value_states)
        else:
            self.store.append(self.scheme.quantize(key_states, keys=True),
                              self.scheme.quantize(value_states, keys=False))
            self.chunk = (key_states, value_states)
        new = torch.arange(self.length, self.length + chunk, device=self.device)
        self.positions = torch.cat([self.positions, new.expand(batch, heads, chunk)], dim=-1)
        self.length += chunk
        return key_states, value_states

    # -- attention --------------------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, scaling: float, staging: Staging, phase: Phase) -> torch.Tensor:
        decoding = phase is Phase.DECODE
        if decoding and self.store.capacity > self.budget + DECODE_ROOM:
            self.shrink(self.budget + DECODE_ROOM)
        keys, values = self.attended()
        exact = self.host is not None and self.host.length > 0 and (not decoding or self.settings.decode_exact)
        if exact:
            out = self.attend_with_host(query, scaling, staging, keys, values)
        elif self.summaries is not None and self.summaries.any:
            summary = biased_attention_lse(query, *self.summaries.attended(), scaling)
            out = merge_lse([causal_attention_lse(query, keys, values, scaling), summary])[0].to(query.dtype)
        else:
            out = causal_attention(query, keys, values, scaling)
        chunk = query.shape[2]
        self.scores = self.policy.score(ScoreInputs(self.index, query, keys, values, self.positions, self.scores,
                                                    self.length - chunk, scaling))
        if not self.holding_prompt(decoding):
            self.evict(keys, values)
            if not decoding and self.store.capacity > self.budget + self.chunk_size:  # the prompt held by once
                self.shrink(self.budget + self.chunk_size)
        if self.host is not None and self.settings.release and (decoding or self.prompt_done):
            self.release_host()
        return out

    @property
    def prompt_done(self) -> bool:
        """Whether the prompt's last chunk has been attended (always, when the cache was not told its length)."""
        return self.length >= (self.settings.prompt_tokens or 0)

    def release_host(self) -> None:
        """Free the host tier (``release``): the prompt was attended exactly, and what it evicted is now only in
        the summaries (``merge``), or gone; later chunks and decode see the device budget, as in ``locret``."""
        self.released_host_bytes = max(self.released_host_bytes, self.host_bytes)
        self.host, self.host_positions, self.written = None, [], None

    def attended(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token as attention reads it: the store itself when exact; else its rows before the newest
        chunk dequantized into a working copy (this layer's only, freed after its attention), then the chunk as
        the model computed it."""
        if self.scheme.exact:
            return self.store.view()
        rows, values_rows = self.store.view()
        chunk_keys, chunk_values = self.chunk
        self.chunk = None
        older = rows.shape[2] - chunk_keys.shape[2]
        keys = torch.empty(*rows.shape[:3], self.head_dim, dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        keys[:, :, :older] = self.scheme.dequantize(rows[:, :, :older], True, self.head_dim, self.dtype)
        values[:, :, :older] = self.scheme.dequantize(values_rows[:, :, :older], False, self.head_dim, self.dtype)
        keys[:, :, older:], values[:, :, older:] = chunk_keys, chunk_values
        return keys, values

    def holding_prompt(self, decoding: bool) -> bool:
        """Whether a compress-once policy still keeps every token: until the prompt's last chunk is scored."""
        once = self.policy.compress_once or self.settings.once
        return once and not decoding and not self.prompt_done

    def attend_with_host(self, query: torch.Tensor, scaling: float, staging: Staging,
                         keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attention over the host tokens followed by the device ones (order is irrelevant to attention)."""
        batch, q_heads, chunk, dim = query.shape
        ratio = q_heads // self.heads
        offloaded, resident = self.host.length, keys.shape[2]
        total = offloaded + resident
        quantized = isinstance(self.host, QuantizedKV)
        fetched = self.host.quantized if quantized else offloaded  # the rest of the host tokens are on the device
        out = torch.empty(batch, q_heads, chunk, dim, dtype=query.dtype, device=query.device)
        groups = head_groups(self.heads, self.group_heads)
        for i, heads in enumerate(groups):
            slot = staging.acquire(self.host, heads, fetched, total, self.written)
            if i + 1 < len(groups):
                staging.fetch(self.host, groups[i + 1], fetched, total, self.written, staging.other)
            width = heads.stop - heads.start
            k, v = slot.keys[:, :width, :total], slot.values[:, :width, :total]
            if quantized:
                k[:, :, fetched:offloaded] = self.host.recent[0][:, heads]
                v[:, :, fetched:offloaded] = self.host.recent[1][:, heads]
            k[:, :, offloaded:] = keys[:, heads]
            v[:, :, offloaded:] = values[:, heads]
            q = slice(heads.start * ratio, heads.stop * ratio)
            out[:, q] = causal_attention(query[:, q], k, v, scaling)
            staging.release(slot)
        return out

    def shrink(self, tokens: int) -> None:
        """Give back room no longer needed: the whole prompt's, once ``once`` has compressed it (a kept document
        then holds its budget and a chunk), and the prefill chunk's once decoding (one token per step)."""
        store = DeviceKV(*self.store.shape, self.store.dtype, self.device)
        store.reserve(max(tokens, self.store.length))
        store.append(*self.store.view())
        self.store = store

    # -- eviction ---------------------------------------------------------------------------------------
    def evict(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Cut every KV head back to ``budget`` tokens: the stabilizer window and sinks, then the best scores.
        ``keys``/``values``: every stored token as attended, which evicted tokens go to the host tier as."""
        stored, budget = self.store.length, self.budget
        if stored <= budget:
            return
        forced = (self.positions >= self.length - self.settings.stabilizer) | (self.positions < self.settings.sink)
        ranked = self.scores.float().masked_fill(forced, float("inf"))
        top = ranked.topk(budget, dim=-1).indices
        kept = torch.zeros_like(self.positions, dtype=torch.int8).scatter_(-1, top, 1)
        order = torch.sort(kept, dim=-1, stable=True).indices  # evicted first, then kept, each in position order
        drop, keep = order[..., : stored - budget], order[..., stored - budget :]
        if self.summaries is not None or self.host is not None:  # the evicted tokens, gathered once for both
            index = drop.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            evicted, positions = (keys.gather(2, index), values.gather(2, index)), self.positions.gather(-1, drop)
            if self.summaries is not None:
                self.summaries.add(positions, *evicted)
            if self.host is not None:
                if isinstance(self.host, QuantizedKV):
                    self.host.append(*evicted)
                    rows = self.host.take_groups()
                    if rows is not None:
                        self.host.rows.write(*rows)
                else:
                    self.host.write(*evicted)
                self.written = self.transfers.mark()
                self.host_positions.append(positions.cpu())
        self.store.keep(keep)
        self.positions = self.positions.gather(-1, keep)
        self.scores = self.scores.gather(-1, keep)

    @property
    def stored(self) -> int:
        return self.store.length if self.store is not None else 0

    @property
    def device_bytes(self) -> int:
        recent = self.host.recent_bytes if isinstance(self.host, QuantizedKV) else 0
        summaries = self.summaries.nbytes if self.summaries is not None else 0
        return (self.store.nbytes if self.store is not None else 0) + recent + summaries

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes if self.host is not None else 0


# -- building caches ------------------------------------------------------------------------------------
def budget_cache(
    model: PreTrainedModel,
    policy: str | Policy = "locret",
    prompt_tokens: int | None = None,
    chunk_size: int = 1024,
    offload: bool = False,
    group_heads: int = 1,
    block_tokens: int | None = None,
    **options,
) -> HeadspaceCache:
    """A cache keeping a budget of tokens per KV head of each full-attention layer, chosen by ``policy``.

    ``options`` are :class:`BudgetOptions` fields (``budget`` or ``compression``, ``stabilizer``,
    ``sink``, ``kv_dtype``; with ``offload``, :class:`OffloadBudgetOptions`' ``decode``) and, when ``policy``
    is a name, the policy's own fields. ``prompt_tokens`` resolves ``compression``.
    ``offload=True`` keeps evicted tokens in host memory (the ``offload+locret`` semantics in
    the module docstring), streamed back ``group_heads`` at a time; host memory grows in
    blocks of ``block_tokens`` (default: what the prompt evicts plus 1024).
    """
    name = policy if isinstance(policy, str) else policy.name
    budget_options, policy_options = split_options(name, options, offload)
    template = make_policy(policy, **policy_options) if isinstance(policy, str) else policy
    budget = budget_options.resolve(prompt_tokens)
    if group_heads < 1:
        raise HeadspaceError(f"group_heads must be at least 1, got {group_heads}")
    decode_exact = getattr(budget_options, "decode", "budget") == "exact"
    host = budget_options.prefill == "exact"  # offload+locret, or an exact prefill whose evicted tokens wait there
    release = getattr(budget_options, "release", True)  # that wait ends with the prompt, unless the mode keeps them
    shape = ModelShape.of(model.config)
    kept = budget_options.stabilizer + budget_options.sink
    spread = {}  # a prompt within the budget is kept whole by every layer, whatever the policy's spread
    if prompt_tokens is None or budget < prompt_tokens:
        spread = template.layer_budgets(budget, shape.full_attention_layers, kept)
    settings = BudgetSettings(budget, budget_options.stabilizer, budget_options.sink, decode_exact, spread,
                              prompt_tokens, budget_options.once, budget_options.merge, release)
    if block_tokens is None:  # host blocks: what the prompt will evict, plus room for decode
        block_tokens = max((prompt_tokens or 0) - budget, 0) + 1024
    device = model.device
    transfers = Transfers(device)
    chosen = template.prepare(model)  # one policy object per cache: shared state (random generator) across layers
    layers: list[HeadspaceLayer] = [
        WindowLayer(window) if window is not None
        else BudgetLayer(index, chosen, settings, chunk_size, transfers if host else None, group_heads,
                         block_tokens, budget_options.precision)
        for index, window in enumerate(shape.windows)
    ]
    cache = HeadspaceCache(layers, Staging(transfers, device, model.dtype))
    cache.settings = settings
    return cache
