"""The modes an engine runs in: an attention implementation, typed options, and a cache factory.

``full`` is plain transformers (SDPA and ``DynamicCache``), the reference every other
mode is checked against; ``offload`` is head-wise KV offloading (:class:`OffloadOptions`);
``hf-offload`` is transformers' own layer-wise offloading, a baseline. Every eviction
policy in :data:`~headspace.eviction.policies.POLICIES` is a budgeted mode of the same
name (:class:`BudgetOptions` plus the policy's fields), and ``offload+locret`` keeps
Locret's evicted tokens in host RAM. Each mode parses its options once, when the
engine is made, and refuses any it does not take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from headspace.attention.hook import ATTENTION_NAME
from headspace.errors import HeadspaceError
from headspace.eviction.budget import budget_cache, held_tokens, split_options, summary_bytes
from headspace.eviction.policies import POLICIES, make_policy
from headspace.kv.cache import OffloadOptions, offload_cache
from headspace.models import weight_bytes
from headspace.placement import (
    Placement,
    auto_group_heads,
    budget_bytes,
    check_full,
    check_host_ram,
    place,
    plan,
    probe,
)
from headspace.shape import ModelShape


@dataclass(frozen=True)
class CacheRequest:
    """What a cache factory needs: the model, its shape, the mode's parsed options and the sizes."""

    model: PreTrainedModel
    shape: ModelShape
    options: Any  # what the mode's ``parse`` returned
    tokens: int  # positions to reserve room for (0: grow as needed)
    prompt_tokens: int | None  # the prompt's length, which a compression ratio resolves against
    chunk_size: int

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


@dataclass(frozen=True)
class Mode:
    """How a mode computes attention, which options it takes, and which cache it builds."""

    name: str
    attention: str  # the attention implementation transformers runs
    parse: Callable[[dict], Any]  # keyword options -> the mode's typed options (refusing unknown ones)
    make_cache: Callable[[CacheRequest], Cache]
    budgeted: bool = False  # keeps a budget of tokens per KV head (eviction)
    # (device, host) bytes a cache for the request will take, so kept documents can make room first (None: unknown)
    footprint: Callable[[CacheRequest], tuple[int, int]] | None = None
    documents: bool = True  # its caches can be rolled back: kept documents, prefix reuse, saving


MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> None:
    MODES[mode.name] = mode


def typed(kind: type, mode: str) -> Callable[[dict], Any]:
    """A parser building ``kind`` (a dataclass) from keyword options, refusing names it has no field for."""
    names = [f.name for f in dataclasses.fields(kind)]

    def parse(options: dict) -> Any:
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise HeadspaceError(f"mode '{mode}' takes no option(s) {', '.join(unknown)}; "
                                 f"it takes: {', '.join(names)}")
        return kind(**options)

    return parse


def no_options(mode: str) -> Callable[[dict], None]:
    def parse(options: dict) -> None:
        if options:
            raise HeadspaceError(f"mode '{mode}' takes no options, got {', '.join(sorted(options))}")

    return parse


def options_json(options: Any) -> dict:
    """A mode's parsed options (a dataclass, a tuple of them, or None) as JSON values: what a saved document
    records and a loading engine is compared with. Objects (retaining heads given in memory) become their type."""
    parts = options if isinstance(options, tuple) else (options,) if options is not None else ()
    values = {}
    for part in parts:
        for field in dataclasses.fields(part):
            if field.init:
                value = getattr(part, field.name)
                json_value = isinstance(value, (bool, int, float, str)) or value is None
                values[field.name] = value if json_value else f"<{type(value).__name__}>"
    return values


# -- full, offload, hf-offload -------------------------------------------------------------------------------
def _full_cache(request: CacheRequest) -> Cache:
    if request.tokens:
        check_full(request.shape, request.tokens, request.dtype, request.chunk_size,
                   probe(request.device, weight_bytes(request.model)))
    return DynamicCache(config=request.model.config)


def _full_footprint(request: CacheRequest) -> tuple[int, int]:
    return plan(request.shape, request.tokens, request.dtype, "full").device_kv_bytes, 0


