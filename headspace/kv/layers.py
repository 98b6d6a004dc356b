"""Cache layers: where one decoder layer's keys and values live, and the attention over them.

* :class:`WindowLayer` - a sliding-window layer: every head on the device, bounded by the window.
* :class:`OffloadLayer` - a full-attention layer split by KV head: ``gpu_heads`` resident on the
  device (each layer its own count), the rest in host memory, streamed back head group by head
  group through the staging double buffer while attention runs; in decode, part of the offloaded
  KV (whole heads, or the first positions of every streamed head) is attended on the host CPU,
  where it lives, by a worker thread, and merged with the GPU's part. Either tier may keep
  its KV quantized (:mod:`headspace.kv.quant`); host rows cross PCIe in their small form. Prefill
  dequantizes them into the staging buffer a head group at a time; decode attends the rows as
  they are (:func:`attend_rows`), so a quantized head costs its small bytes there too.

Layers are told the phase (prefill or decode) by the cache; they never guess it from shapes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from concurrent.futures import Future
from typing import NamedTuple

import torch
from transformers.cache_utils import CacheLayerMixin

from headspace.attention.host_decode import Handoff, host_decode_lse
from headspace.attention.kernels import (
    causal_attention,
    decode_lse,
    masked_decode_attention,
    merge_lse,
    split_decode_attention,
    split_decode_lse,
)
from headspace.errors import HeadspaceError
from headspace.kv.quant.attend import quantized_decode_lse, triton_available
from headspace.kv.quant.precision import EXACT_KV, KVPrecision
from headspace.kv.quant.store import QuantizedKV, dequantized_pieces
from headspace.kv.signals import Signals
from headspace.kv.split import host_worker
from headspace.kv.static import StaticDecode
from headspace.kv.streaming import Staging, Transfers
from headspace.kv.tiers import DeviceKV, HostKV


def head_groups(heads: int, step: int) -> list[slice]:
    """The first ``heads`` KV heads in groups of ``step`` (the last may be smaller): what one staging slot holds."""
    return [slice(start, min(start + step, heads)) for start in range(0, heads, step)]


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

    released_host_bytes = 0  # host bytes this layer held while the prompt was prefilled, then freed (exact prefill)

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
        self._token: tuple[torch.Tensor, torch.Tensor] | None = None  # static step: the key and value to store

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
        if slot_kernel(key_states):
            self._token = key_states, value_states  # the kernel stores them as it attends
        else:
            self.store.write_at(static.slot(self._static[1]), key_states, value_states)

    def attend_static(self, query: torch.Tensor, scaling: float, static: StaticDecode) -> torch.Tensor:
        _, first, slots = self._static
        keys, values = self.store.slots(0, slots)
        folded = fold(query, keys.shape[1])
        if slot_kernel(folded):
            out = attend_slots(folded, keys, values, scaling, static.position, first, self.window, self._token)
        else:
            out = masked_decode_attention(folded, keys, values, scaling, static.window_mask(first, slots, self.window))
        return out.reshape(query.shape)

    def advance_static(self) -> None:
        self.store.extend(1)
        self.length += 1


class Group(NamedTuple):
    """Heads attended through the staging buffer: ``heads`` of ``store``, the layer's KV heads from ``first``."""

    store: HostKV | QuantizedKV | None
    heads: slice
    first: int


