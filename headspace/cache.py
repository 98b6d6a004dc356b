"""The head-wise offloaded KV cache, built on transformers' public Cache API.

Each full-attention layer keeps its first ``gpu_heads`` KV heads on the compute
device and the others in host memory (pinned with CUDA). Sliding-window layers
are bounded by their window, so they stay on the device. ``update`` stores a
chunk; the attention function then calls :meth:`HeadspaceCache.attend`, which
computes attention head group by head group while the next group, or the next
layer's first group, is being copied in.
"""

from __future__ import annotations

import functools
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from headspace.attention import active_cache, causal_attention, split_decode_attention
from headspace.errors import HeadspaceError
from headspace.split import SplitSearch
from headspace.streaming import Staging, Transfers
from headspace.tiers import DeviceKV, HostKV


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Per decoder layer, its sliding window, or None for full attention."""
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None) or [
        "sliding_attention" if window is not None else "full_attention"
    ] * text.num_hidden_layers
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise HeadspaceError(f"layer types {unknown} are not supported (only full and sliding-window attention)")
    return [window if kind == "sliding_attention" else None for kind in types]


def kv_heads_and_dim(config: PretrainedConfig) -> tuple[int, int]:
    """KV heads per layer and their size."""
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return heads, dim


def check_gpu_heads(config: PretrainedConfig, gpu_heads: int) -> int:
    """Refuse a ``gpu_heads`` the model cannot have; returns its KV heads per layer."""
    kv_heads, _ = kv_heads_and_dim(config)
    if not 0 <= gpu_heads <= kv_heads:
        raise HeadspaceError(
            f"gpu_heads must be between 0 and {kv_heads} (the model's KV heads per layer), got {gpu_heads}")
    return kv_heads


class HeadspaceLayer(CacheLayerMixin):
    """Common bookkeeping: ``length`` counts every position seen, stored or not."""

    is_compileable = False
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def attend(self, query: torch.Tensor, scaling: float, staging: Staging) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device_bytes(self) -> int:
        return 0

    @property
    def host_bytes(self) -> int:
        return 0


class WindowLayer(HeadspaceLayer):
    """A sliding-window layer: all heads on the device, at most ``window - 1`` past tokens kept."""

    is_sliding = True

    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.store: DeviceKV | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads, _, dim = key_states.shape
            self.store = DeviceKV(batch, heads, dim, self.dtype, self.device)
        self.store.keep_last(self.window - 1)
        self.store.append(key_states, value_states)
        self.length += key_states.shape[2]
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling: float, staging: Staging) -> torch.Tensor:
        keys, values = self.store.view()
        return causal_attention(query, keys, values, scaling, self.window)

    @property
    def device_bytes(self) -> int:
        return self.store.nbytes if self.store is not None else 0


class OffloadLayer(HeadspaceLayer):
    """A full-attention layer split by KV head between the device and host memory."""

    def __init__(self, transfers: Transfers, device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int,
                 gpu_heads: int, group_heads: int, block_tokens: int, cpu_heads: int = 0):
        super().__init__()
        self.transfers = transfers
        self.device, self.dtype, self.heads, self.head_dim = device, dtype, kv_heads, head_dim
        self.gpu_heads, self.group_heads, self.block_tokens = gpu_heads, group_heads, block_tokens
        self.batch: int | None = None  # storage is allocated for this batch size
        self.resident: DeviceKV | None = None
        self.host: HostKV | None = None
        offloaded, step = kv_heads - gpu_heads, group_heads
        self.groups = [slice(i, min(i + step, offloaded)) for i in range(0, offloaded, step)]  # streamed in prefill
        self.set_cpu_heads(cpu_heads)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # device-to-host writes: ``written`` of the latest chunk, ``settled`` of those before it. Reads of the
        # positions before the latest chunk only need the older ones, so they need not wait for this layer's KV.
        self.written: torch.cuda.Event | None = None
        self.settled: torch.cuda.Event | None = None
        self.reserved = 0

    def set_cpu_heads(self, cpu_heads: int) -> None:
        """Attend the last ``cpu_heads`` offloaded heads on the host in decode; stream the others."""
        offloaded, step = self.heads - self.gpu_heads, self.group_heads
        self.cpu_heads = min(cpu_heads, offloaded)
        streamed = offloaded - self.cpu_heads
        self.decode_groups = [slice(i, min(i + step, streamed)) for i in range(0, streamed, step)]

    def allocate(self, batch: int) -> None:
        """Create the device and host stores for ``batch`` sequences, with room for the reserved positions."""
        self.batch = batch
        if self.gpu_heads:
            self.resident = DeviceKV(batch, self.gpu_heads, self.head_dim, self.dtype, self.device)
        if self.groups:
            self.host = HostKV(batch, self.heads - self.gpu_heads, self.head_dim, self.dtype, self.transfers.cuda,
                               self.block_tokens)
        self.reserve(self.reserved)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        if (heads, dim) != (self.heads, self.head_dim):
            raise HeadspaceError(f"the cache was built for {self.heads} KV heads of size {self.head_dim}, "
                                 f"the model gave {heads} of size {dim}")
        allocated = (self.batch, self.dtype, self.device)
        super().lazy_initialization(key_states, value_states)
        if (batch, self.dtype, self.device) != allocated:
            self.allocate(batch)

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` positions; allocated (and pinned) now, for one sequence unless a batch was seen.

        Pinning host memory takes a while (about 0.1 s per GiB): doing it here keeps it out of
        the first prefill chunk, and fails early if the memory is not there.
        """
        self.reserved = max(self.reserved, tokens)
        if self.batch is None:
            self.allocate(1)
            return
        if self.resident is not None:
            self.resident.reserve(tokens)
        if self.host is not None:
            self.host.reserve(tokens)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        g = self.gpu_heads
        if self.resident is not None:
            self.resident.append(key_states[:, :g], value_states[:, :g])
        if self.host is not None:
            keys, values = key_states[:, g:].contiguous(), value_states[:, g:].contiguous()
            d2h = self.transfers.d2h
            self.transfers.wait(self.transfers.mark(), d2h)
            with self.transfers.on(d2h):
                self.host.write(keys, values)
            if d2h is not None:
                keys.record_stream(d2h)
                values.record_stream(d2h)
            self.settled, self.written = self.written, self.transfers.mark(d2h)
            self.pending = (keys, values)
        self.length += key_states.shape[2]
        return key_states, value_states

    def fetch_first(self, staging: Staging, room: int, decoding: bool) -> None:
        """Prefetch this layer's first streamed group (of decode, if ``decoding``) into the idle staging slot."""
        groups = self.decode_groups if decoding else self.groups
        if groups and self.is_initialized:
            staging.fetch(self.host, groups[0], self.length, room, self.written, staging.other)

    def attend(self, query: torch.Tensor, scaling: float, staging: Staging,
               after: OffloadLayer | None = None) -> torch.Tensor:
        batch, q_heads, chunk, dim = query.shape
        ratio = q_heads // self.heads
        out = torch.empty(batch, q_heads, chunk, dim, dtype=query.dtype, device=query.device)
        g = self.gpu_heads
        if self.resident is not None:
            keys, values = self.resident.view()
            out[:, : g * ratio] = causal_attention(query[:, : g * ratio], keys, values, scaling)
        if not self.groups:
            return out
        groups = self.decode_groups if chunk == 1 else self.groups
        # decode: the host-attended heads start on a worker thread as soon as the query reaches the host,
        # while this thread issues the streamed groups
        host_job = self._start_host_attention(query, ratio, scaling) if chunk == 1 and self.cpu_heads else None
        new_keys, new_values = self.pending
        past, total = self.length - chunk, self.length
        for index, heads in enumerate(groups):
            slot = staging.acquire(self.host, heads, past, total, self.settled)
            if index + 1 < len(groups):
                staging.fetch(self.host, groups[index + 1], past, total, self.settled, staging.other)
            elif after is not None:
                after.fetch_first(staging, total, decoding=chunk == 1)
            width = heads.stop - heads.start
            keys, values = slot.keys[:, :width, :total], slot.values[:, :width, :total]
            keys[:, :, past:] = new_keys[:, heads]
            values[:, :, past:] = new_values[:, heads]
            q = slice((g + heads.start) * ratio, (g + heads.stop) * ratio)
            out[:, q] = causal_attention(query[:, q], keys, values, scaling)
            staging.release(slot)
        if host_job is not None:
            out[:, (self.heads - self.cpu_heads) * ratio :] = host_job.result().to(out.device, non_blocking=True)
        self.pending = None
        return out

    def _start_host_attention(self, query: torch.Tensor, ratio: int, scaling: float) -> Future:
        """Copy the decode query of the host-attended heads to host memory and attend them there, on the
        host worker thread.

        Those heads' KV never crosses PCIe, only the query and the output do; the worker's
        attention runs while the GPU attends the streamed groups, so the two share the work.
        """
        first = (self.heads - self.cpu_heads) * ratio
        d2h = self.transfers.d2h
        self.transfers.wait(self.transfers.mark(), d2h)
        with self.transfers.on(d2h):
            host_query = query[:, first:].to("cpu", non_blocking=True)
        copied = self.transfers.mark(d2h)
        offloaded = self.host.shape[1]
        heads = slice(offloaded - self.cpu_heads, offloaded)
        spans = [(k[:, heads, at : at + n], v[:, heads, at : at + n])
                 for k, v, at, _, n in self.host.spans(0, self.length)]
        return host_worker().submit(attend_on_host, host_query, copied, spans, ratio, scaling, self.transfers.cuda)

    @property
    def device_bytes(self) -> int:
        return self.resident.nbytes if self.resident is not None else 0

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes if self.host is not None else 0


