"""Where do a needle's tokens rank among the retaining heads' scores, against an oracle that saw the question?

For a few documents of the questions-after setting (``varied``: the small-town haystack, ``heldout``:
the ship's log, ``noise``: RULER's filler; ``headspace.evaluation.tasks``), each prefilled at
``--length`` tokens as ``headspace eval`` does (chunk 1024, stabilizer 64, sink 4):

* the heads' score of every document token, per layer and KV head, as the locret cache stores it;
* the oracle: the true attention of the question (and of its answer, teacher-forced) to every
  document token, max over those queries and over the KV head's query group, from one eager full
  forward of document + question + answer;
* per needle (its key words and every digit token of its value): the rank of those tokens among the
  document's tokens (top share: 0 is the best-scored token), under the heads and under the oracle;
  the share kept by a real locret cache at each compression, and by the same cache choosing by the
  oracle's scores; whether the value is kept whole (every digit, in a layer and head);
* the answers: full, locret and oracle-locret at each compression (the oracle's is an upper bound:
  what keeping the right tokens could give); and the heads' mean score per prefill chunk (a scale
  drift between chunks would bias what is kept toward one of them).

Prints a table per family and per layer and writes JSON. On the GPU, for both models:

    python3 benchmarks/locret_diagnose.py --model smollm2-135m --device cuda --documents 4 \\
        --json benchmarks/results/diagnose_smollm2.json
    python3 benchmarks/locret_diagnose.py --model gemma3-270m --device cuda --length 8192 \\
        --json benchmarks/results/diagnose_gemma3.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from headspace.attention.kernels import causal_attention
from headspace.engine.engine import Engine
from headspace.engine.sampling import SamplingParams
from headspace.evaluation.tasks import Sample, digit_score, make_document, make_logbook, score
from headspace.eviction.budget import BudgetLayer, budget_cache
from headspace.eviction.policies.base import Policy, ScoreInputs
from headspace.models import load_model
from headspace.shape import ModelShape

FAMILIES = ("varied", "heldout", "noise")
KEY_PATTERNS = (r"magic number for (\S+) mentioned", r"does the vessel (.+?) carry")
CHUNK, STABILIZER, SINK = 1024, 64, 4


PROBE = "headspace_diagnose_probe"
_recorded: dict[int, torch.Tensor] = {}


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                    **kwargs):
    """Exact attention of new queries over the cache (lower-right causal) that also records, per full-attention
    layer, the largest probability any of the queries gives each key, max over the KV head's query group."""
    scaling = scaling or query.shape[-1] ** -0.5
    out = causal_attention(query, key, value, scaling, sliding_window)
    if sliding_window is None:
        kv_heads, chunk, stored = key.shape[1], query.shape[2], key.shape[2]
        group = query.shape[1] // kv_heads
        logits = (query.float() @ key.float().repeat_interleave(group, 1).transpose(-1, -2)) * scaling
        later = torch.arange(stored)[None] > torch.arange(stored - chunk, stored)[:, None]
        probs = logits.masked_fill(later.to(logits.device), float("-inf")).softmax(-1)
        _recorded[module.layer_idx] = probs[0].amax(1).view(kv_heads, group, stored).amax(1).cpu()
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PROBE, probe_attention)
AttentionMaskInterface.register(PROBE, lambda *args, **kwargs: None)