class OffloadLayer(HeadspaceLayer):
    """A full-attention layer split by KV head between the device and host memory, each tier stored at the
    ``precision`` asked for."""

    def __init__(self, transfers: Transfers, device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int,
                 gpu_heads: int, group_heads: int, block_tokens: int, cpu_heads: int = 0,
                 precision: KVPrecision = EXACT_KV):
        super().__init__()
        self.transfers = transfers
        self.device, self.dtype, self.heads, self.head_dim = device, dtype, kv_heads, head_dim
        self.gpu_heads, self.group_heads, self.block_tokens = gpu_heads, group_heads, block_tokens
        self.precision = precision
        self.batch: int | None = None  # storage is allocated for this batch size
        self.resident: DeviceKV | QuantizedKV | None = None
        self.host: HostKV | QuantizedKV | None = None
        self.groups = head_groups(kv_heads - gpu_heads, group_heads)  # streamed in prefill
        # quantized resident heads are dequantized through the staging buffer too, a group at a time
        quantized = not precision.scheme("gpu").exact
        self.resident_groups = head_groups(gpu_heads, group_heads) if quantized else []
        self.set_cpu_heads(cpu_heads)
        self.host_share = 0.0  # of the positions of every streamed head, attended on the host in decode
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # device-to-host writes: ``written`` of the latest chunk, ``settled`` of those before it. Reads of the
        # positions before the latest chunk only need the older ones, so they need not wait for this layer's KV.
        self.written: torch.cuda.Event | None = None
        self.settled: torch.cuda.Event | None = None
        self.resident_written: torch.cuda.Event | None = None  # quantized resident rows, written on the device
        self.reserved = 0
        self._static_storage: int | None = None  # the resident storage a static form of decode began with
        self._static_tail: StaticTail | None = None  # quantized resident heads: the static form's own tail
        self._token: tuple[torch.Tensor, torch.Tensor] | None = None  # static step: the key and value to store

    def set_cpu_heads(self, cpu_heads: int) -> None:
        """Attend the last ``cpu_heads`` offloaded heads on the host in decode; stream the others."""
        self.cpu_heads = min(cpu_heads, self.offloaded)
        self.decode_groups = head_groups(self.offloaded - self.cpu_heads, self.group_heads)

    def set_host_share(self, share: float) -> None:
        """Attend the first ``share`` of the stored positions of every streamed head on the host in decode, and
        stream only the rest, merged by log-sum-exp: the host and the copies then share a layer's offloaded KV
        in any proportion, not a whole head at a time (at 1M tokens a head of Llama-3-8B is 0.5 GB, and a layer
        offloads four or five). Exact host tiers only: a quantized one is read in whole rows."""
        if not 0.0 <= share <= 1.0:
            raise HeadspaceError(f"host share must be between 0 and 1, got {share}")
        if share and not self.precision.scheme("host").exact:
            raise HeadspaceError("a host share of positions needs an exact host tier; quantized host heads are "
                                 "attended on the host a whole head at a time (cpu_heads)")
        self.host_share = share

    def _front(self, tokens: int, phase: Phase) -> int:
        """Of ``tokens`` positions of a streamed head stored before this step's, those decode attends on the
        host: the same count in the prefetch of a group and in its attention, which both see ``tokens``."""
        return int(self.host_share * tokens) if phase is Phase.DECODE else 0

    def allocate(self, batch: int) -> None:
        """Create the device and host stores for ``batch`` sequences, with room for the reserved positions."""
        self.batch = batch
        if self.gpu_heads:
            self.resident = self._store("gpu", batch, self.gpu_heads)
        if self.groups:
            self.host = self._store("host", batch, self.heads - self.gpu_heads)
        self.reserve(self.reserved)

    def _store(self, tier: str, batch: int, heads: int) -> DeviceKV | HostKV | QuantizedKV:
        """The storage of ``heads`` heads in ``tier`` (``gpu`` or ``host``) at this layer's precision there."""
        scheme = self.precision.scheme(tier)
        dim, dtype = (self.head_dim, self.dtype) if scheme.exact else (scheme.width(self.head_dim), torch.uint8)
        if tier == "gpu":
            store = DeviceKV(batch, heads, dim, dtype, self.device)
        else:
            store = HostKV(batch, heads, dim, dtype, self.transfers.cuda, self.block_tokens)
        return store if scheme.exact else QuantizedKV(scheme, store, self.head_dim, self.dtype, self.device)

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
            if isinstance(self.host, QuantizedKV):
                self.host.append(keys, values)  # quantized and copied out once attended (:meth:`flush`)
            else:
                self._write_host(self.host, keys, values)
                self.pending = (keys, values)
        self.length += key_states.shape[2]
        return key_states, value_states

    def _write_host(self, host: HostKV, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append ``keys``/``values`` to ``host`` on the device-to-host stream, after what computed them."""
        d2h = self.transfers.d2h
        self.transfers.wait(self.transfers.mark(), d2h)
        with self.transfers.on(d2h):
            host.write(keys, values)
        if d2h is not None:
            keys.record_stream(d2h)
            values.record_stream(d2h)
        self.settled, self.written = self.written, self.transfers.mark(d2h)

    def flush(self, phase: Phase = Phase.PREFILL) -> None:
        """The stored positions are attended: quantize the whole groups of quantized tiers beyond their residual
        windows (on the device; in decode, in batches: :meth:`QuantizedKV.take_groups`) and store them as rows,
        host rows copied out on the device-to-host stream."""
        decoding = phase is Phase.DECODE
        if isinstance(self.resident, QuantizedKV) and (rows := self.resident.take_groups(decoding)) is not None:
            self.resident.rows.append(*rows)
            self.resident_written = self.transfers.mark()
        if isinstance(self.host, QuantizedKV) and (rows := self.host.take_groups(decoding)) is not None:
            self._write_host(self.host.rows, *rows)
        self.pending = None

    @property
    def offloaded(self) -> int:
        """KV heads of this layer kept in host memory."""
        return self.heads - self.gpu_heads

    def streamed(self, phase: Phase) -> list[Group]:
        """The head groups attended through the staging buffer in ``phase``: in prefill, quantized resident heads
        (dequantized there), then the offloaded heads copied to the device; decode leaves out the host-attended
        heads, and quantized resident heads, which it attends in their rows where they are."""
        if phase is Phase.DECODE:
            return [Group(self.host, heads, self.gpu_heads + heads.start) for heads in self.decode_groups]
        return ([Group(self.resident, heads, heads.start) for heads in self.resident_groups]
                + [Group(self.host, heads, self.gpu_heads + heads.start) for heads in self.groups])

    def _fetched(self, store: HostKV | QuantizedKV, new: int) -> int:
        """Positions of ``store`` staged from the store itself, before ``new`` positions were stored; the rest
        (its full-precision recent positions, or the exact host tier's latest chunk) come from the device."""
        return store.quantized if isinstance(store, QuantizedKV) else self.length - new

    def _written(self, store: HostKV | QuantizedKV, new: int) -> torch.cuda.Event | None:
        """What a read of the positions :meth:`_fetched` gives waits for."""
        if store is self.resident:
            return self.resident_written
        return self.settled if new and not isinstance(store, QuantizedKV) else self.written

    def _stage(self, staging: Staging, group: Group, new: int, room: int, slot_index: int | None = None,
               phase: Phase = Phase.PREFILL):
        """Fetch ``group`` into staging slot ``slot_index`` (prefetching), or acquire the slot holding it (None):
        in decode, quantized rows as they are (:func:`attend_rows`)."""
        tokens, written = self._fetched(group.store, new), self._written(group.store, new)
        start = self._front(tokens, phase)
        if slot_index is None:
            return staging.acquire(group.store, group.heads, tokens, room, written,
                                   dequantize=phase is not Phase.DECODE, start=start)
        staging.fetch(group.store, group.heads, tokens, room, written, slot_index, start)
        return None

    def fetch_first(self, staging: Staging, room: int, phase: Phase) -> None:
        """Prefetch this layer's first streamed group of ``phase`` into the idle staging slot."""
        groups = self.streamed(phase)
        if groups and self.is_initialized:
            self._stage(staging, groups[0], 0, room, staging.other, phase)

    def attend(self, query: torch.Tensor, scaling: float, staging: Staging, phase: Phase,
               after: OffloadLayer | None = None) -> torch.Tensor:
        batch, q_heads, chunk, dim = query.shape
        ratio = q_heads // self.heads
        out = torch.empty(batch, q_heads, chunk, dim, dtype=query.dtype, device=query.device)
        g = self.gpu_heads
        decoding = phase is Phase.DECODE
        groups = self.streamed(phase)
        total = self.length
        front = self._front(total - chunk, phase) if groups else 0
        # decode: the host's part starts on a worker thread as soon as the query reaches the host (before the
        # resident heads are attended), while this thread issues the streamed groups
        host_job = (self._start_host_attention(query, ratio, scaling, front)
                    if decoding and (self.cpu_heads or front) else None)
        if isinstance(self.resident, DeviceKV):
            keys, values = self.resident.view()
            out[:, : g * ratio] = causal_attention(query[:, : g * ratio], keys, values, scaling)
        elif decoding and self.resident is not None:
            out[:, : g * ratio] = attend_rows(query[:, : g * ratio], self.resident, slice(0, g),
                                              self.resident.rows.view(), scaling)
        fronted = []  # of streamed groups whose first positions the host attends: the GPU's (out, lse)
        for index, group in enumerate(groups):
            slot = self._stage(staging, group, chunk, total, phase=phase)
            if index + 1 < len(groups):
                self._stage(staging, groups[index + 1], chunk, total, staging.other, phase)
            elif after is not None:
                after.fetch_first(staging, total, phase)
            heads, start = group.heads, self._fetched(group.store, chunk)
            width = heads.stop - heads.start
            q = slice(group.first * ratio, (group.first + width) * ratio)
            if decoding and isinstance(group.store, QuantizedKV):
                rows = tuple(part[:, :width, :start] for part in slot.rows)
                out[:, q] = attend_rows(query[:, q], group.store, heads, rows, scaling)
                staging.release(slot)
                continue
            keys, values = slot.keys[:, :width, : total - front], slot.values[:, :width, : total - front]
            tail_keys, tail_values = group.store.recent if isinstance(group.store, QuantizedKV) else self.pending
            keys[:, :, start - front :] = tail_keys[:, heads]
            values[:, :, start - front :] = tail_values[:, heads]
            if front:
                fronted.append(decode_lse(fold(query[:, q], width), keys, values, scaling))
            else:
                out[:, q] = causal_attention(query[:, q], keys, values, scaling)
            staging.release(slot)
        if host_job is not None:
            whole, front_part = host_job.deliver(self.transfers, out.device)
            if whole is not None:
                out[:, (self.heads - self.cpu_heads) * ratio :] = whole
            if front_part is not None:  # every streamed group's part, merged with the host's at once
                gpu_out, gpu_lse = (torch.cat(parts, dim=1) for parts in zip(*fronted, strict=True))
                merged, _ = merge_lse([(gpu_out, gpu_lse), front_part])
                out[:, g * ratio : (g + gpu_out.shape[1]) * ratio] = merged.reshape(batch, -1, chunk, dim)
            # the next layer's job may begin (and wait for its query) while this one runs; none outlives the forward
            host_worker().settle(keep=1 if host_job.handoff is not None and after is not None else 0)
        self.flush(phase)
        return out

    def _start_host_attention(self, query: torch.Tensor, ratio: int, scaling: float, front: int) -> HostJob:
        """Copy the decode query of the offloaded heads to host memory and attend there, on the host worker,
        the host's part: the first ``front`` positions of every streamed head, and the last ``cpu_heads``
        offloaded heads whole.

        That KV never crosses PCIe, only the query and the outputs do; the worker's attention runs
        while the GPU attends the streamed groups, so the two share the work. A quantized host tier
        is read in its rows, dequantized piece by piece by the worker; its newest positions, on the
        device in full precision, travel with the query. Where the driver allows, the two sides hand
        over through flags (:mod:`headspace.kv.signals`): the compiled kernel waits for the query
        itself, and the GPU for the output, so this thread never waits in the middle of a layer.
        """
        offloaded = self.host.shape[1]
        streamed = offloaded - self.cpu_heads
        whole = slice(streamed, offloaded)
        quantized = isinstance(self.host, QuantizedKV)
        batch, _, _, dim = query.shape
        whole_spans = front_spans = None
        if self.cpu_heads:
            tier = self.host.rows if quantized else self.host
            whole_spans = [(k[:, whole, at : at + n], v[:, whole, at : at + n])
                           for k, v, at, _, n in tier.spans(0, tier.length if quantized else self.length)]
        if front:
            fronts = slice(0, streamed)
            front_spans = [(k[:, fronts, at : at + n], v[:, fronts, at : at + n])
                           for k, v, at, _, n in self.host.spans(0, front)]
        signals = self.transfers.signals
        handoff = signals.next() if signals is not None else None
        rows = query[:, self.gpu_heads * ratio :]
        pin = self.transfers.cuda
        d2h = self.transfers.d2h
        if handoff is not None:  # float32, as the kernel reads it where it lands
            rows = rows.float()
            host_query = torch.empty(rows.shape, dtype=torch.float32, pin_memory=pin)
        self.transfers.wait(self.transfers.mark(), d2h)
        with self.transfers.on(d2h):
            if handoff is not None:
                host_query.copy_(rows, non_blocking=True)
                if d2h is not None:
                    rows.record_stream(d2h)
            else:
                host_query = rows.to("cpu", non_blocking=True)
            if quantized and self.cpu_heads:
                recent = [tuple(part[:, whole].to("cpu", non_blocking=True) for part in self.host.recent)]
        if quantized and self.cpu_heads and d2h is not None:
            for part in self.host.recent:  # :meth:`flush` replaces them while the copy may still run
                part.record_stream(d2h)
        if handoff is not None:
            signals.ready_after_copies(handoff, d2h)
        copied = self.transfers.mark(d2h)
        if quantized and self.cpu_heads:
            whole_spans = HostRows(self.host.scheme, whole_spans, recent, self.head_dim, self.dtype)
        whole_out = (torch.empty(batch, self.cpu_heads * ratio, 1, dim, dtype=self.dtype, pin_memory=pin)
                     if self.cpu_heads else None)
        front_out = ((torch.empty(batch, streamed, ratio, dim, pin_memory=pin),
                      torch.empty(batch, streamed, ratio, pin_memory=pin)) if front else None)
        task = HostTask(host_query, copied, streamed, whole_spans, front_spans, ratio, scaling, self.dtype, whole_out,
                        front_out, handoff, signals)
        return HostJob(host_worker().submit(attend_on_host, task), whole_out, front_out, handoff)

    # static form (every head resident): the prefix stored when it began unmasked, then ``static.tail`` slots.
    # Exact heads keep the tail in their own storage; quantized heads in a buffer of their own (:class:`StaticTail`),
    # each token also appended to their recent positions after the step, so between steps the store is as usual.
    @property
    def static_capable(self) -> bool:
        return self.offloaded == 0 and self.resident is not None

    def static_slots(self, prefix: int, tail: int) -> int:
        """Tail slots this layer can give after ``prefix`` positions (at least one, at most ``tail``): exact heads
        grow their storage as an append would; quantized heads take a buffer of their own, for as many steps as
        eager decode would run before it quantizes (so that both compute the same)."""
        store = self.resident
        if isinstance(store, QuantizedKV):
            self.flush(Phase.DECODE)  # what the eager step before would have quantized (a static step does not)
            return min(tail, store.static_steps())
        if store.capacity < prefix + 1:
            store.reserve(max(prefix + 1, store.capacity * 3 // 2))
        return min(tail, store.capacity - prefix)

    def begin_static(self, static: StaticDecode) -> None:
        """The tail fits: the cache sized it to the slots :meth:`static_slots` gave."""
        if isinstance(self.resident, QuantizedKV):
            self._static_tail = StaticTail(self.resident, static.tail)
            return
        self.resident.clear(static.prefix, static.prefix + static.tail)
        self._static_storage = self.resident.storage

    def static_covers(self, static: StaticDecode) -> bool:
        if not static.prefix <= self.length < static.prefix + static.tail:
            return False
        if isinstance(self.resident, QuantizedKV):
            return self._static_tail is not None and self._static_tail.covers(self.length - static.prefix)
        return self._static_storage == self.resident.storage

    def update_static(self, key_states: torch.Tensor, value_states: torch.Tensor, static: StaticDecode) -> None:
        if isinstance(self.resident, QuantizedKV):
            self._static_tail.write(static, key_states, value_states)
        elif slot_kernel(key_states):
            self._token = key_states, value_states  # the kernel stores them as it attends
        else:
            self.resident.write_at(static.slot(0), key_states, value_states)

    def attend_static(self, query: torch.Tensor, scaling: float, static: StaticDecode) -> torch.Tensor:
        folded = fold(query, self.heads)
        if isinstance(self.resident, QuantizedKV):
            prefix = self._static_tail.prefix_lse(folded, scaling)
            keys, values = self._static_tail.slots(static.tail)
        elif slot_kernel(folded):  # prefix and tail at once, up to the position: no mask, no merge
            out = attend_slots(folded, *self.resident.slots(0, static.prefix + static.tail), scaling, static.position,
                               new=self._token)
            return out.reshape(query.shape)
        else:
            prefix = decode_lse(folded, *self.resident.slots(0, static.prefix), scaling) if static.prefix else None
            keys, values = self.resident.slots(static.prefix, static.prefix + static.tail)
        out = masked_decode_attention(folded, keys, values, scaling, static.tail_mask(), prefix)
        return out.reshape(query.shape)

    def advance_static(self) -> None:
        if isinstance(self.resident, QuantizedKV):
            self._static_tail.advance()
        else:
            self.resident.extend(1)
        self.length += 1

    @property
    def device_bytes(self) -> int:
        recent = sum(store.recent_bytes for store in (self.resident, self.host) if isinstance(store, QuantizedKV))
        return (self.resident.nbytes if self.resident is not None else 0) + recent

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes if self.host is not None else 0


def slot_kernel(query: torch.Tensor) -> bool:
    """Whether a static step attends exact resident slots with the Triton kernel (:func:`attend_slots`): a folded
    ``query`` (or the key the step stores: the same in all this asks) in half precision on a GPU (float32 would
    meet tensor cores as tf32: the portable path keeps it exact), a head size the kernel tiles (a power of two, at
    least 16), Triton installed."""
    dim = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and dim >= 16 and dim & (dim - 1) == 0
            and triton_available())


def attend_slots(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                 position: torch.Tensor, first: int = 0, window: int | None = None,
                 new: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Decode attention of the folded ``query`` over the slots up to the decoded token's (slot ``position - first``,
    the last ``window`` of them with a window), in two kernels whatever the slots, which also store the token's
    key and value, ``new``, in its slot: what a CUDA graph replays is the fewer small kernels
    (:mod:`headspace.attention.triton_decode`)."""
    from headspace.attention import triton_decode  # Triton is imported only where it runs

    return triton_decode.attend(query, keys, values, position, scaling, first, window, new)


class StaticTail:
    """The static form of decode over quantized resident heads: the rows and full-precision recent positions
    stored when it began (the prefix, fixed: nothing is quantized during it), and tail slots that the replayed
    steps write. The recent positions and the tail share one buffer, recent first, and the store's recent
    positions are a view of it that grows by one after each step (:meth:`advance`): between steps the store holds
    every position as usual, and no step copies them (appending would copy them all, twice per layer)."""

    def __init__(self, store: QuantizedKV, tail: int):
        self.store, self.rows = store, store.rows.view()
        self.storage, self.quantized = store.rows.storage, store.quantized
        self.held = store.recent[0].shape[2]  # recent positions when it began: the buffer's first slots
        batch, heads, dim = store.shape
        self.buffer = DeviceKV(batch, heads, dim, store.dtype, store.device)
        self.buffer.reserve(self.held + tail)
        self.buffer.append(*store.recent)
        self.buffer.clear(self.held, self.held + tail)
        self.recent = self.buffer.view()  # the prefix's recent positions, as they were
        store.recent = self.recent
        self.written, self.latest = 0, store.recent[0]  # what the store's recent keys are after our last step

    def covers(self, written: int) -> bool:
        """Whether the store is as this form left it after ``written`` steps: nothing was stored, quantized or
        rolled back since (any of them replaces the recent tensors)."""
        store = self.store
        return (self.written == written and store.recent[0] is self.latest and store.rows.storage == self.storage
                and store.quantized == self.quantized)

    def prefix_lse(self, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the folded ``query`` over the prefix, with its log-sum-exp: the rows in their small form and
        the recent positions as they were."""
        return rows_lse(query, self.store.scheme, self.rows, self.recent, scaling)

    def slots(self, tail: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``tail`` slots the steps write, written or not."""
        return self.buffer.slots(self.held, self.held + tail)

    def write(self, static: StaticDecode, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the decoded token in its slot: the one after the prefix's recent positions, for the first step."""
        self.buffer.write_at(static.slot(static.prefix - self.held), keys, values)

    def advance(self) -> None:
        """The step wrote its token in the slot after the store's recent positions: they take it in."""
        self.buffer.extend(1)
        self.store.recent = self.buffer.view()
        self.written, self.latest = self.written + 1, self.store.recent[0]


def attend_rows(query: torch.Tensor, store: QuantizedKV, heads: slice, rows: tuple[torch.Tensor, torch.Tensor],
                scaling: float) -> torch.Tensor:
    """Decode attention of ``query`` (B, len(heads) * R, 1, D) over ``heads`` of a quantized ``store``: its rows
    ``rows`` (on the device: resident, or staged) read in their small form, and its full-precision recent
    positions, merged by their log-sum-exp."""
    recent = tuple(part[:, heads] for part in store.recent)
    out, _ = rows_lse(fold(query, heads.stop - heads.start), store.scheme, rows, recent, scaling)
    return out.reshape(query.shape)


def rows_lse(query: torch.Tensor, scheme, rows: tuple[torch.Tensor, torch.Tensor],
             recent: tuple[torch.Tensor, torch.Tensor], scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of the folded ``query`` over quantized ``rows`` (read in their small form) and the
    full-precision ``recent`` positions after them, with its log-sum-exp; at least one of the two holds a position."""
    parts = []
    if rows[0].shape[2]:
        parts.append(quantized_decode_lse(query, *rows, scheme, scaling))
    if recent[0].shape[2]:
        parts.append(decode_lse(query, *recent, scaling))
    return merge_lse(parts)


class HostRows:
    """Spans of quantized host rows as the host attention reads them: dequantized a piece at a time as it
    iterates (bounded memory), then the newest positions in full precision."""

    def __init__(self, scheme, spans: list[tuple[torch.Tensor, torch.Tensor]],
                 recent: list[tuple[torch.Tensor, torch.Tensor]], head_dim: int, dtype: torch.dtype):
        self.scheme, self.spans, self.recent, self.head_dim, self.dtype = scheme, spans, recent, head_dim, dtype

    def __iter__(self):
        for keys, values in self.spans:
            for _, piece_keys, piece_values in dequantized_pieces(self.scheme, keys, values, self.head_dim,
                                                                  self.dtype):
                yield piece_keys, piece_values
        yield from self.recent


class HostTask(NamedTuple):
    """What the host worker needs for a layer's host part (:func:`attend_on_host`)."""

    query: torch.Tensor  # (B, heads * ratio, 1, D): the offloaded heads' query rows, in host memory
    copied: torch.cuda.Event | None  # the query's copy (and before it this token's KV) done
    streamed: int  # of the offloaded heads, the first ``streamed`` are streamed, the rest attended here whole
    whole_spans: Iterable[tuple[torch.Tensor, torch.Tensor]] | None  # the whole heads' KV
    front_spans: list[tuple[torch.Tensor, torch.Tensor]] | None  # the streamed heads' first positions
    ratio: int
    scaling: float
    dtype: torch.dtype  # the model's: what torch attends the query in
    whole_out: torch.Tensor | None  # (B, whole rows, 1, D), written here
    front_out: tuple[torch.Tensor, torch.Tensor] | None  # float32 (B, streamed, ratio, D) and (B, streamed, ratio)
    handoff: Handoff | None  # with flags: the query is float32 and may still be on its way
    signals: Signals | None


class HostJob(NamedTuple):
    """A layer's host part in flight, and where its outputs land."""

    future: Future
    whole_out: torch.Tensor | None
    front_out: tuple[torch.Tensor, torch.Tensor] | None
    handoff: Handoff | None

    def deliver(self, transfers: Transfers, device: torch.device) -> tuple[torch.Tensor | None, tuple | None]:
        """The outputs on ``device``: copied once the host has written them, which the compute stream waits for
        (a hand-over by flags), or this thread does."""
        if self.handoff is not None:
            transfers.signals.wait_done(self.handoff)
        else:
            self.future.result()
        whole = self.whole_out.to(device, non_blocking=True) if self.whole_out is not None else None
        front = tuple(part.to(device, non_blocking=True) for part in self.front_out) if self.front_out else None
        return whole, front


@torch.inference_mode()
def attend_on_host(task: HostTask) -> None:
    """Decode attention on the host: the first ``streamed`` heads' query rows over ``front_spans`` (their first
    positions, the rest streamed to the GPU: written as folded output and log-sum-exp, to merge with it), the
    others' over ``whole_spans``. Handed over by flags, the compiled kernel waits for the query and sets the done
    flag itself; otherwise this thread waits for the copy, and the done flag (if any) is set when it ends, also
    when it fails, so that the GPU never waits for it forever. (In inference mode: the outputs may be inference
    tensors, made by a caller in it.)"""
    try:
        batch, q_heads, _, dim = task.query.shape
        folded = task.query.reshape(batch, q_heads // task.ratio, task.ratio, dim)
        threads = torch.get_num_threads()
        if task.handoff is not None and task.whole_spans is None and host_decode_lse(
                folded[:, : task.streamed], task.front_spans, task.scaling, threads, into=task.front_out,
                handoff=task.handoff) is not None:  # None: the kernel does not take these, before any wait
            return
        if task.copied is not None:
            task.copied.synchronize()  # the query, and before it this token's KV, are on the host
        folded = folded.to(task.dtype)
        if task.front_spans is not None:
            out, lse = split_decode_lse(folded[:, : task.streamed], task.front_spans, task.scaling, 4 * threads)
            task.front_out[0].copy_(out)
            task.front_out[1].copy_(lse)
        if task.whole_spans is not None:
            task.whole_out.copy_(split_decode_attention(folded[:, task.streamed :], task.whole_spans, task.scaling,
                                                        4 * threads).reshape(batch, -1, 1, dim))
    finally:
        if task.handoff is not None:
            task.signals.set_done(task.handoff)
