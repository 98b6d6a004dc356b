"""Copy streams and the double buffer that offloaded head groups stream through.

On CUDA, host-to-device reads run on one side stream and device-to-host writes on
another, ordered against compute with events, so that group i+1 (or the next
layer's first group) is in flight while group i is attended. On CPU the same calls
run synchronously: the bookkeeping, and therefore the results, are identical.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from headspace.kv.quant.store import QuantizedKV
from headspace.kv.signals import Signals, signals_for
from headspace.kv.tiers import HostKV


class Transfers:
    """The two copy streams of one device (none on CPU), event helpers, and the host hand-over flags."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None

    @functools.cached_property
    def signals(self) -> Signals | None:
        """The flags that decode's host part hands over through (None: it hands over through Python)."""
        return signals_for(self.device)

    def on(self, stream: torch.cuda.Stream | None) -> AbstractContextManager:
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def mark(self, stream: torch.cuda.Stream | None = None) -> torch.cuda.Event | None:
        """An event recorded now on ``stream`` (default: the current stream)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream())
        return event

    def wait(self, event: torch.cuda.Event | None, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for ``event``."""
        if event is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(event)


@dataclass
class Slot:
    """One half of the double buffer: what it holds and the events guarding it."""

    keys: torch.Tensor
    values: torch.Tensor
    tag: tuple | None = None  # (host tier id, first head, end head, first position, end position) held
    rows: tuple[torch.Tensor, torch.Tensor] | None = None  # quantized host rows land here before dequantizing
    quantized: tuple[QuantizedKV, slice, int] | None = None  # (store, heads, tokens) fetched, not yet dequantized
    ready: torch.cuda.Event | None = None  # host-to-device copy finished
    free: torch.cuda.Event | None = None  # compute finished reading it


