"""Flags in pinned host memory through which a GPU stream and the host's decode kernel hand work to each other.

In decode, a layer's host part needs the layer's query (computed on the GPU), and the GPU needs
the host's output before it merges and goes on to the next layer. Handed over through Python
(the host worker synchronizing an event, the thread that drives the GPU waiting for a future),
every layer paid for that thread's launches of the merge, the rest of the layer and the next
query while the host waited: on the H100 at 1M tokens the host sat idle 3.8-5 ms per layer
between its jobs (1.5-1.7 s of an 8.1 s run, results/h100_host_timeline_1m_bf16.json).

Here the GPU's copy stream writes a counter once the query has landed
(``cuStreamWriteValue32``), which the kernel waits for, and the compute stream waits in the
driver (``cuStreamWaitValue32``) for a counter that the kernel writes once its output is in
place. The driving thread then issues a whole layer and moves on; the GPU waits where the data
says, and the host starts the moment its query is there.

The stream operations come from the CUDA driver, through ctypes: torch exposes none. Where they
are missing or refused, :func:`signals_for` answers None and layers hand over through Python as
before.
"""

from __future__ import annotations

import ctypes
import functools
import warnings

import torch

from headspace.attention.host_decode import Handoff

READY, DONE = 0, 1  # the two flags' places in the pinned buffer
WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*flag - value) >= 0, so the counters may wrap


@functools.cache
def driver() -> ctypes.CDLL | None:
    """The CUDA driver library with the stream operations used here, or None."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        for name in ("cuStreamWaitValue32_v2", "cuStreamWriteValue32_v2", "cuMemHostGetDevicePointer_v2"):
            getattr(lib, name).restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


class Signals:
    """The ready and done counters of one cache's decode hand-overs, and the stream operations on them.

    One counter pair serves every layer of the cache: each hand-over takes the next value, and values only
    grow (modulo 2**32), so a wait for a value is met by it or any later one. A cache's hand-overs happen one
    after another (a layer's query follows the previous layer's output), so that never lets a wait through
    early.
    """

    def __init__(self, lib: ctypes.CDLL, flags: torch.Tensor, address: int):
        self.lib, self.flags, self.address = lib, flags, address
        self.count = 0

    def next(self) -> Handoff:
        """The flags and values of a new hand-over."""
        self.count = (self.count + 1) % 2**32
        value = self.count - 2**32 if self.count >= 2**31 else self.count  # as int32
        host = self.flags.data_ptr()
        return Handoff(host + 4 * READY, value, host + 4 * DONE, value)

    def ready_after_copies(self, handoff: Handoff, stream: torch.cuda.Stream) -> None:
        """Set the ready flag once the work issued on ``stream`` so far (the query's copy) is done."""
        self._check(self.lib.cuStreamWriteValue32_v2(ctypes.c_void_p(stream.cuda_stream),
                                                      ctypes.c_uint64(self.address + 4 * READY),
                                                      ctypes.c_uint32(handoff.ready_value % 2**32), 0))

    def wait_done(self, handoff: Handoff) -> None:
        """Make the current stream's later work wait until the host has set the done flag."""
        self._check(self.lib.cuStreamWaitValue32_v2(ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                                                     ctypes.c_uint64(self.address + 4 * DONE),
                                                     ctypes.c_uint32(handoff.done_value % 2**32), WAIT_GEQ))

    def set_done(self, handoff: Handoff) -> None:
        """Set the done flag from the host: a hand-over that the kernel did not finish (the torch path, an error)
        must still release the stream that waits for it."""
        ctypes.c_int32.from_address(handoff.done).value = handoff.done_value

    @staticmethod
    def _check(status: int) -> None:
        if status != 0:
            raise RuntimeError(f"CUDA driver stream operation failed with status {status}")


def signals_for(device: torch.device) -> Signals | None:
    """New hand-over flags for ``device`` (each cache its own, so that caches used side by side never read each
    other's counters), or None on a CPU or where the driver refuses its stream operations (then warned once)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _new(driver(), index) if _usable(index) else None


def _new(lib: ctypes.CDLL, index: int) -> Signals | None:
    with torch.cuda.device(index):
        flags = torch.zeros(2, dtype=torch.int32, pin_memory=True)
    address = ctypes.c_uint64()
    status = lib.cuMemHostGetDevicePointer_v2(ctypes.byref(address), ctypes.c_void_p(flags.data_ptr()), 0)
    return Signals(lib, flags, address.value) if status == 0 else None


@functools.cache
def _usable(index: int) -> bool:
    """Whether the driver takes both stream operations on pinned memory: one round trip, once per device."""
    lib = driver()
    signals = _new(lib, index) if lib is not None else None
    if signals is not None:
        try:
            with torch.cuda.device(index):
                handoff = signals.next()
                stream = torch.cuda.current_stream()
                signals.ready_after_copies(handoff, stream)
                signals.set_done(handoff)
                signals.wait_done(handoff)
                stream.synchronize()
            if int(signals.flags[READY]) == handoff.ready_value:
                return True
        except RuntimeError:
            pass
    warnings.warn("headspace: the CUDA driver's stream operations are not available; the host's decode "
                  "attention hands over through Python, which leaves it idle between layers", RuntimeWarning,
                  stacklevel=3)
    return False
