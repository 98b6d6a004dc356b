"""Which inference-time settings of locret keep a needle's key and value whole, and answer, after compression?

The questions-after setting of :mod:`locret_diagnose` (its documents, needle spans and survival measures),
swept over locret's inference settings with one heads file: each ``--setting`` is a comma-separated list of
``chunk`` (the prefill chunk), :class:`~headspace.eviction.budget.BudgetOptions` fields (``stabilizer``,
``sink``, ``once``: 0 or 1, ``merge``) and the Locret policy's fields (``pool``, ``center``: 0 or 1); what it
leaves out keeps the default (chunk 1024, stabilizer 64, sink 4, pool 1, center 0, once 0, merge 0). The
memory follows ``--compressions`` only, so every setting keeps the same number of slots (``merge``'s
summaries take theirs from the budget). ``full``'s answers are computed once per document; each
setting and ratio prefills every document once and asks all its questions. Per family it reports, means
over questions, layers and KV heads: the share of the needle's key, value and whole fact (key through
value) tokens kept and the share of (layer, head) pairs keeping each whole (stored per question as means
over layers and heads), and the exact answers. Run again with the same ``--json``, it resumes: the
settings and ratios already there are kept.

    python3 benchmarks/locret_inference.py --heads HEADS.safetensors --compressions 8 \\
        --setting pool=1 --setting pool=3 --setting stabilizer=16 --setting chunk=512 \\
        --json benchmarks/results/cpu_locret_inference_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from locret_diagnose import answer_of, document_arguments, documents, layer_state, mean, survival, token_spans

from headspace.engine.engine import Engine
from headspace.models import load_model

DEFAULTS = {"chunk": 1024, "stabilizer": 64, "sink": 4, "pool": 1, "center": 0, "once": 0, "merge": 0}
MEASURES = ("key", "value", "fact")


def parse_setting(text: str) -> dict[str, int]:
    """``"pool=3,stabilizer=16"`` as the full setting, defaults filled in (values are integers)."""
    setting = dict(DEFAULTS)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in DEFAULTS:
            raise SystemExit(f"unknown setting '{name}': one of {', '.join(DEFAULTS)}")
        setting[name] = int(value)
    return setting


def label(setting: dict[str, int]) -> str:
    """The setting's changes from the defaults, ``default`` where there are none."""
    return ",".join(f"{k}={v}" for k, v in setting.items() if v != DEFAULTS[k]) or "default"


def run(model, tokenizer, args, results: dict, path: Path) -> None:
    docs = {family: list(documents(tokenizer, family, args.length, args.documents, args.seed))
            for family in args.families}
    full = Engine(model, tokenizer, mode="full", chunk_size=DEFAULTS["chunk"], keep_bytes=0)
    for family, family_docs in docs.items():
        for document in family_docs:
            key = f"{family}/{document.index}"
            if key not in results["full"]:
                kept = full.prefill_document(document.context)
                results["full"][key] = [answer_of(full, document.context, q, kept)["score"]
                                        for q in document.questions]
                save(results, path)
    for text in args.settings:
        setting = parse_setting(text)
        options = {k: v for k, v in setting.items() if k != "chunk"}
        for ratio in args.compressions:
            name = f"{label(setting)}@{ratio:g}x"
            if name in results["runs"]:
                continue
            engine = Engine(model, tokenizer, mode="locret", chunk_size=setting["chunk"], keep_bytes=0,
                            compression=ratio, heads=args.heads, **options)
            start, rows = time.perf_counter(), []
            for family, family_docs in docs.items():
                for document in family_docs:
                    prefilled = engine.prefill_document(document.context)
                    positions = layer_state(prefilled.cache, "positions")
                    for question, sample in enumerate(document.questions):
                        kept = survival(positions, *token_spans(tokenizer, document.context, sample))
                        rows.append({"family": family, "document": document.index, "question": question,
                                     "task": sample.task, "depth": sample.depth, "answer": sample.answers[0],
                                     **{measure: mean(shares) for measure, shares in kept.items()},
                                     **answer_of(engine, document.context, sample, prefilled)})
            results["runs"][name] = {"setting": label(setting), "ratio": ratio, "rows": rows,
                                     "seconds": time.perf_counter() - start}
            save(results, path)
            print(table(results, [name]), flush=True)


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def table(results: dict, names: list[str] | None = None) -> str:
    """One line per setting, ratio and family: kept / whole shares of key, value and fact, answers, full's."""
    head = ["setting", "ratio", "family", "questions", *(f"{m} kept/whole" for m in MEASURES), "answer", "digits",
            "answer full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names or results["runs"]:
        run = results["runs"][name]
        for family in dict.fromkeys(r["family"] for r in run["rows"]):
            rows = [r for r in run["rows"] if r["family"] == family]
            full = [s for key, scores in results["full"].items() if key.startswith(family + "/") for s in scores]
            cells = [run["setting"], f"{run['ratio']:g}x", family, str(len(rows))]
            for measure in MEASURES:
                spanned = [r for r in rows if f"{measure}_kept" in r]
                cells.append(" / ".join(f"{100 * mean([r[f'{measure}_{what}'] for r in spanned]):.0f}"
                                        for what in ("kept", "whole")))
            cells += [f"{100 * mean([r[what] for r in rows]):.0f}" for what in ("score", "digits")]
            cells.append(f"{100 * mean(full):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def depth_table(results: dict, names: list[str] | None = None) -> str:
    """Per setting, ratio and family: the value kept / whole and the answers (full's in brackets) per needle depth
    of the single-needle questions, and of the multi-key questions (``-``: each at a random depth), which shows
    where in the document the budget went."""
    runs = [results["runs"][name] for name in names or results["runs"]]

    def depth(row: dict) -> float | None:
        return None if row["task"].endswith("multikey") else row["depth"]

    depths = sorted({depth(r) for run in runs for r in run["rows"]}, key=lambda d: (d is None, d or 0))
    head = ["setting", "ratio", "family", *(f"depth {d if d is not None else '-'}" for d in depths)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        for family in dict.fromkeys(r["family"] for r in run["rows"]):
            cells = [run["setting"], f"{run['ratio']:g}x", family]
            for at in depths:
                rows = [r for r in run["rows"] if r["family"] == family and depth(r) == at]
                scores = [results["full"][f"{family}/{r['document']}"][r["question"]] for r in rows]
                cells.append(f"{100 * mean([r['value_kept'] for r in rows]):.0f} / "
                             f"{100 * mean([r['value_whole'] for r in rows]):.0f}: "
                             f"{100 * mean([r['score'] for r in rows]):.0f} ({100 * mean(scores):.0f})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    document_arguments(parser, documents=4, families="varied,heldout", compressions="8")
    parser.add_argument("--setting", dest="settings", action="append", default=[],
                        help="comma-separated NAME=VALUE of chunk, stabilizer, sink, pool, center (repeatable; "
                             "default: the defaults only)")
    parser.add_argument("--json", default="benchmarks/results/locret_inference.json")
    args = parser.parse_args()
    args.settings = args.settings or [""]
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    results = {"model": args.model, "heads": args.heads, "length": args.length, "documents": args.documents,
               "full": {}, "runs": {}, **results}
    model, tokenizer = load_model(args.model, device=args.device, dtype=torch.float32)
    run(model, tokenizer, args, results, path)
    print(table(results) + "\n\nValue kept / whole: answers (full's) per needle depth:\n" + depth_table(results))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
