"""What storing KV in fewer bits costs in answers: the evaluation suite per ``kv_dtype``, against exact KV.

Every precision runs ``offload`` (or, with ``--mode``, an eviction mode at ``--compression``,
its budget stored at that precision: bf16, fp8, int8) with KV stored at that precision in both
tiers (the ``full`` column is plain transformers), through the same harness as ``headspace eval``
(needle tasks on the noise and the varied haystack, variable tracking, common words, the held-out
family). Besides the scores, each sample's prompt is prefilled once per precision and the logits
of its last token compared with the reference's (``full`` for offload, the same eviction mode with
exact KV otherwise, so that only the precision differs): the mean and the largest absolute
difference. A precision is marked lossy when it solves more than one needle sample in twelve
fewer than ``bf16`` (exact) does.

Prints a markdown table and writes it (``--table``) with the JSON of every record
(``--json``); a second run with the same JSON resumes.

    python3 benchmarks/kv_precision_quality.py --model smollm2-135m --lengths 2048 --samples 1 \\
        --json benchmarks/results/kv_precision_smollm2_cpu.json
    python3 benchmarks/kv_precision_quality.py --model gemma3-270m --lengths 4096,8192 --samples 2 \\
        --json benchmarks/results/kv_precision_gemma3_h100.json
    python3 benchmarks/kv_precision_quality.py --model smollm2-135m --mode snapkv --precisions bf16,fp8,int8 \
        --json benchmarks/results/kv_precision_snapkv_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from headspace.engine.engine import Engine
from headspace.evaluation.harness import EvalConfig, ModeSpec, evaluate, samples_for
from headspace.evaluation.tasks import HELDOUT_TASKS, NEEDLE_TASKS, TASKS
from headspace.kv.quant.schemes import SCHEMES
from headspace.models import default_device, default_dtype, load_model
from headspace.shape import ModelShape


def logit_differences(model, tokenizer, config: EvalConfig, spec: ModeSpec,
                      precisions: list[str]) -> dict[str, list[float]]:
    """Per precision, the largest |logit - the reference's logit| at each sample prompt's last token: ``full``'s
    for offload, ``spec``'s mode with exact KV for an eviction mode."""
    exact = ModeSpec("full", "full") if spec.mode == "offload" else spec
    reference = Engine(model, tokenizer, mode=exact.mode, chunk_size=config.chunk_size, keep_bytes=0, **exact.options)
    engines = {name: Engine(model, tokenizer, mode=spec.mode, chunk_size=config.chunk_size, keep_bytes=0,
                            **spec.options, kv_dtype=name) for name in precisions}
    found: dict[str, list[float]] = {name: [] for name in precisions}
    for sample in samples_for(config, tokenizer):
        ids = reference.encode(sample.prompt)
        expected = reference.prefill(ids)[0].float()
        for name, engine in engines.items():
            found[name].append((engine.prefill(ids)[0].float() - expected).abs().max().item())
    return found


def summary(records: list[dict], differences: dict[str, list[float]], shape: ModelShape,
            itemsize: int) -> list[dict]:
    """One row per precision: bytes per token, needles solved, scores, logit differences, lossy or not."""
    rows = []
    for name, diffs in differences.items():
        mine = [r for r in records if r["mode"] == f"kv={name}"]
        needles = [r for r in mine if r["task"] in NEEDLE_TASKS]
        main = [r for r in mine if r["task"] not in HELDOUT_TASKS]
        rows.append({"kv_dtype": name,
                     "kv_bytes_per_token": SCHEMES[name].bytes_per_token(shape.head_dim, itemsize) * shape.kv_heads
                     * shape.layers,
                     "needles_solved": sum(r["score"] == 1.0 for r in needles), "needles": len(needles),
                     "needle_score": 100 * sum(r["score"] for r in needles) / max(len(needles), 1),
                     "all_tasks_score": 100 * sum(r["score"] for r in main) / max(len(main), 1),
                     "mean_logit_diff": sum(diffs) / max(len(diffs), 1), "max_logit_diff": max(diffs, default=0.0)})
    exact = next((row for row in rows if row["kv_dtype"] == "bf16"), None)
    for row in rows:
        lost = exact["needles_solved"] - row["needles_solved"] if exact else 0
        row["lossy"] = bool(exact and row["needles"] and lost * 12 > row["needles"])
    return rows


def markdown(rows: list[dict], model: str, config: EvalConfig, device: str, mode: str, reference: str) -> str:
    lines = [f"KV precision of {mode} on {model} ({device}), lengths {', '.join(map(str, config.lengths))}, "
             f"{config.samples} sample(s) per task/depth, haystacks {', '.join(config.haystacks)}; "
             f"logit differences against `{reference}` at each prompt's last token.", "",
             "| kv_dtype | KV per token | needles solved | needle score | all tasks | mean Δlogit | max Δlogit "
             "| lossy |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['kv_dtype']} | {row['kv_bytes_per_token'] / 1024:.1f} KiB | "
                     f"{row['needles_solved']}/{row['needles']} | {row['needle_score']:.1f} | "
                     f"{row['all_tasks_score']:.1f} | {row['mean_logit_diff']:.4f} | {row['max_logit_diff']:.4f} | "
                     f"{'yes' if row['lossy'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--precisions", default=",".join(SCHEMES), help="kv_dtype values, both tiers each")
    parser.add_argument("--mode", default="offload", help="offload, or an eviction mode (its budget's precision)")
    parser.add_argument("--compression", type=float, default=4.0, help="eviction modes: prompt tokens per kept token")
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--haystacks", default="noise,varied")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, default=Path("kv_precision.json"))
    parser.add_argument("--table", type=Path, default=None, help="default: the JSON's name with _table.md")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else default_device()
    dtype = default_dtype(device)
    model, tokenizer = load_model(args.model, device, dtype)
    precisions = args.precisions.split(",")
    config = EvalConfig(tasks=tuple(args.tasks.split(",")), lengths=tuple(int(n) for n in args.lengths.split(",")),
                        samples=args.samples, chunk_size=args.chunk_size, haystacks=tuple(args.haystacks.split(",")))
    spec = ModeSpec(args.mode, args.mode, {} if args.mode == "offload" else {"compression": args.compression})
    specs = [ModeSpec("full", "full")] + [ModeSpec(f"kv={name}", spec.mode, {**spec.options, "kv_dtype": name})
                                          for name in precisions]
    results = evaluate(model, tokenizer, specs, config, out=args.json, log=print)
    differences = logit_differences(model, tokenizer, config, spec, precisions)
    rows = summary(results["records"], differences, ModelShape.of(model.config), dtype.itemsize)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    label = spec.mode if spec.mode == "offload" else f"{spec.mode}@{args.compression:g}x"
    text = markdown(rows, args.model, config, f"{device_name}, {str(dtype).removeprefix('torch.')}", label,
                    "full" if spec.mode == "offload" else f"{label} bf16")
    print(text)
    results.update(precisions=rows, logit_differences=differences, device=device_name)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    (args.table or args.json.with_name(args.json.stem + "_table.md")).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
