"""Locret's recipe, measured: which training and inference settings the defaults should have.

One factor at a time around the defaults, on one model:

* training (heads trained here, same steps each): the default recipe; MSE instead of
  smooth L1; Locret's smoothness term (0.0025 x MSE between adjacent positions'
  scores); targets pooled over the query group by mean instead of max; targets not
  max-pooled over neighbours (``smooth=1``); no gap before the target's later queries
  (``gap=0``); and the paper's settings together (lr 5e-4, smoothness 0.0025,
  smooth 1, gap 0);
* inference, with the default heads: the stabilizer window, the prefill chunk, and
  Locret's ``pool`` (each new score max-pooled over its neighbours, so the tokens of a
  number are kept or dropped together).

Every variant runs ``locret`` at 4x and 8x on the main needle tasks and variable
tracking, on the varied haystack (never on the held-out family, which stays
untuned), through the same harness as ``headspace eval``. Prints one table (needle
score, digits kept, score on every task, final training loss) and writes JSON with
every record, and the heads of each training variant to ``--heads-dir``. Run again with the
same arguments, it resumes: heads already trained and rows already in the JSON are kept.

    python3 benchmarks/ablate_locret.py --model smollm2-135m --json benchmarks/results/ablation_smollm2.json
    python3 benchmarks/ablate_locret.py --model gemma3-270m --lengths 8192,16384 \\
        --json benchmarks/results/ablation_gemma3.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from headspace.evaluation.harness import EvalConfig, ModeSpec, evaluate
from headspace.evaluation.report import summarize
from headspace.eviction.retaining.heads import RetainingHeads
from headspace.eviction.retaining.train import TrainConfig, train_retaining_heads, training_sequences
from headspace.models import load_model
from headspace.units import parse_tokens

TRAINING = {
    "default": {},
    "mse": {"loss": "mse"},
    "smoothness": {"smoothness": 0.0025},
    "group-mean": {"group_pool": "mean"},
    "no-target-pool": {"smooth": 1},
    "gap-0": {"gap": 0},
    "paper": {"lr": 5e-4, "smoothness": 0.0025, "smooth": 1, "gap": 0},
}
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
ROWS = ("needle tasks, varied haystack (mean)", "needle digits kept (mean)", "all tasks (mean)")


def train_variants(name: str, base: TrainConfig, heads_dir: Path, device: str) -> dict[str, dict]:
    """Train one heads file per training variant (a file already there from an earlier run is kept); its path,
    final loss and seconds."""
    out, model = {}, None
    for variant, changes in TRAINING.items():
        config = dataclasses.replace(base, **changes)
        path = heads_dir / f"{variant}.safetensors"
        if path.exists():
            out[variant] = RetainingHeads.load(path).recipe
            continue
        if model is None:
            model, tokenizer = load_model(name, device=device, dtype=torch.float32)
        start = time.perf_counter()
        heads, losses = train_retaining_heads(model, training_sequences(tokenizer, config), config, progress=True)
        out[variant] = {"path": str(path), "final_loss": losses[-1], "seconds": time.perf_counter() - start,
                        "config": dataclasses.asdict(config), "model": name, "variant": variant}
        heads.save(path, recipe=out[variant])
        print(f"trained {variant}: final loss {losses[-1]:.4f} in {out[variant]['seconds']:.0f} s", flush=True)
    return out


def specs_for(label: str, heads: str, compressions: list[float], **options) -> list[ModeSpec]:
    return [ModeSpec(f"{label}@{ratio:g}x", "locret", {"compression": ratio, "heads": heads, **options})
            for ratio in compressions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", default="4096,8192", help="prompt lengths (default 4096,8192)")
    parser.add_argument("--samples", type=int, default=2, help="per task and depth (default 2)")
    parser.add_argument("--compressions", default="4,8")
    parser.add_argument("--steps", type=int, default=400, help="training sequences per variant (default 400)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence (default 2048)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk of the training variants")
    parser.add_argument("--chunks", default="512,1024,2048,4096", help="prefill chunks tried with the default heads")
    parser.add_argument("--stabilizers", default="16,64,256,512", help="stabilizer windows tried (default heads)")
    parser.add_argument("--pools", default="3,5", help="locret score pooling widths tried (default heads)")
    parser.add_argument("--heads-dir", default=None, help="where the variants' heads go (default: beside --json)")
    parser.add_argument("--json", default="ablation.json")
    args = parser.parse_args()

    lengths = tuple(parse_tokens(n) for n in args.lengths.split(","))
    compressions = [float(c) for c in args.compressions.split(",")]
    out = Path(args.json)
    heads_dir = Path(args.heads_dir) if args.heads_dir else out.with_name(out.stem + "_heads")
    base = TrainConfig(steps=args.steps, seq_len=args.seq_len)
    trained = train_variants(args.model, base, heads_dir, args.device)

    model, tokenizer = load_model(args.model, device=args.device)
    config = EvalConfig(tasks=TASKS, lengths=lengths, depths=(0.1, 0.5, 0.9), samples=args.samples,
                        chunk_size=args.chunk_size, haystacks=("varied",))
    runs: list[tuple[str, list[ModeSpec], int]] = [("reference", [ModeSpec("full", "full")], args.chunk_size)]
    runs += [(f"training: {v}", specs_for(v, t["path"], compressions), args.chunk_size) for v, t in trained.items()]
    default_heads = trained["default"]["path"]
    for chunk in (int(c) for c in args.chunks.split(",")):
        runs.append((f"chunk {chunk}", specs_for(f"chunk-{chunk}", default_heads, compressions), chunk))
    for stabilizer in (int(s) for s in args.stabilizers.split(",")):
        # a stabilizer beyond the smallest budget would silently raise it: skip those ratios
        ratios = [r for r in compressions if stabilizer + 4 <= min(lengths) / r]
        runs.append((f"stabilizer {stabilizer}", specs_for(f"stabilizer-{stabilizer}", default_heads, ratios,
                                                           stabilizer=stabilizer), args.chunk_size))
    for pool in (int(p) for p in args.pools.split(",")):
        runs.append((f"pool {pool}", specs_for(f"pool-{pool}", default_heads, compressions, pool=pool),
                     args.chunk_size))
    results = {"model": args.model, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "lengths": lengths, "training": trained, "runs": {}}
    if out.exists():  # an interrupted run resumes: its finished rows are kept
        results["runs"] = json.loads(out.read_text()).get("runs", {})
    lines = [f"| variant | {' | '.join(f'{row} @{r:g}x' for r in compressions for row in ('needle', 'digits', 'all'))}"
             " | train loss |", "|---|" + "---:|" * (3 * len(compressions) + 1)]
    for title, specs, chunk in runs:
        if title not in results["runs"]:
            records = evaluate(model, tokenizer, specs, dataclasses.replace(config, chunk_size=chunk),
                               progress=False)["records"]
            results["runs"][title] = {"chunk_size": chunk, "summary": summarize(records, [s.label for s in specs]),
                                      "records": records}
        summary = results["runs"][title]["summary"]
        cells = []
        for ratio in compressions:  # full's one column stands under every ratio; skipped ratios stay empty
            label = next((s.label for s in specs if s.mode == "full" or s.label.endswith(f"@{ratio:g}x")), None)
            cells += [summary["rows"].get(row, {}).get(label) for row in ROWS]
        loss = trained.get(title.removeprefix("training: "), {}).get("final_loss")
        lines.append(f"| {title} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
                     + f" | {'-' if loss is None else f'{loss:.4f}'} |")
        print(lines[-1], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
