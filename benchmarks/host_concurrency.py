"""Host attention and PCIe copies, alone and at once: the rates a decode split really gets.

In decode, the offloaded heads of a layer are shared between the host CPU (which attends the
KV where it lies) and the copies to the GPU, both reading host RAM at the same time. The
split search starts where the two rates *measured alone* balance, and the bench's bound adds
them; at 1M tokens on the H100 the host side reached half its measured rate while the GPU
streamed. This script measures each side alone and both at once, at several host thread
counts, on one layer's worth of KV (``--heads`` heads of ``--context`` positions, bf16,
page-locked as the cache keeps it), so the split can be predicted from rates that hold. Columns: each
side's rate alone and together (GB/s), and ``sum_together``, both sides' bytes over the longer of their two
times.

Run (CUDA): ``python3 benchmarks/host_concurrency.py --context 1m --json out.json``. On a CPU
the copy side is skipped (there is no PCIe).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch

from headspace.attention.kernels import split_decode_attention
from headspace.kv.tiers import host_empty
from headspace.units import parse_tokens

HEAD_DIM = 128
RATIO = 4  # query heads per KV head (Llama-3-8B)


def host_attention(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> float:
    """Seconds of one host decode attention over ``keys``/``values``, with every thread torch has."""
    start = time.perf_counter()
    split_decode_attention(query, [(keys, values)], 0.1, 4 * torch.get_num_threads())
    return time.perf_counter() - start


def copy(dst: torch.Tensor, src: torch.Tensor) -> float:
    """Seconds of one host-to-device copy of ``src``."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def together(keys, values, query, dst, src) -> tuple[float, float]:
    """Seconds of the host attention and of the copy, started at once (the copy on a side stream, waited
    for on a second thread, as decode does)."""
    seconds = {}

    def copier() -> None:
        seconds["copy"] = copy(dst, src)

    thread = threading.Thread(target=copier)
    thread.start()
    seconds["host"] = host_attention(keys, values, query)
    thread.join()
    return seconds["host"], seconds["copy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=parse_tokens, default=parse_tokens("1m"))
    parser.add_argument("--heads", type=int, default=2, help="KV heads the host attends (and as many copied)")
    parser.add_argument("--threads", default="16,14,12,8", help="host thread counts to try (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    shape = (1, args.heads, args.context, HEAD_DIM)
    keys, values = host_empty(shape, torch.bfloat16, pin=cuda), host_empty(shape, torch.bfloat16, pin=cuda)
    keys.normal_(), values.normal_()
    query = torch.randn(1, args.heads, RATIO, HEAD_DIM, dtype=torch.bfloat16)
    kv_bytes = 2 * keys.numel() * keys.element_size()
    src = torch.cat([keys.flatten(), values.flatten()]) if cuda else None
    if cuda:
        src = host_empty(src.shape, torch.bfloat16, pin=True).copy_(src)
        dst = torch.empty_like(src, device="cuda")
        copy(dst, src)

    rows = []
    cores = os.cpu_count() or 1
    for threads in [int(n) for n in args.threads.split(",") if int(n) <= cores]:
        torch.set_num_threads(threads)
        host_attention(keys, values, query)  # warm the thread pool
        alone = min(host_attention(keys, values, query) for _ in range(args.repeats))
        row = {"threads": threads, "host_alone_gb_s": kv_bytes / alone / 1e9}
        if cuda:
            copy_alone = min(copy(dst, src) for _ in range(args.repeats))
            both = [together(keys, values, query, dst, src) for _ in range(args.repeats)]
            host_both, copy_both = min(b[0] for b in both), min(b[1] for b in both)
            row |= {"copy_alone_gb_s": kv_bytes / copy_alone / 1e9, "host_together_gb_s": kv_bytes / host_both / 1e9,
                    "copy_together_gb_s": kv_bytes / copy_both / 1e9,
                    "sum_together_gb_s": 2 * kv_bytes / max(host_both, copy_both) / 1e9}
        rows.append(row)

    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "context": args.context, "heads": args.heads,
                "kv_bytes": kv_bytes, "device": torch.cuda.get_device_name() if cuda else "cpu",
                "cores": cores}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