@functools.cache
def host_worker() -> ThreadPoolExecutor:
    """The thread that runs decode attention on the host CPU (its kernels release the GIL)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="headspace-host")


def attend_on_host(query: torch.Tensor, copied: torch.cuda.Event | None, spans: list[tuple[torch.Tensor, torch.Tensor]],
                   ratio: int, scaling: float, pin: bool) -> torch.Tensor:
    """Decode attention of ``query`` (B, heads * ratio, 1, D) over host ``spans``, once the query has arrived."""
    if copied is not None:
        copied.synchronize()  # the query, and before it this token's KV, are on the host
    batch, q_heads, _, dim = query.shape
    folded = query.reshape(batch, q_heads // ratio, ratio, dim)
    result = split_decode_attention(folded, spans, scaling, splits=4 * torch.get_num_threads())
    result = result.reshape(batch, q_heads, 1, dim)
    return result.pin_memory() if pin else result


class HeadspaceCache(Cache):
    """A transformers ``Cache`` whose layers decide where KV lives and compute attention over it."""

    def __init__(self, layers: list[HeadspaceLayer], staging: Staging, split: SplitSearch | None = None):
        super().__init__(layers=layers)
        self.staging = staging
        self._stored: tuple[int, torch.Tensor] | None = None
        offloaded = [i for i, layer in enumerate(layers) if isinstance(layer, OffloadLayer)]
        self._next_offloaded = {a: b for a, b in zip(offloaded, offloaded[1:] + offloaded[:1])}
        self.split = split  # searching the host/PCIe split of decode ("auto" cpu_heads)
        self._first_offloaded = offloaded[0] if offloaded else None
        self._step_started: float | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == self._first_offloaded and key_states.shape[2] == 1 and self.split and not self.split.done:
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
            cpu_heads = self.split.record(now - self._step_started)
            for layer in self.layers:
                if isinstance(layer, OffloadLayer):
                    layer.set_cpu_heads(cpu_heads)
        self._step_started = now

    def holds(self, layer_idx: int, keys: torch.Tensor) -> bool:
        """Whether ``keys`` are what this cache just returned for ``layer_idx``."""
        return self._stored is not None and self._stored[0] == layer_idx and self._stored[1] is keys

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        self._stored = None
        layer = self.layers[layer_idx]
        if isinstance(layer, OffloadLayer):
            nxt = self._next_offloaded[layer_idx]
            return layer.attend(query, scaling, self.staging, after=self.layers[nxt])
        return layer.attend(query, scaling, self.staging)

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

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise HeadspaceError("beam search is not supported with a headspace cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise HeadspaceError("cropping (assisted decoding) is not supported with a headspace cache")


def offload_cache(
    config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
    gpu_heads: int = 1,
    group_heads: int = 1,
    block_tokens: int = 16384,
    cpu_heads: int | str = 0,
) -> HeadspaceCache:
    """A cache that keeps ``gpu_heads`` KV heads per full layer on ``device`` and streams the rest from host memory.

    In decode, ``cpu_heads`` of the offloaded heads per layer are attended on the host CPU instead of
    streamed; ``"auto"`` finds the fastest number by timing the first decode steps.
    """
    kv_heads = check_gpu_heads(config, gpu_heads)
    offloaded = kv_heads - gpu_heads
    if group_heads < 1:
        raise HeadspaceError(f"group_heads must be at least 1, got {group_heads}")
    split = None
    if cpu_heads == "auto":
        split = SplitSearch(offloaded, start=offloaded // 4)  # near the best of the H100 hosts measured: 2-3 of 8
        cpu_heads = split.current
    if isinstance(cpu_heads, str) or not 0 <= cpu_heads <= offloaded:
        raise HeadspaceError(
            f"cpu_heads must be 'auto' or between 0 and {offloaded} (the offloaded heads), got {cpu_heads}")
    transfers = Transfers(device)
    _, head_dim = kv_heads_and_dim(config)
    layers: list[HeadspaceLayer] = [
        WindowLayer(window) if window is not None
        else OffloadLayer(transfers, device, dtype, kv_heads, head_dim, gpu_heads, group_heads, block_tokens, cpu_heads)
        for window in layer_windows(config)
    ]
    return HeadspaceCache(layers, Staging(transfers, device, dtype), split)
