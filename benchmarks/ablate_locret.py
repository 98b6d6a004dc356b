"""Locret's recipe, measured: which training and inference settings the defaults should have.

One factor at a time around the defaults, on one model:

* training (heads trained here, same steps each): the default recipe; MSE instead of
  smooth L1; Locret's smoothness term (0.0025 x MSE between adjacent positions'
  scores); targets pooled over the query group by mean instead of max; targets not
  max-pooled over neighbours (``smooth=1``); no gap before the target's later queries
  (``gap=0``); the paper's settings together (lr 5e-4, smoothness 0.0025, smooth 1,
  gap 0); and targets without their trend in distance to the questions (``detrend``);
* inference, with the default heads: the stabilizer window, the prefill chunk, and
  Locret's ``pool`` (each new score max-pooled over its neighbours, so the tokens of a
  number are kept or dropped together).

Every variant runs ``locret`` at 4x and 8x on the main needle tasks and variable
tracking, on the varied haystack, in both settings (the question inside the
compressed prompt, and questions asked after compression), never on the held-out
family, which stays untuned; through the same harness as ``headspace eval``. Prints
one table (needle score, digits kept, score on every task, final training loss) and
writes JSON with every record, and the heads of each training variant to
``--heads-dir``. ``--jobs`` trains and evaluates that many variants at once, each in
its own process (a small model leaves most of a GPU idle). Run again with the same
arguments, it resumes: heads already trained and rows already in the JSON are kept.

    python3 benchmarks/ablate_locret.py --model smollm2-135m --json benchmarks/results/ablation_smollm2.json
    python3 benchmarks/ablate_locret.py --model gemma3-270m --lengths 8192 --jobs 8 \\
        --json benchmarks/results/ablation_gemma3.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from headspace.commands.train_retaining import train_for_model
from headspace.evaluation.harness import SETTINGS, EvalConfig, ModeSpec, evaluate
from headspace.evaluation.report import summarize
from headspace.eviction.retaining.heads import RetainingHeads
from headspace.eviction.retaining.train import TrainConfig
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
    "detrend": {"detrend": True},
}
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
ROWS = ("needle tasks, varied haystack (mean)", "needle digits kept (mean)", "all tasks (mean)")


def train_one(name: str, variant: str, config: TrainConfig, path: Path, device: str) -> dict:
    """Train and save one variant's heads as ``headspace train-retaining`` does; its recipe, with the seconds."""
    start = time.perf_counter()
    train_for_model(name, path, config, device=device, progress=False,
                    command=f"benchmarks/ablate_locret.py --model {name} (variant {variant})")
    recipe = {**RetainingHeads.load(path).recipe, "variant": variant, "seconds": time.perf_counter() - start}
    print(f"trained {variant}: final loss {recipe['final_loss']:.4f} in {recipe['seconds']:.0f} s", flush=True)
    return recipe


_loaded: dict[str, tuple] = {}


def evaluate_one(name: str, device: str, specs: list[ModeSpec], config: EvalConfig) -> list[dict]:
    """One run's records; the model is loaded once per process."""
    if name not in _loaded:
        _loaded[name] = load_model(name, device=device, dtype=torch.float32)
    model, tokenizer = _loaded[name]
    return evaluate(model, tokenizer, specs, config, progress=False)["records"]


def in_parallel(jobs: int, calls: Iterable[tuple[Callable, tuple]]):
    """Yield each call's result, in the calls' order: run in this process with ``jobs`` 1, else in ``jobs`` spawned
    processes (each loads its own model; the parent touches no GPU)."""
    calls = list(calls)
    if jobs == 1:
        for function, arguments in calls:
            yield function(*arguments)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(function, *arguments) for function, arguments in calls]:
            yield future.result()


