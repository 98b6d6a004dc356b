"""What ``compile_layers`` costs a process once, and gives each step after: the first decode steps at 32K.

Prefills 32K random tokens into an ``offload`` cache with every head resident (Llama-3-8B
architecture, random weights, bf16) and times the first four decode steps one by one (the first
captures the CUDA graph, and with ``compile_layers`` compiles the decoder layers), then 200
more, with and without compiling. Run it with ``TORCHINDUCTOR_CACHE_DIR`` pointing at an empty
folder for a cold compile:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python3 benchmarks/compile_time.py \\
        --json results/h100_compile_time_32k_cold.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from headspace import Engine, bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("compile_time.json"))
    args = parser.parse_args()
    device = torch.device("cuda")
    model = bench.random_model("llama-3-8b", device, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 32768), generator=torch.Generator().manual_seed(0))
    result = {}
    for compiled in (False, True):
        engine = Engine(model, None, mode="offload", chunk_size=4096, gpu_heads="auto", compile_layers=compiled,
                        allow_beyond_positions=True)
        start = time.perf_counter()
        logits, cache = engine.prefill(ids.to(device))
        torch.cuda.synchronize()
        prefill = time.perf_counter() - start
        token = logits.argmax(-1, keepdim=True)
        first = []
        for _ in range(4):
            start = time.perf_counter()
            engine.decode_step(token, cache)
            torch.cuda.synchronize()
            first.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(200):
            engine.decode_step(token, cache)
        torch.cuda.synchronize()
        result["compiled" if compiled else "plain"] = dict(prefill_s=prefill, first_steps_s=first,
                                                           tok_s=200 / (time.perf_counter() - start))
        print(result, flush=True)
        del cache, logits
        torch.cuda.empty_cache()
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
