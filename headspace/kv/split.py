"""How many offloaded heads to attend on the host CPU in decode: found by measuring.

Streaming a head costs PCIe time, attending it on the host costs host memory
bandwidth and cores; the best split is where both sides finish together. That
point depends on the machine (on two H100 hosts of the same kind the host side
ran at 50 and at 13 GB/s) and on what else runs there, so the search times real
decode steps: it starts where the two rates measured when the cache is made put the
balance (:func:`predicted_split`: the offloaded heads shared in proportion to the
host's attention rate and the PCIe copy rate), moves one head at a time while steps
get faster, and keeps the fastest split it found. (Starting from a fixed guess, a
quarter of the heads, it stopped at 1 of 6 at 1.39M tokens on the H100, where the
rates put the balance at 3: each step it tries is a local comparison, so the start
matters.)

Layers may offload different numbers of heads (a placement plan fills the GPU head
by head). Within a layer the host and the copies run side by side, so what balances
them is a share of that layer's offloaded heads: the search counts the heads of the
layer that offloads the most, and every other layer takes the same share of its own
(:func:`layer_share`).
"""

from __future__ import annotations

import functools
import time

import torch

from headspace.attention.kernels import split_decode_attention
from headspace.kv.tiers import host_empty


class SplitSearch:
    """Hill climbing over ``cpu_heads`` in 0..``most`` on measured decode-step times."""

    def __init__(self, most: int, start: int, steps_per_trial: int = 2):
        self.most = most
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
        for direction in (self.direction, -self.direction):
            candidate = best + direction
            if 0 <= candidate <= self.most and candidate not in self.times:
                self.direction, self.current = direction, candidate
                return candidate
        self.done, self.current = True, best
        return best


def layer_share(cpu_heads: int, offloaded: int, most: int) -> int:
    """Host-attended heads of a layer that offloads ``offloaded`` heads, when the layer that offloads the most
    (``most``) attends ``cpu_heads``: the same share, rounded to the nearest head (halves up)."""
    if most == 0:
        return 0
    return min(offloaded, (2 * cpu_heads * offloaded + most) // (2 * most))


def predicted_split(most: int, host_rate: float, pcie_rate: float) -> int:
    """The host-attended heads, of ``most`` offloaded, at which the host CPU (attending KV at ``host_rate``
    bytes/s) and the copies (``pcie_rate`` bytes/s) finish together: their share in proportion to the rates,
    rounded to the nearest head (halves up)."""
    if most == 0 or host_rate <= 0:
        return 0
    return min(most, int(most * host_rate / (host_rate + pcie_rate) + 0.5))


def copy_rate(dst: torch.Tensor, src: torch.Tensor, device: torch.device, repeats: int = 3) -> float:
    """Bytes/s of ``dst.copy_(src)`` (asynchronous where it can be), after one untimed copy."""
    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    dst.copy_(src, non_blocking=True)
    start = sync()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    return repeats * src.numel() * src.element_size() / (sync() - start)


def host_attention_rate(tokens: int = 2**18, repeats: int = 3) -> float:
    """Bytes/s of KV that the host CPU attends in decode (two heads of ``tokens`` positions, bf16, as a layer's
    host-attended heads are, with every core)."""
    keys = torch.ones(1, 2, tokens, 128, dtype=torch.bfloat16)  # the values do not change the speed
    query = torch.ones(1, 2, 4, 128, dtype=torch.bfloat16)
    splits = 4 * torch.get_num_threads()
    split_decode_attention(query, [(keys, keys)], 0.1, splits)
    start = time.perf_counter()
    for _ in range(repeats):
        split_decode_attention(query, [(keys, keys)], 0.1, splits)
    return repeats * 2 * keys.numel() * keys.element_size() / (time.perf_counter() - start)


@functools.cache
def measured_rates(device: torch.device) -> tuple[float, float]:
    """(host attention, host-to-device copy) bytes/s on this machine, measured once per process and device
    (about 0.1 s): what :func:`predicted_split` balances."""
    host = host_empty((2**26,), torch.bfloat16, pin=device.type == "cuda")  # 128 MiB
    return host_attention_rate(), copy_rate(torch.empty_like(host, device=device), host, device)
