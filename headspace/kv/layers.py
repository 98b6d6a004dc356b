"""Cache layers: where one decoder layer's keys and values live, and the attention over them.

* :class:`WindowLayer` - a sliding-window layer: every head on the device, bounded by the window.
* :class:`OffloadLayer` - a full-attention layer split by KV head: ``gpu_heads`` resident on the
  device (each layer its own count), the rest in host memory, streamed back head group by head
  group through the staging double buffer while attention runs; in decode, some offloaded heads
  are attended on the host CPU, where their KV lives, by a worker thread.

Layers are told the phase (prefill or decode) by the cache; they never guess it from shapes.
"""

from __future__ import annotations

import enum
import functools
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from transformers.cache_utils import CacheLayerMixin

from headspace.attention.kernels import causal_attention, decode_lse, masked_decode_attention, split_decode_attention
from headspace.errors import HeadspaceError
from headspace.kv.static import StaticDecode
from headspace.kv.streaming import Staging, Transfers
from headspace.kv.tiers import DeviceKV, HostKV


class Phase(enum.Enum):
    """What a forward call does: feed prompt tokens (any number) or decode one new token per sequence."""

    PREFILL = "prefill"
    DECODE = "decode"


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

    def attend(self, query: torch.Tensor, scaling: float, staging: Staging, phase: Phase) -> torch.Tensor:
        """Attention of ``query`` (B, Hq, c, D), the newest c positions, over everything this layer keeps."""
        raise NotImplementedError

    @property
    def device_bytes(self) -> int:
        return 0

    @property
    def host_bytes(self) -> int:
        return 0

    # -- the static form of decode (:mod:`headspace.kv.static`); layers that have one override these ---------
    static_capable = False  # whether this layer has a static form of decode: every head on the device

    def begin_static(self, static: StaticDecode) -> None:
        """Fix the storage and the slots that the decode steps of ``static`` read and write."""
        raise HeadspaceError(f"{type(self).__name__} has no static form of decode")

    def static_covers(self, static: StaticDecode) -> bool:
        """Whether the next decode step can run in ``static``: nothing moved the storage, and a slot is left."""
        return False

    def update_static(self, key_states: torch.Tensor, value_states: torch.Tensor, static: StaticDecode) -> None:
        raise NotImplementedError

    def attend_static(self, query: torch.Tensor, scaling: float, static: StaticDecode) -> torch.Tensor:
        raise NotImplementedError

    def advance_static(self) -> None:
        """Count the position a static step stored (outside the step: a replayed graph runs no Python)."""
        raise NotImplementedError