@torch.inference_mode()
def question_attention(model, document, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """The oracle: per full-attention layer, (Hk, document tokens) the largest attention that ``ids`` (the question
    and its answer), fed after a ``full`` document, give each document token; the document is rolled back."""
    previous = model.config._attn_implementation
    _recorded.clear()
    try:
        model.set_attn_implementation(PROBE)
        model(input_ids=ids.to(model.device), past_key_values=document.cache, use_cache=True, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
        document.rollback()
    return {i: _recorded[i][:, :document.length] for i in layers}


@dataclass
class TableScores(Policy):
    """Scores every token by a fixed table (layer -> (Hk, N)); positions past the table are kept."""

    name = "oracle"
    table: dict = field(default_factory=dict)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        table = self.table[inputs.layer].to(inputs.positions.device)
        length = table.shape[-1]
        found = table.gather(-1, inputs.positions[0].clamp_max(length - 1))[None]
        return found.masked_fill(inputs.positions >= length, float("inf"))


def token_spans(tokenizer, context: str, sample: Sample) -> tuple[list[int], list[int], list[int]]:
    """Token indices of the asked needle's key words, of its value's digits, and of the whole fact from its key's
    first token to its value's last (the relation words between them included) in ``context``'s tokens."""
    value = sample.answers[0]
    start = context.index(value)
    key = next((m.group(1) for p in KEY_PATTERNS if (m := re.search(p, sample.question))), None)
    key_start = context.rfind(key, 0, start) if key else -1
    offsets = tokenizer(context, return_offsets_mapping=True)["offset_mapping"]

    def covering(lo: int, hi: int) -> list[int]:
        return [i for i, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo]

    keys = covering(key_start, key_start + len(key)) if key_start >= 0 else []
    values = [i for i in covering(start, start + len(value)) if any(c.isdigit() for c in context[slice(*offsets[i])])]
    fact = covering(key_start, start + len(value)) if key_start >= 0 else []
    return keys, values, fact


def top_share(scores: torch.Tensor, index: list[int]) -> torch.Tensor:
    """For each head (Hk, n): the share of tokens scored above each of ``index`` (0: the best); (Hk, len(index))."""
    ranks = (scores[:, None, :] > scores[:, index, None]).sum(-1).float()
    return ranks / scores.shape[-1]


def kept_share(positions: dict[int, torch.Tensor], index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and head, the share of ``index`` kept and whether all of it is: two (layers, Hk) tensors."""
    wanted = torch.tensor(index)
    shares, whole = [], []
    for layer in sorted(positions):
        per_head = torch.stack([torch.isin(wanted, row) for row in positions[layer].cpu()[0]])  # (Hk, len)
        shares.append(per_head.float().mean(-1))
        whole.append(per_head.all(-1).float())
    return torch.stack(shares), torch.stack(whole)


def layer_state(cache, attribute: str) -> dict[int, torch.Tensor]:
    return {i: getattr(layer, attribute) for i, layer in enumerate(cache.layers) if isinstance(layer, BudgetLayer)}


def documents(tokenizer, family: str, length: int, count: int, seed: int):
    for index in range(count):
        if family == "heldout":
            yield make_logbook(tokenizer, length, seed, index)
        else:
            yield make_document(tokenizer, length, seed, index, family, tasks=("niah_single", "niah_multikey"))


def answer(engine: Engine, cache, question_ids: torch.Tensor, sample: Sample) -> dict:
    logits, cache = engine.prefill(question_ids, cache=cache)
    tokens = engine.decode(logits, cache, sample.max_new_tokens, SamplingParams())
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    return {"text": text, "score": score(sample, text), "digits": digit_score(sample, text)}


def diagnose(model, tokenizer, args) -> list[dict]:
    layers = ModelShape.of(model.config).full_attention_layers
    full = Engine(model, tokenizer, mode="full", chunk_size=CHUNK, keep_bytes=0)
    rows = []
    for family in args.families:
        for document in documents(tokenizer, family, args.length, args.documents, args.seed):
            ids = full.encode(document.context)
            n = ids.shape[1]
            options = {"heads": args.heads, "stabilizer": STABILIZER, "sink": SINK}
            everything = Engine(model, tokenizer, mode="locret", chunk_size=CHUNK, keep_bytes=0, budget=n, **options)
            heads_scores = {i: s[0].cpu() for i, s in layer_state(everything.prefill(ids)[1], "scores").items()}
            chunk_means = [[float(s[:, c:c + CHUNK].mean()) for c in range(0, n, CHUNK)] for s in heads_scores.values()]
            locret = {ratio: Engine(model, tokenizer, mode="locret", chunk_size=CHUNK, keep_bytes=0,
                                    compression=ratio, **options) for ratio in args.compressions}
            full_doc = full.prefill_document(document.context)
            kept_docs = {ratio: engine.prefill_document(document.context) for ratio, engine in locret.items()}
            for sample in document.questions:
                keys, values, fact = token_spans(tokenizer, document.context, sample)
                question_ids = full.encode(sample.question, special_tokens=False)
                answer_ids = full.encode(" " + sample.answers[0], special_tokens=False)
                oracle = question_attention(model, full_doc, torch.cat([question_ids, answer_ids], dim=1), layers)
                row = {"family": family, "document": document.index, "task": sample.task, "depth": sample.depth,
                       "answer": sample.answers[0], "key_tokens": len(keys), "value_tokens": len(values),
                       "chunk_mean_scores": chunk_means, "layers": layers, "modes": {}}
                for name, scores in (("heads", heads_scores), ("oracle", oracle)):
                    row[f"{name}_value_top"] = torch.stack([top_share(scores[i], values) for i in layers]).tolist()
                    row[f"{name}_key_top"] = (torch.stack([top_share(scores[i], keys) for i in layers]).tolist()
                                              if keys else None)
                row["spearman"] = [spearman(heads_scores[i], oracle[i]) for i in layers]
                row["modes"]["full"] = answer_of(full, document.context, sample, full_doc)
                for ratio in args.compressions:
                    positions = layer_state(kept_docs[ratio].cache, "positions")
                    row["modes"][f"locret@{ratio:g}x"] = {
                        **answer_of(locret[ratio], document.context, sample, kept_docs[ratio]),
                        **survival(positions, keys, values, fact)}
                    if not args.oracle_caches:
                        continue
                    cache = budget_cache(model, TableScores(table=oracle), prompt_tokens=n, chunk_size=CHUNK,
                                         compression=ratio, stabilizer=STABILIZER, sink=SINK)
                    _, cache = locret[ratio].prefill(ids, cache=cache)
                    kept = survival(layer_state(cache, "positions"), keys, values, fact)
                    row["modes"][f"oracle@{ratio:g}x"] = {**kept, **answer(locret[ratio], cache, question_ids, sample)}
                rows.append(row)
                print(summary_line(row), flush=True)
    return rows


def answer_of(engine: Engine, context: str, sample: Sample, document=None) -> dict:
    document = document or engine.prefill_document(context)
    text = engine.ask(document, sample.question, max_new_tokens=sample.max_new_tokens).text
    return {"text": text, "score": score(sample, text), "digits": digit_score(sample, text)}


def survival(positions: dict[int, torch.Tensor], keys: list[int], values: list[int],
             fact: list[int] | None = None) -> dict:
    """Kept shares and whole-kept shares (per layer and head) of the needle's value, key and, given, whole fact."""
    out = {}
    for name, index in (("value", values), ("key", keys), ("fact", fact)):
        if index:
            share, whole = kept_share(positions, index)
            out[f"{name}_kept"], out[f"{name}_whole"] = share.tolist(), whole.tolist()
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Rank correlation per head of two (Hk, n) score tables."""
    ra, rb = a.argsort(-1).argsort(-1).float(), b.argsort(-1).argsort(-1).float()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return ((ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))).tolist()


def mean(values) -> float:
    """The mean of every number in nested lists (of any shape)."""
    def flat(x):
        return [v for item in x for v in flat(item)] if isinstance(x, list) else [x]

    numbers = flat(list(values))
    return sum(numbers) / len(numbers) if numbers else float("nan")


def summary_line(row: dict) -> str:
    modes = " ".join(f"{k} {v['score']:.0f}" for k, v in row["modes"].items())
    return (f"{row['family']:8s} doc {row['document']} {row['task']:15s} value top {mean(row['heads_value_top']):.2f} "
            f"(oracle {mean(row['oracle_value_top']):.2f}) | {modes}")


def percent(rows: list[dict], *path, digits: int = 0) -> str:
    """100 x the mean, over ``rows``, of what each row holds at ``path`` (keys and indices; nested lists)."""
    def get(row):
        for step in path:
            row = row[step]
        return row

    return f"{100 * mean([get(r) for r in rows]):.{digits}f}"


def table(rows: list[dict], compressions: list[float]) -> str:
    """Per family: ranks, kept shares, whole values and answers, means over questions, layers and heads."""
    head = ["family", "questions", "value top% heads/oracle", "key top% heads/oracle", "spearman"]
    for ratio in compressions:
        head += [f"value kept {ratio:g}x heads/oracle", f"whole {ratio:g}x heads/oracle",
                 f"answer {ratio:g}x locret/oracle"]
    head += ["answer full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family in dict.fromkeys(r["family"] for r in rows):
        group = [r for r in rows if r["family"] == family]
        keyed = [r for r in group if r["heads_key_top"]]
        cells = [family, str(len(group))]
        for rows_, what in ((group, "value"), (keyed, "key")):
            cells.append(" / ".join(percent(rows_, f"{by}_{what}_top", digits=1) for by in ("heads", "oracle")))
        cells.append(f"{mean([r['spearman'] for r in group]):.2f}")
        for ratio in compressions:
            for what in ("value_kept", "value_whole", "score"):
                cells.append(" / ".join(percent(group, "modes", f"{mode}@{ratio:g}x", what) if
                                        f"{mode}@{ratio:g}x" in group[0]["modes"] else "-"
                                        for mode in ("locret", "oracle")))
        cells.append(percent(group, "modes", "full", "score"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_table(rows: list[dict], ratio: float) -> str:
    """Per layer: the value's rank and kept share under heads and oracle, and the rank correlation."""
    lines = [f"| layer | value top% heads | value top% oracle | kept {ratio:g}x heads | kept {ratio:g}x oracle | "
             "spearman |", "|---|---|---|---|---|---|"]
    for at, layer in enumerate(rows[0]["layers"]):
        cells = [percent(rows, "heads_value_top", at, digits=1), percent(rows, "oracle_value_top", at, digits=1),
                 *(percent(rows, "modes", f"{mode}@{ratio:g}x", "value_kept", at)
                   if f"{mode}@{ratio:g}x" in rows[0]["modes"] else "-" for mode in ("locret", "oracle")),
                 f"{mean([r['spearman'][at] for r in rows]):.2f}"]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def document_arguments(parser: argparse.ArgumentParser, documents: int, families: str, compressions: str) -> None:
    """The model, heads, documents and compressions a diagnosis runs on (also benchmarks/locret_inference.py's);
    ``--families`` and ``--compressions`` parse to lists."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--heads", default=None, help="retaining heads file (default: the shipped one)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--documents", type=int, default=documents, help="documents per family")
    parser.add_argument("--families", default=families, type=lambda text: text.split(","))
    parser.add_argument("--compressions", default=compressions,
                        type=lambda text: [float(ratio) for ratio in text.split(",")])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    document_arguments(parser, documents=2, families=",".join(FAMILIES), compressions="4,8")
    parser.add_argument("--oracle-caches", action=argparse.BooleanOptionalAction, default=True,
                        help="also prefill a cache that keeps by the oracle's scores, per question and compression, "
                             "and answer from it (the oracle's kept shares and answers: a prefill each, the slow "
                             "part on a CPU; its ranks need none and are always reported)")
    parser.add_argument("--json", default="benchmarks/results/locret_diagnose.json")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device=args.device, dtype=torch.float32)
    start = time.perf_counter()
    rows = diagnose(model, tokenizer, args)
    text = table(rows, args.compressions) + "\n\nPer layer, every family, at 8x:\n" + layer_table(
        rows, max(args.compressions))
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": args.model, "heads": args.heads, "length": args.length,
                                           "seconds": time.perf_counter() - start, "rows": rows, "table": text},
                                          indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
