"""What compressing a kept document after an exact prefill costs: device memory, host RAM and time.

A document of N random token ids is prefilled and compressed at ``--compression`` (Locret, random
retaining heads: memory and speed do not depend on their values), then one question is asked of it.
Columns, all at the same ratio:

* ``locret``: the default, an exact prefill: evicted tokens wait in host RAM until the prompt's end, then
  are freed, and are merged into summaries (``prefill=exact``, ``merge=64`` at 8x);
* ``locret chunked``: chunked eviction, each chunk computed over what is left (the paper's recipe);
* ``locret once merge``: the whole prompt held on the device, compressed once, evicted tokens merged (the
  same tokens are kept as by the default, the same summaries);
* ``offload+locret release merge``: the default's computation spelled through offload+locret;
* ``offload+locret``: evicted tokens stay in host RAM; a question's prefill attends them all.

Peak device bytes are counted from the allocator, beyond the weights; "kept" is what the document holds
once prefilled (device, host).

    python3 benchmarks/exact_then_compress.py --model random:llama-3-8b --tokens 128k --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from headspace import Engine, load_model
from headspace.eviction.retaining.heads import HeadsSpec, RetainingHeads
from headspace.kv.cache import kv_bytes
from headspace.units import human_bytes, parse_tokens

COLUMNS = [("locret", "locret", {}), ("locret chunked", "locret", dict(prefill="chunked")),
           ("locret once merge", "locret", dict(once=True, merge=64)),
           ("offload+locret release merge", "offload+locret", dict(release=True, merge=64)),
           ("offload+locret", "offload+locret", {})]


def peak_since(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def run(model, heads: RetainingHeads, tokens: int, compression: float, chunk_size: int) -> list[dict]:
    device = model.device
    generator = torch.Generator().manual_seed(0)
    document_ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
    question = torch.randint(0, model.config.vocab_size, (1, 32), generator=generator)
    rows = []
    for label, mode, options in COLUMNS:
        engine = Engine(model, mode=mode, compression=compression, heads=heads, chunk_size=chunk_size,
                        keep_bytes=0, cuda_graphs=False, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        start = time.perf_counter()
        document = engine.prefill_document(document_ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prefill = time.perf_counter() - start
        peak = peak_since(device) - before
        kept_device, kept_host = kv_bytes(document.cache)
        answer = engine.ask(document, question, max_new_tokens=16, stop_on_eos=False)
        rows.append(dict(column=label, mode=mode, options=options, tokens=tokens, compression=compression,
                         prefill_s=round(prefill, 2), peak_device_bytes=peak, kept_device_bytes=kept_device,
                         kept_host_bytes=kept_host, question_prefill_s=round(answer.stats.prefill_seconds, 3),
                         decode_tok_s=round(answer.stats.decode_tokens_per_s, 1)))
        del document, engine, answer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=parse_tokens, default=parse_tokens("128k"))
    parser.add_argument("--compression", type=float, default=8.0)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--json", type=Path, default=Path("exact_then_compress.json"))
    args = parser.parse_args()
    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    torch.manual_seed(0)
    heads = RetainingHeads(HeadsSpec.from_config(model.config)).to(model.device)  # scores in float32
    run(model, heads, 4 * args.chunk_size, args.compression, args.chunk_size)  # warm-up: kernels, pinned pools
    rows = run(model, heads, args.tokens, args.compression, args.chunk_size)
    print(f"{'column':<30} {'prefill s':>9} {'peak device':>12} {'kept device':>12} {'kept host':>11} "
          f"{'question s':>10} {'decode tok/s':>12}")
    for row in rows:
        print(f"{row['column']:<30} {row['prefill_s']:>9} {human_bytes(row['peak_device_bytes']):>12} "
              f"{human_bytes(row['kept_device_bytes']):>12} {human_bytes(row['kept_host_bytes']):>11} "
              f"{row['question_prefill_s']:>10} {row['decode_tok_s']:>12}")
    info = dict(model=args.model, dtype=args.dtype, device=str(model.device), chunk_size=args.chunk_size,
                gpu=torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else None)
    args.json.write_text(json.dumps(dict(info=info, rows=rows), indent=1))


if __name__ == "__main__":
    main()