def fold(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A decode query (B, Hq, 1, D) as (B, Hk, Hq / Hk, D): the query heads of each KV head on the query axis."""
    batch, q_heads, _, dim = query.shape
    return query.reshape(batch, kv_heads, q_heads // kv_heads, dim)


class WindowLayer(HeadspaceLayer):
    """A sliding-window layer: all heads on the device, at most ``window - 1`` past tokens kept."""

    is_sliding = True

    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.store: DeviceKV | None = None
        self._static: tuple[int, int, int] | None = None  # static form: (storage, slot 0's position, slots)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads, _, dim = key_states.shape
            self.store = DeviceKV(batch, heads, dim, self.dtype, self.device)
        self.store.keep_last(self.window - 1)
        self.store.append(key_states, value_states)
        self.length += key_states.shape[2]
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling: float, staging: Staging, phase: Phase) -> torch.Tensor:
        keys, values = self.store.view()
        return causal_attention(query, keys, values, scaling, self.window)

    @property
    def device_bytes(self) -> int:
        return self.store.nbytes if self.store is not None else 0

    # static form: the window before it began, then ``static.tail`` slots, all attended under a window mask
    static_capable = True

    def begin_static(self, static: StaticDecode) -> None:
        self.store.keep_last(self.window - 1)
        slots = self.store.length + static.tail
        self.store.reserve(slots)
        self.store.clear(self.store.length, slots)
        self._static = (self.store.storage, self.length - self.store.length, slots)  # storage, slot 0's position

    def static_covers(self, static: StaticDecode) -> bool:
        if self._static is None:
            return False
        storage, first, slots = self._static
        return (storage == self.store.storage and first == self.length - self.store.length
                and self.store.length < slots)

    def update_static(self, key_states: torch.Tensor, value_states: torch.Tensor, static: StaticDecode) -> None:
        self.store.write_at(static.slot(self._static[1]), key_states, value_states)

    def attend_static(self, query: torch.Tensor, scaling: float, static: StaticDecode) -> torch.Tensor:
        _, first, slots = self._static
        keys, values = self.store.slots(0, slots)
        out = masked_decode_attention(fold(query, keys.shape[1]), keys, values, scaling,
                                      static.window_mask(first, slots, self.window))
        return out.reshape(query.shape)

    def advance_static(self) -> None:
        self.store.extend(1)
        self.length += 1


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
        self._static_storage: int | None = None  # the resident storage a static form of decode began with

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

    @property
    def offloaded(self) -> int:
        """KV heads of this layer kept in host memory."""
        return self.heads - self.gpu_heads

    def streamed(self, phase: Phase) -> list[slice]:
        """The groups of offloaded heads copied to the device in ``phase`` (decode leaves out the host-attended)."""
        return self.decode_groups if phase is Phase.DECODE else self.groups

    def fetch_first(self, staging: Staging, room: int, phase: Phase) -> None:
        """Prefetch this layer's first streamed group of ``phase`` into the idle staging slot."""
        groups = self.streamed(phase)
        if groups and self.is_initialized:
            staging.fetch(self.host, groups[0], self.length, room, self.written, staging.other)

    def attend(self, query: torch.Tensor, scaling: float, staging: Staging, phase: Phase,
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
        decoding = phase is Phase.DECODE
        groups = self.streamed(phase)
        # decode: the host-attended heads start on a worker thread as soon as the query reaches the host,
        # while this thread issues the streamed groups
        host_job = self._start_host_attention(query, ratio, scaling) if decoding and self.cpu_heads else None
        new_keys, new_values = self.pending
        past, total = self.length - chunk, self.length
        for index, heads in enumerate(groups):
            slot = staging.acquire(self.host, heads, past, total, self.settled)
            if index + 1 < len(groups):
                staging.fetch(self.host, groups[index + 1], past, total, self.settled, staging.other)
            elif after is not None:
                after.fetch_first(staging, total, phase)
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

    # static form (every head resident): the prefix stored when it began unmasked, then ``static.tail`` slots
    @property
    def static_capable(self) -> bool:
        return self.offloaded == 0

    def static_room(self, tokens: int) -> int:
        """Room for at least ``tokens`` positions on the device (grown as an append would); the room there is."""
        if self.resident.capacity < tokens:
            self.resident.reserve(max(tokens, self.resident.capacity * 3 // 2))
        return self.resident.capacity

    def begin_static(self, static: StaticDecode) -> None:
        """The tail fits: the cache sized it to the room :meth:`static_room` made."""
        self.resident.clear(static.prefix, static.prefix + static.tail)
        self._static_storage = self.resident.storage

    def static_covers(self, static: StaticDecode) -> bool:
        return (self._static_storage == self.resident.storage
                and static.prefix <= self.length < static.prefix + static.tail)

    def update_static(self, key_states: torch.Tensor, value_states: torch.Tensor, static: StaticDecode) -> None:
        self.resident.write_at(static.slot(0), key_states, value_states)

    def attend_static(self, query: torch.Tensor, scaling: float, static: StaticDecode) -> torch.Tensor:
        folded = fold(query, self.heads)
        prefix = decode_lse(folded, *self.resident.slots(0, static.prefix), scaling) if static.prefix else None
        keys, values = self.resident.slots(static.prefix, static.prefix + static.tail)
        out = masked_decode_attention(folded, keys, values, scaling, static.tail_mask(), prefix)
        return out.reshape(query.shape)

    def advance_static(self) -> None:
        self.resident.extend(1)
        self.length += 1

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


