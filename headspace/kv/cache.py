"""The head-wise offloaded KV cache, built on transformers' public Cache API.

Each full-attention layer keeps its first ``gpu_heads`` KV heads on the compute
device (each layer its own count: a placement plan fills the device head by head)
and the others in host memory (pinned with CUDA). Sliding-window layers
are bounded by their window, so they stay on the device. ``update`` stores a
chunk; the attention function then calls :meth:`HeadspaceCache.attend`, which
computes attention head group by head group while the next group, or the next
layer's first group, is being copied in.

The phase (prefill or decode) is set by whoever drives the model: the engine sets
:attr:`HeadspaceCache.phase` before every forward call. When something else drives
it (``model.generate``), the cache decides once per forward call, at its first
layer: one new token after a stored prefix is decode.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from headspace.attention.hook import active_cache
from headspace.errors import HeadspaceError
from headspace.kv.layers import HeadspaceLayer, OffloadLayer, Phase, WindowLayer
from headspace.kv.quant.precision import EXACT_KV, KVPrecision
from headspace.kv.split import SHARE_STEPS, SplitSearch, layer_share, measured_rates, predicted_split
from headspace.kv.static import StaticDecode
from headspace.kv.streaming import Staging, Transfers
from headspace.shape import ModelShape
from headspace.units import parse_memory_cap


@dataclass(frozen=True)
class OffloadOptions:
    """Where the KV heads of full-attention layers live (the ``offload`` mode's options).

    ``gpu_heads``: KV heads resident on the device: ``"auto"`` (as many as fit, planned by
    :mod:`headspace.placement` when the cache is made), one count for every full-attention
    layer, or a tuple of one count per full-attention layer. ``group_heads``: offloaded heads
    streamed per step (None: the most whose double buffer fits in 1 GiB). ``cpu_heads``:
    offloaded heads attended on the host CPU in decode, counted in the layer that offloads the
    most (layers that offload fewer attend the same share of theirs), or ``"auto"`` to find the
    fastest number by timing the first decode steps. ``gpu_memory``: a cap on the device memory
    the run holds, weights included, for the ``"auto"`` plan and the fit check: bytes
    (``20 * 2**30``, ``"20GiB"``) or a fraction of the device (``0.5``). ``kv_dtype``: the precision
    each tier stores KV in (:class:`~headspace.kv.quant.precision.KVPrecision`): ``"bf16"`` (exact, the
    default), ``"int4"`` (both tiers), ``"host=int4"``, ``"gpu=fp8,host=int4"``; kept as its canonical text.
    """

    gpu_heads: int | str | tuple[int, ...] = "auto"
    group_heads: int | None = None
    cpu_heads: int | str = 0
    gpu_memory: int | float | str | None = None
    kv_dtype: str = "bf16"

    def __post_init__(self) -> None:
        if isinstance(self.gpu_heads, list):
            object.__setattr__(self, "gpu_heads", tuple(self.gpu_heads))
        object.__setattr__(self, "kv_dtype", str(KVPrecision.parse(self.kv_dtype)))

    @property
    def precision(self) -> KVPrecision:
        return KVPrecision.parse(self.kv_dtype)

    def check(self, shape: ModelShape) -> None:
        """Refuse options this model cannot have, with a message that says what to pass."""
        resident = () if self.gpu_heads == "auto" else self.layer_gpu_heads(shape)
        most = shape.kv_heads - min(resident, default=0)  # the most heads a layer offloads (any, for "auto")
        if self.group_heads is not None and self.group_heads < 1:
            raise HeadspaceError(f"group_heads must be at least 1, got {self.group_heads}")
        if self.cpu_heads != "auto" and (isinstance(self.cpu_heads, str) or not 0 <= self.cpu_heads <= most):
            raise HeadspaceError(
                f"cpu_heads must be 'auto' or between 0 and {most} (the offloaded heads), got {self.cpu_heads}")
        if self.gpu_memory is not None:
            parse_memory_cap(self.gpu_memory)

    def layer_gpu_heads(self, shape: ModelShape) -> tuple[int, ...]:
        """The resident heads of each full-attention layer, for a count or a tuple (``"auto"`` is planned
        elsewhere: :func:`headspace.placement.place`)."""
        heads, layers = self.gpu_heads, shape.full_layers
        if heads == "auto":
            raise HeadspaceError("gpu_heads='auto' is planned when the engine makes a cache; give offload_cache a "
                                 "count or one count per full-attention layer")
        if isinstance(heads, int) and not isinstance(heads, bool):
            heads = (heads,) * layers
        elif not isinstance(heads, tuple) or not all(isinstance(h, int) for h in heads):
            raise HeadspaceError(f"gpu_heads must be 'auto', a count, or one count per full-attention layer; "
                                 f"got {self.gpu_heads!r}")
        elif len(heads) != layers:
            raise HeadspaceError(f"gpu_heads gives {len(heads)} counts but the model has {layers} full-attention "
                                 f"layers")
        for count in heads:
            if not 0 <= count <= shape.kv_heads:
                raise HeadspaceError(f"gpu_heads must be between 0 and {shape.kv_heads} (the model's KV heads per "
                                     f"layer), got {count}")
        return heads

    @property
    def memory_cap(self) -> int | float | None:
        """``gpu_memory`` read: bytes (int), a fraction of the device (float), or None."""
        return None if self.gpu_memory is None else parse_memory_cap(self.gpu_memory)


def parse_gpu_heads(text: str) -> int | str | tuple[int, ...]:
    """``gpu_heads`` written out: ``auto``, a count for every full-attention layer, or one count per
    full-attention layer (``5,5,6``)."""
    text = text.strip()
    if text == "auto":
        return text
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise HeadspaceError(f"invalid gpu_heads '{text}': give 'auto', a count, or one count per full-attention "
                             f"layer (5,5,6,...)") from None
    if any(count < 0 for count in counts):
        raise HeadspaceError(f"invalid gpu_heads '{text}': counts must be at least 0")
    return counts if "," in text else counts[0]


class HeadspaceCache(Cache):
    """A transformers ``Cache`` whose layers decide where KV lives and compute attention over it."""

    def __init__(self, layers: list[HeadspaceLayer], staging: Staging, split: SplitSearch | None = None):
        super().__init__(layers=layers)
        self.staging = staging
        self.phase: Phase | None = None  # set by the engine; None: decided per forward call (see module doc)
        self._forward_phase = Phase.PREFILL
        self._stored: tuple[int, torch.Tensor] | None = None
        self.split = split  # searching the host/PCIe split of decode ("auto" cpu_heads)
        self._offload_layers = [layer for layer in layers if isinstance(layer, OffloadLayer)]
        offloading = [i for i, layer in enumerate(layers) if isinstance(layer, OffloadLayer) and layer.offloaded]
        self._first_offloaded = offloading[0] if offloading else None
        self._next_streamed: dict[Phase, dict[int, int]] = {}
        self._link()
        self._step_started: float | None = None
        self.static: StaticDecode | None = None  # the static form of decode, once begun (see begin_static)

    @torch.compiler.disable  # compiled layers (engine.graphs.CompiledLayers) break here: the cache stays eager
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.static is not None and self.static.running:
            self.layers[layer_idx].update_static(key_states, value_states, self.static)
            self._stored = (layer_idx, key_states)
            active_cache.set(weakref.ref(self))
            return key_states, value_states
        if layer_idx == 0:
            self._forward_phase = self.phase or (
                Phase.DECODE if key_states.shape[2] == 1 and self.get_seq_length() > 0 else Phase.PREFILL)
        decoding = self._forward_phase is Phase.DECODE
        if layer_idx == self._first_offloaded and decoding and self.split and not self.split.done:
            self._time_split_step(key_states.device)
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        self._stored = (layer_idx, keys)
        active_cache.set(weakref.ref(self))
        return keys, values

    def _time_split_step(self, device: torch.device) -> None:
        """A decode step begins: time the one before it (the first, a warm-up, only starts the clock) and set
        the split the search asks for next."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # while searching only: the previous step must really be over
        now = time.perf_counter()
        if self._step_started is not None:
            self.set_split(self.split.record(now - self._step_started))
        self._step_started = now

    def set_split(self, value: int) -> None:
        """Take the host/PCIe split ``value`` of the search: a host share of positions in steps of
        1/``split.most`` in every layer, or host heads (:meth:`set_cpu_heads`)."""
        if self.split is not None and self.split.shares:
            for layer in self._offload_layers:
                layer.set_host_share(value / self.split.most)
        else:
            self.set_cpu_heads(value)

    def set_cpu_heads(self, cpu_heads: int) -> None:
        """Attend ``cpu_heads`` offloaded heads on the host in decode in the layer that offloads the most, and
        the same share of their own in the others (:func:`~headspace.kv.split.layer_share`)."""
        most = max((layer.offloaded for layer in self._offload_layers), default=0)
        for layer in self._offload_layers:
            layer.set_cpu_heads(layer_share(cpu_heads, layer.offloaded, most))
        self._link()

    def _link(self) -> None:
        """For each layer that streams heads in a phase, the next one that does (cyclically): the layer whose
        first group it prefetches while its own last group is attended."""
        for phase in Phase:
            streaming = [i for i, layer in enumerate(self.layers)
                         if isinstance(layer, OffloadLayer) and layer.streamed(phase)]
            self._next_streamed[phase] = dict(zip(streaming, streaming[1:] + streaming[:1]))

    def holds(self, layer_idx: int, keys: torch.Tensor) -> bool:
        """Whether ``keys`` are what this cache just returned for ``layer_idx``."""
        return self._stored is not None and self._stored[0] == layer_idx and self._stored[1] is keys

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        self._stored = None
        layer = self.layers[layer_idx]
        if self.static is not None and self.static.running:
            return layer.attend_static(query, scaling, self.static)
        if isinstance(layer, OffloadLayer):
            nxt = self._next_streamed[self._forward_phase].get(layer_idx)
            return layer.attend(query, scaling, self.staging, self._forward_phase,
                                after=self.layers[nxt] if nxt is not None else None)
        out = layer.attend(query, scaling, self.staging, self._forward_phase)
        # every host tier was released (offload+locret's release): nothing is left to stream. ``any`` stops at the
        # first layer holding host memory, so an offloading cache's decode step pays one layer's check, not all
        last = layer_idx == len(self.layers) - 1
        if last and self.staging.slots and not any(other.host_bytes for other in self.layers):
            self.staging.free()
        return out

    # -- the static form of decode (headspace.kv.static), which a CUDA graph can replay ----------------------
    @property
    def static_capable(self) -> bool:
        """Whether decode can take the static form: every KV head on the device (nothing streamed or attended
        on the host, which takes Python per token)."""
        return bool(self.layers) and all(layer.static_capable for layer in self.layers)

    def begin_static(self, tail: int) -> StaticDecode:
        """Fix the storage of the next decode steps: the positions stored now become the prefix, and up to
        ``tail`` more (fewer where the room reserved ends first, at least one) are written at the position
        :attr:`StaticDecode.position` holds. Run the steps inside :meth:`StaticDecode.step`, then count
        each with :meth:`advance_static`."""
        prefix = self.get_seq_length()
        if not self.static_capable or prefix == 0:
            raise HeadspaceError("the static form of decode needs every KV head on the device, after a prefill")
        tail = min([tail, *(layer.static_slots(prefix, tail) for layer in self._offload_layers)])
        device = next(layer.device for layer in self.layers)
        self.static = StaticDecode(device, prefix, tail)
        for layer in self.layers:
            layer.begin_static(self.static)
        return self.static

    def static_covers(self, static: StaticDecode) -> bool:
        """Whether the next decode step can run in ``static``: it is this cache's, the storage has not moved
        (nothing grew or rolled back past it) and every layer has a slot left."""
        return static is self.static and all(layer.static_covers(static) for layer in self.layers)

    def advance_static(self) -> None:
        """Count the position a static step stored, in every layer."""
        for layer in self.layers:
            layer.advance_static()

    def reserve(self, tokens: int) -> None:
        """Allocate storage for ``tokens`` positions up front: one host block per layer, no growth later."""
        for layer in self.layers:
            if isinstance(layer, OffloadLayer):
                layer.reserve(tokens)
        self.staging.reserve(tokens)

    @property
    def device_kv_bytes(self) -> int:
        return sum(layer.device_bytes for layer in self.layers) + self.staging.nbytes

    @property
    def host_kv_bytes(self) -> int:
        return sum(layer.host_bytes for layer in self.layers)

    @property
    def released_host_kv_bytes(self) -> int:
        """Host bytes the layers held while the prompt was prefilled and freed at its end (an exact prefill's
        evicted tokens): at most what host RAM held at once, as the layers free theirs one after another."""
        return sum(layer.released_host_bytes for layer in self.layers)

    def describe(self) -> str | None:
        """Where the KV heads live and how decode attends them, in one line (None without offloaded layers)."""
        layers = self._offload_layers
        if not layers:
            return None
        return describe_heads(layers[0].device, layers[0].heads, [layer.gpu_heads for layer in layers],
                              max(min(layer.group_heads, layer.offloaded) for layer in layers),
                              [layer.cpu_heads for layer in layers], len(self.layers) - len(layers),
                              searched=self.split is not None, precision=layers[0].precision,
                              host_share=max(layer.host_share for layer in layers))

    def rolled_back(self) -> None:
        """Positions were taken back (a kept document after a question): forget what the staging slots hold
        and when the last decode step started, which belong to the tokens taken away."""
        self.staging.forget()
        self._stored = None
        self._step_started = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise HeadspaceError("beam search is not supported with a headspace cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise HeadspaceError("cropping (assisted decoding) is not supported with a headspace cache")


def kv_bytes(cache: Cache) -> tuple[int, int]:
    """(device, host) bytes of storage held by ``cache``: what dropping it gives back, including room
    reserved beyond the positions in use."""
    if isinstance(cache, HeadspaceCache):
        return cache.device_kv_bytes, cache.host_kv_bytes
    storages = {}  # a transformers layer's keys may be a view (after ``crop``): count each storage once
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()), 0


def offload_cache(shape: ModelShape, device: torch.device, dtype: torch.dtype, options: OffloadOptions,
                  group_heads: int, block_tokens: int = 16384,
                  rates: tuple[float, float] | None = None) -> HeadspaceCache:
    """A cache that keeps ``options.gpu_heads`` KV heads of each full layer on ``device`` (one count for all,
    or one per full-attention layer) and streams the rest from host memory, ``group_heads`` at a time. The
    engine plans ``"auto"`` heads and an automatic group size before calling this.

    In decode, ``options.cpu_heads`` of the offloaded heads (in the layer that offloads the most) are
    attended on the host CPU instead of streamed. ``"auto"`` finds the fastest split by timing the first
    decode steps, starting where the host's attention rate and the PCIe rate balance (``rates``: those two
    in bytes/s; measured on this machine when not given): with an exact host tier, a share of the positions
    of every offloaded head in steps of 1/:data:`~headspace.kv.split.SHARE_STEPS`, otherwise host heads. A plan
    that offloads nothing has nothing to split: its cache has no search, and decodes exactly as with
    ``cpu_heads=0``.
    """
    options.check(shape)
    if group_heads < 1:
        raise HeadspaceError(f"group_heads must be at least 1, got {group_heads}")
    resident = iter(options.layer_gpu_heads(shape))
    transfers = Transfers(device)
    layers: list[HeadspaceLayer] = [
        WindowLayer(window) if window is not None
        else OffloadLayer(transfers, device, dtype, shape.kv_heads, shape.head_dim, next(resident), group_heads,
                          block_tokens, precision=options.precision)
        for window in shape.windows
    ]
    most = max((layer.offloaded for layer in layers if isinstance(layer, OffloadLayer)), default=0)
    split = None
    if options.cpu_heads == "auto" and most:
        host_rate, pcie_rate = rates or measured_rates(device)
        shares = options.precision.scheme("host").exact
        units = SHARE_STEPS if shares else most
        split = SplitSearch(units, start=predicted_split(units, host_rate, pcie_rate), shares=shares)
    cache = HeadspaceCache(layers, Staging(transfers, device, dtype), split)
    if split is not None:
        cache.set_split(split.current)
    else:
        cache.set_cpu_heads(0 if options.cpu_heads == "auto" else options.cpu_heads)
    return cache


def describe_heads(device: torch.device, kv_heads: int, gpu_heads: Sequence[int], group_heads: int,
                   cpu_heads: Sequence[int] = (), windows: int = 0, searched: bool = False,
                   precision: KVPrecision = EXACT_KV, host_share: float = 0.0) -> str:
    """One line on where the KV heads of the full-attention layers live (``gpu_heads`` per layer on
    ``device``, the rest in host RAM, streamed ``group_heads`` at a time), what of the offloaded ones decode
    attends on the host CPU (``cpu_heads`` per layer, and the first ``host_share`` of the positions of the
    streamed ones; ``searched``: found by timing) and the ``precision`` of the tiers when not exact."""
    where = "the GPU" if device.type == "cuda" else f"the {device.type} device"
    total, resident = kv_heads * len(gpu_heads), sum(gpu_heads)
    parts = [f"{resident} of {total} KV heads on {where} ({_span(gpu_heads)} per layer)"]
    if resident < total:
        parts.append(f"{total - resident} in host RAM ({_span(kv_heads - g for g in gpu_heads)} per layer), "
                     f"streamed {group_heads} at a time")
    found = ", split found by timing" if searched else ""
    if sum(cpu_heads):
        parts.append(f"decode attends {sum(cpu_heads)} of them on the host CPU ({_span(cpu_heads)} per layer{found})")
    if host_share:
        parts.append(f"decode attends the first {host_share:.0%} of the positions of each streamed head on the host "
                     f"CPU{found}")
    if windows:
        parts.append(f"{windows} sliding-window layers on the device")
    if not precision.exact:
        parts.append(f"KV stored {precision}" + (" in both tiers" if precision.gpu == precision.host else ""))
    return "; ".join(parts)


def _span(counts: Iterable[int]) -> str:
    """``5`` when every count is 5, ``5-6`` when they range over 5 and 6."""
    counts = list(counts)
    low, high = min(counts, default=0), max(counts, default=0)
    return str(low) if low == high else f"{low}-{high}"