def specs_for(label: str, heads: str, compressions: list[float], **options) -> list[ModeSpec]:
    return [ModeSpec(f"{label}@{ratio:g}x", "locret", {"compression": ratio, "heads": heads, **options})
            for ratio in compressions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", default="4096,8000", help="prompt lengths (default 4096,8000)")
    parser.add_argument("--samples", type=int, default=2, help="per task and depth (default 2)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="inside and/or after (default both)")
    parser.add_argument("--compressions", default="4,8")
    parser.add_argument("--steps", type=int, default=400, help="training sequences per variant (default 400)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence (default 2048)")
    parser.add_argument("--hidden", type=int, default=TrainConfig.hidden, help="MLP width of every variant's heads")
    parser.add_argument("--training", default=",".join(TRAINING), help=f"training variants ({', '.join(TRAINING)})")
    parser.add_argument("--chunk-size", type=int, default=1024, help="prefill chunk of the training variants")
    parser.add_argument("--chunks", default="512,2048,4096", help="other prefill chunks tried with the default heads")
    parser.add_argument("--stabilizers", default="16,256,512", help="other stabilizer windows tried (default heads)")
    parser.add_argument("--pools", default="3,5", help="locret score pooling widths tried (default heads)")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained or evaluated at once (processes)")
    parser.add_argument("--heads-dir", default=None, help="where the variants' heads go (default: beside --json)")
    parser.add_argument("--json", default="ablation.json")
    args = parser.parse_args()

    lengths = tuple(parse_tokens(n) for n in args.lengths.split(","))
    compressions = [float(c) for c in args.compressions.split(",")]
    variants = args.training.split(",")
    if set(variants) - set(TRAINING):
        parser.error(f"unknown training variants {sorted(set(variants) - set(TRAINING))}")
    if "default" not in variants:
        parser.error("--training needs 'default': the inference rows use its heads")
    out = Path(args.json)
    heads_dir = Path(args.heads_dir) if args.heads_dir else out.with_name(out.stem + "_heads")
    heads_dir.mkdir(parents=True, exist_ok=True)
    base = TrainConfig(steps=args.steps, seq_len=args.seq_len, hidden=args.hidden)
    paths = {variant: heads_dir / f"{variant}.safetensors" for variant in variants}
    trained = {v: RetainingHeads.load(path).recipe for v, path in paths.items() if path.exists()}
    for recipe in in_parallel(args.jobs, [(train_one, (args.model, v, dataclasses.replace(base, **TRAINING[v]),
                                                       paths[v], args.device)) for v in variants if v not in trained]):
        trained[recipe["variant"]] = recipe

    config = EvalConfig(tasks=TASKS, lengths=lengths, depths=(0.1, 0.5, 0.9), samples=args.samples,
                        chunk_size=args.chunk_size, haystacks=("varied",), settings=tuple(args.settings.split(",")))
    runs: list[tuple[str, list[ModeSpec], int]] = [("reference", [ModeSpec("full", "full")], args.chunk_size)]
    runs += [(f"training: {v}", specs_for(v, str(paths[v]), compressions), args.chunk_size) for v in variants]
    default_heads = str(paths["default"])
    for chunk in (int(c) for c in args.chunks.split(",") if c):
        runs.append((f"chunk {chunk}", specs_for(f"chunk-{chunk}", default_heads, compressions), chunk))
    for stabilizer in (int(s) for s in args.stabilizers.split(",") if s):
        # a stabilizer beyond the smallest budget would silently raise it: skip those ratios
        ratios = [r for r in compressions if stabilizer + 4 <= min(lengths) / r]
        runs.append((f"stabilizer {stabilizer}", specs_for(f"stabilizer-{stabilizer}", default_heads, ratios,
                                                           stabilizer=stabilizer), args.chunk_size))
    for pool in (int(p) for p in args.pools.split(",") if p):
        runs.append((f"pool {pool}", specs_for(f"pool-{pool}", default_heads, compressions, pool=pool),
                     args.chunk_size))
    results = {"model": args.model, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "lengths": lengths, "settings": config.settings, "samples": args.samples, "steps": args.steps,
               "hidden": args.hidden,
               "training": {v: trained[v] for v in variants}, "runs": {}}
    if out.exists():  # an interrupted run resumes: its finished rows are kept
        results["runs"] = json.loads(out.read_text()).get("runs", {})
    todo = [(title, specs, chunk) for title, specs, chunk in runs if title not in results["runs"]]
    calls = [(evaluate_one, (args.model, args.device, specs, dataclasses.replace(config, chunk_size=chunk)))
             for _, specs, chunk in todo]
    for (title, specs, chunk), records in zip(todo, in_parallel(args.jobs, calls)):
        results["runs"][title] = {"chunk_size": chunk, "summary": summarize(records, [s.label for s in specs]),
                                  "records": records}
        print(f"evaluated {title}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results, runs, compressions, trained))


def table(results: dict, runs: list[tuple[str, list[ModeSpec], int]], compressions: list[float],
          trained: dict[str, dict]) -> str:
    """Markdown, one table per setting: per run and ratio, the needle score, the digits kept and the all-task score
    (``full``'s single column stands under every ratio; ratios a run skipped stay empty), then the variant's final
    training loss."""
    out = []
    columns = " | ".join(f"{row} @{r:g}x" for r in compressions for row in ("needle", "digits", "all"))
    for setting in results["settings"]:
        tag = " [after]" if setting == "after" else ""
        out += [f"questions {setting}:", "", f"| variant | {columns} | train loss |",
                "|---|" + "---:|" * (3 * len(compressions) + 1)]
        for title, specs, _ in runs:
            summary = results["runs"][title]["summary"]
            cells = []
            for ratio in compressions:
                label = next((s.label for s in specs if s.mode == "full" or s.label.endswith(f"@{ratio:g}x")), None)
                cells += [summary["rows"].get(row + tag, {}).get(label) for row in ROWS]
            loss = trained.get(title.removeprefix("training: "), {}).get("final_loss")
            out.append(f"| {title} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
                       + f" | {'-' if loss is None else f'{loss:.4f}'} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
