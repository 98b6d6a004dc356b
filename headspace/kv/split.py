"""How much of the offloaded KV to attend on the host CPU in decode: found by measuring.

Streaming KV costs PCIe time, attending it on the host costs host memory bandwidth
and cores; the best split is where both sides finish together. That point depends
on the machine (on two H100 hosts of the same kind the host side ran at 50 and at
13 GB/s) and on what else runs there, so the search times real decode steps: it
starts where the two rates measured when the cache is made put the balance
(:func:`predicted_split`: the offloaded KV shared in proportion to the host's
attention rate and the PCIe copy rate), moves one unit at a time while steps get
faster, tries none on the host last, and keeps the smallest host part within :data:`MARGIN` of the
fastest it found (none unless a host part is faster by that much).
(Starting from a fixed guess, a quarter of the heads, it stopped at 1 of 6 at 1.39M
tokens on the H100, where the rates put the balance at 3: each step it tries is a
local comparison, so the start matters.)

Layers may offload different numbers of heads (a placement plan fills the GPU head
by head). Within a layer the host and the copies run side by side, so what balances
them is a share of that layer's offloaded KV, the same in every layer. With an exact
host tier the search is over a share of *positions* in steps of 1/:data:`SHARE_STEPS`:
the host attends the first positions of every streamed head, the GPU the rest (merged by
log-sum-exp). Whole heads were too coarse: at 1M tokens on the H100 a layer offloaded
4-5 heads of 0.5 GB, so one host head per layer left the host idle and two made it the
bottleneck (0.89 tok/s against a bound of 1.26). A quantized host tier is read in whole
rows, so there the search counts host heads of the layer that offloads the most, and
every other layer takes the same share of its own (:func:`layer_share`).
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from headspace.attention.kernels import split_decode_attention
from headspace.kv.tiers import host_empty

SHARE_STEPS = 16  # a host share of positions is searched in sixteenths
# A larger host part is kept only if its steps beat a smaller one by this much: two-step minima differ by 1-3% from
# noise alone, and at 512K on the H100 a 12% share measured faster than none in the search decoded at 11.85 tok/s
# against 12.59 without (results/h100_llama3_8b_placement_512k_1m_shares.json).
MARGIN = 0.03


class SplitSearch:
    """Hill climbing over a split in 0..``most`` on measured decode-step times: host heads (of the layer that
    offloads the most), or with ``shares`` a host share of positions in steps of 1/``most``."""

    def __init__(self, most: int, start: int, steps_per_trial: int = 2, shares: bool = False):
        self.most, self.shares = most, shares
        self.current = max(0, min(start, most))
        self.steps_per_trial = steps_per_trial
        self.times: dict[int, float] = {}  # split -> fastest step seen with it
        self.direction = 1
        self.done = most == 0
        self._samples: list[float] = []

    def record(self, seconds: float) -> int:
        """Take the time of a step run with ``current`` host heads; return the split for the next step."""
        if self.done:
            return self.current
        self._samples.append(seconds)
        if len(self._samples) < self.steps_per_trial:
            return self.current
        self.times[self.current] = min(self._samples)  # the fastest: noise only ever slows a step
        self._samples = []
        best = min(self.times, key=self.times.__getitem__)
        # the neighbours of the best split so far, then none on the host at all: a host part costs a fixed wait
        # per layer (the query to the host, the worker, the result back), which can make every small share slower
        # than none (at 512K on the H100 a layer offloads one head or none: 8.0 tok/s at the share the climb
        # settled on, 9.7-12.3 without host attention), a step that no climb of one unit at a time sees
        for candidate, direction in ((best + self.direction, self.direction),
                                     (best - self.direction, -self.direction), (0, self.direction)):
            if 0 <= candidate <= self.most and candidate not in self.times:
                self.direction, self.current = direction, candidate
                return candidate
        # the smallest host part within noise of the fastest: a host part costs cores, and its result is waited
        # for in every layer, where copies run ahead (at 1M on the H100 the host side spent a fifth of a step
        # between its jobs); so none unless a host part is faster by MARGIN
        fastest = self.times[best]
        best = min(split for split, seconds in self.times.items() if (1 - MARGIN) * seconds <= fastest)
        self.done, self.current = True, best
        return best


def layer_share(cpu_heads: int, offloaded: int, most: int) -> int:
    """Host-attended heads of a layer that offloads ``offloaded`` heads, when the layer that offloads the most
    (``most``) attends ``cpu_heads``: the same share, rounded to the nearest head (halves up)."""
    if most == 0:
        return 0
    return min(offloaded, (2 * cpu_heads * offloaded + most) // (2 * most))


def predicted_split(most: int, host_rate: float, pcie_rate: float) -> int:
    """The host's part, of ``most`` (heads, or steps of a share), at which the host CPU (attending KV at
    ``host_rate`` bytes/s) and the copies (``pcie_rate`` bytes/s) finish together: their share in proportion to
    the rates, rounded to the nearest unit (halves up)."""
    if most == 0 or host_rate <= 0:
        return 0
    return min(most, int(most * host_rate / (host_rate + pcie_rate) + 0.5))


def copy_rate(dst: torch.Tensor, src: torch.Tensor, device: torch.device, repeats: int = 5) -> float:
    """Bytes/s of ``dst.copy_(src)`` (asynchronous where it can be): the fastest of ``repeats`` timed copies, after
    one untimed. A rate is a ceiling, and noise only ever slows a copy: on the H100 the mean of three ranged from
    45 to 54 GB/s between runs, and decode then streamed faster than the "ceiling" (113% of its bound)."""
    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    dst.copy_(src, non_blocking=True)
    fastest = float("inf")
    for _ in range(repeats):
        start = sync()
        dst.copy_(src, non_blocking=True)
        fastest = min(fastest, sync() - start)
    return src.numel() * src.element_size() / fastest


# Cores the host worker leaves to the thread that drives the GPU and to the CUDA driver: measured on the H100 host
# (benchmarks/results/h100_host_concurrency_1m.json, 16 cores, 2 heads of 1M positions), host attention while a
# copy streamed ran at 40.0 GB/s with 14 threads and at 38.6 GB/s with all 16; on an earlier host, 40.8 and 31.8.
SPARE_CORES = 2


class HostWorker:
    """The threads that run decode attention on the host CPU (its kernels release the GIL), and its jobs in flight.

    Two threads, so that a layer's job can begin, and wait in the kernel for its query, while the job of the layer
    before still runs: no Python then stands between the two (:mod:`headspace.kv.signals`). Each has every core
    torch has but :data:`SPARE_CORES` (a thread's own count: the caller's stays as it was). Jobs are waited for in
    the order they were given (:meth:`settle`), which also raises a failed job's error in the caller's thread.
    """

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="headspace-host",
                                       initializer=torch.set_num_threads, initargs=(threads,))
        self.pending: deque[Future] = deque()

    def submit(self, job: Callable, *args) -> Future:
        while self.pending and self.pending[0].done():  # forget finished jobs (raising a failed one's error)
            self.pending.popleft().result()
        future = self.pool.submit(job, *args)
        self.pending.append(future)
        return future

    def settle(self, keep: int = 0) -> None:
        """Wait for the oldest jobs until at most ``keep`` are in flight, raising the first error met."""
        while len(self.pending) > keep:
            self.pending.popleft().result()


@functools.cache
def host_worker() -> HostWorker:
    """The process's host worker."""
    return HostWorker(max(1, torch.get_num_threads() - SPARE_CORES))


