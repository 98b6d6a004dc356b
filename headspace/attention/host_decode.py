"""Decode attention on the host CPU through a small C kernel (``host_decode.c``), compiled on first use.

At 1M tokens on the H100 the host attends tens of GB of KV per decoded token while the
copies stream the rest; torch's CPU attention ran a few query rows per KV head at 3.4-3.7
GB/s per core on that host, well under what its memory delivers, so the host's share stayed
small. The kernel reads each row once and keeps everything else in registers and L1.

It is built with the machine's C compiler (``cc``, or ``$CC``) for the machine's own
instruction set and cached under ``$XDG_CACHE_HOME/headspace`` (``~/.cache/headspace``).
Where no compiler works, or ``HEADSPACE_HOST_KERNEL=torch`` is set, :func:`host_decode_lse`
answers None and the caller attends with torch; the first failure is reported once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from headspace.errors import HeadspaceError

SOURCE = Path(__file__).with_name("host_decode.c")
# -ffast-math lets the compiler reorder the dot products' sums into vector lanes and call the vector exp; the
# kernel never meets an infinity (its running maximum starts at a finite -1e30). It is given when compiling only:
# linked with it, gcc adds start-up code that flushes subnormal numbers to zero in the whole process.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
LINK = ["-shared", "-fopenmp", "-lm"]
MAX_RATIO, MAX_DIM, LANES = 16, 256, 16  # the kernel's arrays and vector width (host_decode.c)
STORAGE = {torch.bfloat16: 1, torch.float32: 0}  # the kernel's `half` flag per KV dtype
MIN_ITEM = 1024  # positions: an item's fixed cost (its setup, one dynamic schedule step) stays under 1%


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "headspace"


@functools.cache
def library(extra: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernel, built once per source, compiler, flags (``extra`` after :data:`FLAGS`) and machine;
    None (with one warning) if it cannot be."""
    if os.environ.get("HEADSPACE_HOST_KERNEL", "").lower() == "torch":
        return None
    compiler = os.environ.get("CC", "cc")
    flags = [*FLAGS, *extra]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags, *LINK, platform.node(), platform.machine()]).encode())
    target = cache_dir() / f"host_decode-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                built, objects = Path(scratch) / target.name, Path(scratch) / "host_decode.o"
                for command in ([compiler, *flags, "-c", str(SOURCE), "-o", str(objects)],
                                [compiler, str(objects), *LINK, "-o", str(built)]):
                    subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
                os.replace(built, target)  # atomic: a process that races this one loads a whole file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"headspace: the host attention kernel could not be built ({str(detail).strip()[:300]}); "
                      "attending on the host with torch, which is slower", RuntimeWarning, stacklevel=2)
        return None
    lib.headspace_host_decode.restype = ctypes.c_int
    return lib