class Staging:
    """Two device buffers of ``group_heads`` heads that offloaded groups are fetched into."""

    def __init__(self, transfers: Transfers, device: torch.device, dtype: torch.dtype):
        self.transfers = transfers
        self.device, self.dtype = device, dtype
        self.slots: list[Slot] = []
        self.current = 0
        self.min_tokens = 0

    def reserve(self, tokens: int) -> None:
        """Size future buffers for ``tokens`` positions so they never grow mid-run."""
        self.min_tokens = max(self.min_tokens, tokens)

    def _ensure(self, slot_index: int, shape: tuple[int, int, int, int]) -> Slot:
        while len(self.slots) < 2:
            empty = torch.empty(0, device=self.device, dtype=self.dtype)
            self.slots.append(Slot(empty, empty))
        slot = self.slots[slot_index]
        batch, heads, tokens, dim = shape
        have = slot.keys.shape
        if slot.keys.dim() != 4 or have[0] != batch or have[1] < heads or have[2] < tokens or have[3] != dim:
            for event in (slot.ready, slot.free):  # the old buffers may still be in use on a stream
                if event is not None:
                    event.synchronize()
            size = (batch, max(heads, have[1] if slot.keys.dim() == 4 else 0), max(tokens, self.min_tokens), dim)
            slot.keys = torch.empty(size, device=self.device, dtype=self.dtype)
            slot.values = torch.empty_like(slot.keys)
            slot.tag = None
            # The allocator may hand out memory that kernels queued on this stream still use (their tensors were
            # freed in Python, not on the GPU yet); the copy stream writes into it only once they have run.
            slot.free = self.transfers.mark()
        return slot

    def fetch(self, host: HostKV | QuantizedKV, heads: slice, tokens: int, room: int,
              written: torch.cuda.Event | None, slot_index: int, start: int = 0) -> None:
        """Start copying positions [start, tokens) of ``heads`` into slot ``slot_index`` (room for ``room``), from
        its first position (``start``: the positions before it are attended elsewhere, by the host CPU; exact
        stores only). Of a quantized store only host rows are copied, as they are: :meth:`acquire` dequantizes
        them (or rows on the device) on the compute stream, so this stream carries nothing but copies."""
        batch, _, dim = host.shape
        slot = self._ensure(slot_index, (batch, heads.stop - heads.start, room, dim))
        tag = (id(host), heads.start, heads.stop, start, tokens)
        if slot.tag == tag:
            return
        h2d = self.transfers.h2d
        self.transfers.wait(slot.free, h2d)
        self.transfers.wait(written, h2d)
        quantized = isinstance(host, QuantizedKV)
        with self.transfers.on(h2d):
            if not quantized:
                host.read(heads, slot.keys, slot.values, tokens, start)
            elif isinstance(host.rows, HostKV):
                host.rows.read(heads, *self._rows(slot, host, heads, tokens), tokens)
        slot.ready = self.transfers.mark(h2d)
        slot.tag = tag
        slot.quantized = (host, heads, tokens) if quantized else None

    def _rows(self, slot: Slot, store: QuantizedKV, heads: slice, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's device buffers for ``tokens`` host rows of ``heads`` heads of ``store``, allocated on the copy
        stream; a fetch into the slot waits until compute is done with them."""
        batch, _, width = store.rows.shape
        have = slot.rows[0].shape if slot.rows is not None else None
        count = heads.stop - heads.start
        if have is None or have[1] < count or have[2] < tokens or have[3] != width or have[0] != batch:
            size = (batch, max(count, have[1] if have else 0), max(tokens, self.min_tokens), width)
            keys = torch.empty(size, device=self.device, dtype=torch.uint8)
            slot.rows = (keys, torch.empty_like(keys))
        return slot.rows

    def acquire(self, host: HostKV | QuantizedKV, heads: slice, tokens: int, room: int,
                written: torch.cuda.Event | None, dequantize: bool = True, start: int = 0) -> Slot:
        """The slot holding [start, tokens) of ``heads``, fetched now unless it was prefetched; room for ``room``.
        Quantized rows are dequantized into the slot's keys and values unless ``dequantize`` is False (decode
        attends host rows in :attr:`Slot.rows` as they are)."""
        tag = (id(host), heads.start, heads.stop, start, tokens)
        index = next((i for i, s in enumerate(self.slots) if s.tag == tag), None)
        if index is None:
            index = 1 - self.current if self.slots else 0
            self.fetch(host, heads, tokens, room, written, index, start)
        self.current = index
        slot = self.slots[index]
        self.transfers.wait(slot.ready)
        if not dequantize and slot.quantized is not None:
            return slot
        if slot.keys.shape[2] < room:  # prefetched before the chunk size was known
            keys, values = slot.keys, slot.values
            slot.keys = torch.empty(*keys.shape[:2], room, keys.shape[3], device=self.device, dtype=self.dtype)
            slot.values = torch.empty_like(slot.keys)
            slot.keys[:, :, :tokens] = keys[:, :, :tokens]
            slot.values[:, :, :tokens] = values[:, :, :tokens]
        if slot.quantized is not None:
            store, heads, tokens = slot.quantized
            store.dequantize(heads, slot.keys, slot.values, tokens, slot.rows)
            slot.quantized = None
        return slot

    def forget(self) -> None:
        """Drop what the slots are known to hold: after a cache is rolled back, the same host positions are
        written again with other tokens, and a slot tagged with them would serve the old ones."""
        for slot in self.slots:
            slot.tag, slot.quantized = None, None

    def free(self) -> None:
        """Give the buffers back (nothing is left to stream: offload+locret's released host tier); a later fetch
        allocates them again."""
        for slot in self.slots:
            for event in (slot.ready, slot.free):  # a copy or a read may still be in flight on a stream
                if event is not None:
                    event.synchronize()
        self.slots, self.current = [], 0

    def release(self, slot: Slot) -> None:
        """All compute that reads ``slot`` has been issued; a later fetch into it waits for that."""
        slot.free = self.transfers.mark()

    @property
    def other(self) -> int:
        return 1 - self.current

    @property
    def nbytes(self) -> int:
        return sum(2 * s.keys.numel() * s.keys.element_size() + (2 * s.rows[0].numel() if s.rows else 0)
                   for s in self.slots)