def _offload_footprint(request: CacheRequest) -> tuple[int, int]:
    """(device, host) KV bytes the cache would take: the plan for this machine now, or, when nothing fits
    now (kept documents hold the memory), the plan with the fewest heads resident, which asks the most of host
    RAM: room made for it is room enough for any plan."""
    options: OffloadOptions = request.options
    try:
        placement = _placement(request)
    except HeadspaceError:
        placement = plan(request.shape, request.tokens, request.dtype, "offload", 0, options.group_heads,
                         request.chunk_size, options.precision)
    return placement.device_kv_bytes, placement.host_kv_bytes


def _placement(request: CacheRequest) -> Placement:
    options: OffloadOptions = request.options
    machine = probe(request.device, weight_bytes(request.model), options.memory_cap)
    return place(options, request.shape, request.tokens, request.dtype, request.chunk_size, machine)


def _offload_cache(request: CacheRequest) -> Cache:
    """Plan where the KV heads go (``gpu_heads="auto"`` fills the device), refuse what does not fit, then build."""
    options: OffloadOptions = request.options
    placement = _placement(request)
    cache = offload_cache(request.shape, request.device, request.dtype,
                          dataclasses.replace(options, gpu_heads=placement.gpu_heads), max(placement.group_heads, 1))
    cache.reserve(request.tokens)
    return cache


def _hf_offload_cache(request: CacheRequest) -> Cache:
    if request.device.type != "cuda":
        raise HeadspaceError("hf-offload (transformers' layer-wise offloading) needs a CUDA device")
    return DynamicCache(config=request.model.config, offloading=True)


register_mode(Mode("full", "sdpa", no_options("full"), _full_cache, footprint=_full_footprint))
register_mode(Mode("offload", ATTENTION_NAME, typed(OffloadOptions, "offload"), _offload_cache,
                   footprint=_offload_footprint))
register_mode(Mode("hf-offload", "sdpa", no_options("hf-offload"), _hf_offload_cache, documents=False))


# -- budgeted modes: one per eviction policy, and offload+locret ---------------------------------------------
def _budget_mode(policy: str, offload: bool = False) -> Mode:
    def parse(options: dict) -> tuple:
        budget_options, policy_options = split_options(policy, options, offload)
        return budget_options, make_policy(policy, **policy_options)

    def host_plan(request: CacheRequest) -> tuple[int, Placement]:
        """The head group size and the plan of a host tier that could take every token (offload+locret's, or the
        one an exact prefill holds the evicted tokens in until the prompt's end)."""
        options = request.options[0]
        group = getattr(options, "group_heads", None) or auto_group_heads(
            request.shape, request.tokens, request.dtype, 0, precision=options.precision)
        return group, plan(request.shape, request.tokens, request.dtype, "offload", 0, group,
                           precision=options.precision)

    def footprint(request: CacheRequest) -> tuple[int, int]:
        budget = request.options[0].resolve(request.prompt_tokens or request.tokens)
        held = held_tokens(request.options[1], budget, request.chunk_size, request.prompt_tokens,
                           request.options[0].once)
        device = budget_bytes(request.shape, held, request.dtype, request.chunk_size,  # reserved for a short prompt too
                              request.options[0].precision)
        device += summary_bytes(request.shape, request.tokens or request.prompt_tokens or 0, request.options[0].merge)
        return device, host_plan(request)[1].host_kv_bytes if request.options[0].prefill == "exact" else 0

    def make_cache(request: CacheRequest) -> Cache:
        budget_options, chosen = request.options
        group = 1
        if budget_options.prefill == "exact":  # a host tier: offload+locret's, or an exact prefill's until its end
            group, needs = host_plan(request)
            if offload:
                check_host_ram(needs.host_kv_bytes)
            else:
                check_host_ram(needs.host_kv_bytes, ways_out=f"{policy}'s exact prefill holds the evicted tokens "
                               f"there until the prompt's end: shorten the context, or prefill=chunked keeps none")
        fields = {f.name: getattr(budget_options, f.name) for f in dataclasses.fields(budget_options) if f.init}
        fields.pop("group_heads", None)  # resolved above
        return budget_cache(request.model, chosen, prompt_tokens=request.prompt_tokens,
                            chunk_size=request.chunk_size, offload=offload, group_heads=group, **fields)

    name = f"offload+{policy}" if offload else policy
    return Mode(name, ATTENTION_NAME, parse, make_cache, budgeted=True, footprint=footprint)


for _policy in POLICIES:
    register_mode(_budget_mode(_policy))
register_mode(_budget_mode("locret", offload=True))


def budgeted_modes() -> list[str]:
    return [name for name, mode in MODES.items() if mode.budgeted]