def items_of(spans: list[tuple[torch.Tensor, torch.Tensor]], heads: int, threads: int) -> torch.Tensor:
    """The work the threads share: (span, head, first, stop) rows, every span's positions cut into pieces so
    that there are about four per thread (the dynamic schedule evens out pieces that run slower) and none
    under :data:`MIN_ITEM` positions."""
    total = sum(keys.shape[2] for keys, _ in spans) * heads
    size = max(MIN_ITEM, -(-total // (4 * threads)))
    rows = []
    for index, (keys, _) in enumerate(spans):
        length = keys.shape[2]
        pieces = max(1, round(length / size))
        bounds = [length * p // pieces for p in range(pieces + 1)]
        rows += [(index, head, first, stop) for head in range(heads)
                 for first, stop in zip(bounds, bounds[1:]) if stop > first]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)


def supported(query: torch.Tensor, spans: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether the kernel takes these tensors: on the CPU, one sequence, its dtypes and sizes (head sizes in
    whole vectors), rows contiguous."""
    batch, _, ratio, dim = query.shape
    if batch != 1 or ratio > MAX_RATIO or dim > MAX_DIM or dim % LANES or not spans:
        return False
    dtype = spans[0][0].dtype
    return dtype in STORAGE and all(
        tensor.device.type == "cpu" and tensor.dtype == dtype and tensor.stride(-1) == 1 and tensor.stride(-2) == dim
        for pair in spans for tensor in pair)


class Handoff(NamedTuple):
    """Two int32 flags in pinned memory, by address: the kernel reads its query once ``ready`` has reached
    ``ready_value`` (the GPU's copy stream sets it after the query's copy), and sets ``done`` to ``done_value``
    once its output is written (the GPU's compute stream waits for that before it reads the output)."""

    ready: int
    ready_value: int
    done: int
    done_value: int


PATIENCE = 60.0  # seconds a handed-off call waits for its query before it gives up


def host_decode_lse(query: torch.Tensor, spans: list[tuple[torch.Tensor, torch.Tensor]], scaling: float,
                    threads: int, lib: ctypes.CDLL | None = None, into: tuple[torch.Tensor, torch.Tensor] | None = None,
                    handoff: Handoff | None = None, times: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decode attention of ``query`` (1, Hk, R, D), the R query rows of each KV head, over the consecutive
    ``spans`` of (1, Hk, n, D) keys and values, on ``threads`` cores: the output (1, Hk, R, D) in the query's
    dtype and the log-sum-exp (1, Hk, R) in float32. None when the kernel is not available or does not take
    these tensors (:func:`supported`), answered before anything is waited for. ``lib``: a build of the kernel
    other than :func:`library`'s.

    ``into``: contiguous float32 (output, log-sum-exp) to write and return instead. ``handoff``: the flags of a
    call that begins before its query has arrived (:class:`Handoff`); the query is then float32 and contiguous,
    read where it lies. ``times``: a float64 pair that takes the monotonic clock's seconds when the query was
    there and when the output was written."""
    if not isinstance(spans, list):  # an iterable that makes its spans as it goes (quantized rows)
        return None
    spans = [(keys, values) for keys, values in spans if keys.shape[2]]
    lib = lib or library()
    if lib is None or not supported(query, spans):
        return None
    _, heads, ratio, dim = query.shape
    items = items_of(spans, heads, threads)
    rows = query.float().contiguous()
    if handoff is not None and rows.data_ptr() != query.data_ptr():
        raise ValueError("a query that is still arriving must be float32 and contiguous: it is read where it lies")
    parts = torch.empty(len(items), ratio, dim)
    part_lse = torch.empty(len(items), ratio)
    out, lse = into if into is not None else (torch.empty(1, heads, ratio, dim), torch.empty(1, heads, ratio))
    if not (out.dtype == lse.dtype == torch.float32 and out.is_contiguous() and lse.is_contiguous()):
        raise ValueError("the kernel writes contiguous float32 outputs")
    if times is not None and (times.dtype != torch.float64 or times.numel() != 2):
        raise ValueError("times must be two float64 numbers")

    def pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
        return (ctypes.c_void_p * len(tensors))(*(tensor.data_ptr() for tensor in tensors))

    def strides(tensors: list[torch.Tensor]) -> ctypes.Array:
        return (ctypes.c_int64 * len(tensors))(*(tensor.stride(1) for tensor in tensors))

    keys, values = [pair[0] for pair in spans], [pair[1] for pair in spans]
    status = lib.headspace_host_decode(
        ctypes.c_int64(len(items)), ctypes.c_void_p(items.data_ptr()), pointers(keys), pointers(values),
        strides(keys), strides(values), ctypes.c_int(STORAGE[keys[0].dtype]), ctypes.c_void_p(rows.data_ptr()),
        ctypes.c_float(scaling), ctypes.c_int64(heads), ctypes.c_int64(ratio), ctypes.c_int64(dim),
        ctypes.c_void_p(parts.data_ptr()), ctypes.c_void_p(part_lse.data_ptr()), ctypes.c_void_p(out.data_ptr()),
        ctypes.c_void_p(lse.data_ptr()), ctypes.c_int(threads), *flags(handoff),
        ctypes.c_void_p(times.data_ptr() if times is not None else None))
    if status == -2:
        raise HeadspaceError(f"the host attention waited {PATIENCE:.0f} s for its query from the GPU; the GPU "
                             "stopped before it copied the query (see the error it reported)")
    if status != 0:
        raise ValueError(f"host decode kernel refused ratio {ratio}, head size {dim}")
    return (out, lse) if into is not None else (out.to(query.dtype), lse)


def flags(handoff: Handoff | None) -> tuple:
    """The kernel's last arguments: the flags it waits for and sets, and how long it waits."""
    if handoff is None:
        return ctypes.c_void_p(None), ctypes.c_int32(0), ctypes.c_void_p(None), ctypes.c_int32(0), ctypes.c_double(0)
    return (ctypes.c_void_p(handoff.ready), ctypes.c_int32(handoff.ready_value), ctypes.c_void_p(handoff.done),
            ctypes.c_int32(handoff.done_value), ctypes.c_double(PATIENCE))
