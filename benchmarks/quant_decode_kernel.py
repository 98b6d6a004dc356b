"""Decode attention over quantized KV on the GPU: the Triton kernel against the two ways around it.

For one layer's KV heads of the Llama-3-8B shape (8 KV heads of 128, 4 query heads each), at
each context and precision, the time of one decode attention:

* ``kernel``: :func:`~headspace.kv.quant.attend.quantized_decode_lse`, rows read once;
* ``dequantize + flash``: the rows dequantized into a bfloat16 buffer, then flash attention
  (what decode did before the kernel);
* ``bf16 flash``: flash attention over bfloat16 KV of the same length (the exact reference).

Each is given as time and as the rate of the bytes it must read (the rows, or the bf16 KV).
``--tune`` first times the kernel's block size, warps and splits at the longest context and keeps the
fastest. Needs a CUDA GPU. Run: ``python benchmarks/quant_decode_kernel.py --tune --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from headspace.attention.kernels import decode_lse
from headspace.kv.quant import triton_decode
from headspace.kv.quant.attend import quantized_decode_lse
from headspace.kv.quant.schemes import SCHEMES
from headspace.units import parse_tokens

HEADS, RATIO, DIM = 8, 4, 128


def timed(run, repeats: int) -> float:
    """Median seconds of ``run`` over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(context: int, name: str, repeats: int, kernel_only: bool = False) -> dict:
    scheme, scaling = SCHEMES[name], DIM**-0.5
    query = torch.randn(1, HEADS, RATIO, DIM, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(1, HEADS, context, DIM, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    row = {"context": context, "precision": name}
    if not kernel_only:
        row["bf16_flash_s"] = timed(lambda: decode_lse(query, keys, values, scaling), repeats)
        row["bf16_gb_per_s"] = 2 * keys.numel() * keys.element_size() / row["bf16_flash_s"] / 1e9
    if scheme.exact:
        return row
    key_rows, value_rows = scheme.quantize(keys, keys=True), scheme.quantize(values, keys=False)
    keys = values = None  # their memory back before timing the rows
    row["kernel_s"] = timed(lambda: quantized_decode_lse(query, key_rows, value_rows, scheme, scaling), repeats)
    row["kernel_gb_per_s"] = 2 * key_rows.numel() / row["kernel_s"] / 1e9
    if kernel_only:
        return row

    def dequantize_then_flash():
        k = scheme.dequantize(key_rows, True, DIM, torch.bfloat16)
        v = scheme.dequantize(value_rows, False, DIM, torch.bfloat16)
        return decode_lse(query, k, v, scaling)

    row["dequantize_flash_s"] = timed(dequantize_then_flash, repeats)
    row["kernel_speedup_vs_bf16"] = row["bf16_flash_s"] / row["kernel_s"]
    return row


def tune(context: int, names: list[str], repeats: int) -> list[dict]:
    """Kernel time per (block, warps) at ``context``; leaves the fastest in place (summed over ``names``)."""
    trials = []
    for block in (32, 64, 128):
        for warps in (2, 4):
            for splits in (4, 16):
                triton_decode.BLOCK, triton_decode.WARPS, triton_decode.SPLITS_PER_UNIT = block, warps, splits
                seconds = {name: measure(context, name, repeats, kernel_only=True)["kernel_s"] for name in names}
                trials.append({"block": block, "warps": warps, "splits_per_unit": splits, **seconds})
                print(f"block {block:>3} warps {warps} splits/SM {splits:>2}: "
                      + "  ".join(f"{n} {t * 1e3:.3f}ms" for n, t in seconds.items()))
    best = min(trials, key=lambda trial: sum(trial[name] for name in names))
    triton_decode.BLOCK, triton_decode.WARPS = best["block"], best["warps"]
    triton_decode.SPLITS_PER_UNIT = best["splits_per_unit"]
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="32k,512k")
    parser.add_argument("--precisions", default="fp8,int8,int4,int2")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    contexts, names = [parse_tokens(c) for c in args.contexts.split(",")], args.precisions.split(",")
    trials = tune(max(contexts), names, args.repeats) if args.tune else []
    rows = [measure(context, name, args.repeats) for context in contexts for name in names]
    print(f"{'context':>8} {'precision':>9} {'bf16 flash':>11} {'kernel':>9} {'deq+flash':>10} {'kernel GB/s':>12}"
          f" {'vs bf16':>8}")
    for row in rows:
        print(f"{row['context']:>8} {row['precision']:>9} {row['bf16_flash_s'] * 1e3:>9.3f}ms "
              f"{row.get('kernel_s', 0) * 1e3:>7.3f}ms {row.get('dequantize_flash_s', 0) * 1e3:>8.3f}ms "
              f"{row.get('kernel_gb_per_s', 0):>12.0f} {row.get('kernel_speedup_vs_bf16', 0):>7.2f}x")
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "heads": HEADS, "ratio": RATIO, "head_dim": DIM, "block": triton_decode.BLOCK,
                "warps": triton_decode.WARPS, "splits_per_unit": triton_decode.SPLITS_PER_UNIT}
        args.json.write_text(json.dumps({"meta": meta, "tuning": trials, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
