"""What this machine offers a run: device memory left after the weights, and host RAM.

Read once when a cache is planned (or by ``headspace info``): CUDA's free memory,
less what a ``gpu_memory`` cap leaves, and the host RAM available now, of which
:data:`HOST_HEADROOM` may hold KV. On a CPU there is no device memory of its own:
both tiers are host RAM, and a ``gpu_memory`` given in bytes plays the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from headspace.errors import HeadspaceError
from headspace.units import human_bytes

HOST_HEADROOM = 0.9  # of the available host RAM, the share KV may take


@dataclass(frozen=True)
class Machine:
    """The memory a run can place KV and its working set in.

    ``device``: bytes the run may still allocate on the device, the weights already counted
    (None: unknown, or no device memory of its own); ``host``: host RAM available;
    ``shared``: the device tier is host RAM too (a CPU run), so both tiers count against it.
    """

    device: int | None
    host: int
    shared: bool = False
    capped: bool = False  # a gpu_memory cap set ``device`` below the free memory

    @property
    def host_room(self) -> int:
        """Host RAM that KV may take."""
        return int(HOST_HEADROOM * self.host)


def probe(device: torch.device, weights: int, cap: int | float | None = None, loaded: bool = True) -> Machine:
    """This machine's memory for a run on ``device`` with ``weights`` bytes of weights, ``loaded`` already or not
    (``headspace info`` plans before loading). ``cap``: the most the run may hold on the device, weights
    included, in bytes or as a fraction of the device.

    On CUDA the figure is the memory free now (cached blocks released first), less the weights
    still to load, and within the cap counting what this process holds through PyTorch. Without
    a CUDA device to measure (a CPU run, or planning for a GPU elsewhere) only a cap in bytes
    gives a figure. Host RAM is what is available now, less the weights still to load on a CPU.
    """
    host = psutil.virtual_memory().available
    if device.type == "cpu" and not loaded:
        host -= weights  # they will take host RAM too
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_allocated(device) if loaded else 0
        pending = 0 if loaded else weights
        room = free - pending
        if cap is None:
            return Machine(room, host)
        limit = cap if isinstance(cap, int) else int(cap * total)
        if limit < held + pending:
            raise HeadspaceError(f"gpu_memory {human_bytes(limit)} is less than the {human_bytes(held + pending)} "
                                 f"the run holds on the device (the weights); give more (--gpu-memory)")
        return Machine(min(room, limit - held - pending), host, capped=limit - held - pending < room)
    if cap is None:
        return Machine(None, host, shared=device.type == "cpu")
    if isinstance(cap, float):
        raise HeadspaceError(f"gpu_memory as a fraction ({cap}) needs a CUDA device to measure; "
                             f"give bytes instead (--gpu-memory 20GiB)")
    if cap < weights:
        raise HeadspaceError(f"gpu_memory {human_bytes(cap)} is less than the {human_bytes(weights)} of weights; "
                             f"give more (--gpu-memory)")
    return Machine(cap - weights, host, shared=device.type == "cpu", capped=True)


def check_host_ram(host_bytes: int, headroom: float = HOST_HEADROOM,
                   ways_out: str = "shorten the context, keep more heads on the GPU, or use an eviction mode") -> None:
    """Refuse before allocating when host RAM cannot hold ``host_bytes`` of KV; ``ways_out`` says what to do."""
    available = psutil.virtual_memory().available
    if host_bytes > headroom * available:
        raise HeadspaceError(
            f"not enough host RAM: the offloaded KV needs {human_bytes(host_bytes)} but only "
            f"{human_bytes(available)} is available ({ways_out})"
        )


def memory_shortfall(device_bytes: int, host_bytes: int, device: torch.device) -> str | None:
    """What is missing, in words, for a new cache of ``device_bytes`` on ``device`` and ``host_bytes`` in host RAM
    (within :data:`HOST_HEADROOM` of what is free now); None when both fit. Kept documents are dropped until
    this says None."""
    machine = probe(device, 0)
    if machine.device is None:  # a CPU run: the device tier is host RAM too
        host_bytes, device_bytes = host_bytes + device_bytes, 0
    if host_bytes > machine.host_room:
        return f"host RAM: {human_bytes(host_bytes)} needed, {human_bytes(machine.host)} available"
    if machine.device is not None and device_bytes > HOST_HEADROOM * machine.device:
        return f"GPU memory: {human_bytes(device_bytes)} needed, {human_bytes(machine.device)} free"
    return None