def host_attention_rate(copying: tuple[torch.Tensor, torch.Tensor] | None = None, tokens: int = 2**20,
                        repeats: int = 5) -> float:
    """Bytes/s of KV that the host worker attends in decode (two heads of ``tokens`` positions, bf16, as a layer's
    host-attended heads are), while host-to-device copies stream as they do in decode, when ``copying`` gives a
    device buffer and a pinned host buffer to copy between: both read host RAM and the copies need a core, so
    the host side is slower than alone. Keys and values are apart and 512 MiB each by default, several times a
    host's last-level cache: a smaller set, or keys read again as values, is partly served from the cache and
    measured faster than decode reads its KV (2**18 positions with the keys as values gave 38.6 GB/s on an
    H100 host, which put the host's share at 1M at 45%; the search, timing real steps, settled on 19%:
    results/h100_llama3_8b_placement_512k_1m_margin.json). The fastest of ``repeats`` passes, as a ceiling."""
    keys = torch.ones(1, 2, tokens, 128, dtype=torch.bfloat16)  # the values do not change the speed
    values = torch.ones_like(keys)
    query = torch.ones(1, 2, 4, 128, dtype=torch.bfloat16)

    def attend() -> float:
        splits = 4 * torch.get_num_threads()
        split_decode_attention(query, [(keys, values)], 0.1, splits)
        fastest = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            split_decode_attention(query, [(keys, values)], 0.1, splits)
            fastest = min(fastest, time.perf_counter() - start)
        return 2 * keys.numel() * keys.element_size() / fastest

    job = host_worker().submit(attend)
    if copying is not None:
        dst, src = copying
        with torch.cuda.stream(torch.cuda.Stream(dst.device)):
            while not job.done():
                dst.copy_(src, non_blocking=True)
                torch.cuda.current_stream(dst.device).synchronize()
    return job.result()


@functools.cache
def measured_rates(device: torch.device) -> tuple[float, float]:
    """(host attention while copies stream, host-to-device copy) bytes/s on this machine, measured once per
    process and device (about 0.1 s): what :func:`predicted_split` balances."""
    cuda = device.type == "cuda"
    host = host_empty((2**26,), torch.bfloat16, pin=cuda)  # 128 MiB
    on_device = torch.empty_like(host, device=device)
    return host_attention_rate((on_device, host) if cuda else None), copy_rate(on_device, host, device)
