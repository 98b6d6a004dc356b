"""Why Expected Attention loses the needle: it predicts the haystack's future attention well, and that is not the
question's.

On SmolLM2 and a ~2K-token single-needle prompt (noise and varied haystacks), one full forward pass records every
layer's queries and keys (RoPE applied). Then, per layer and KV head:

* prediction: Expected Attention's scores for the context's keys, from the statistics of the last 1024 context
  queries (no value norm), against the attention the next 512 queries actually give those keys (Spearman rank
  correlation; overlap of the top quarters). A wrong rotation or sign would show here as a low correlation;
* the needle: the percentile of the needle's digit tokens among the context's tokens under Expected Attention,
  under the attention of the question's own queries (what a query-aware method sees) and under key norm (low
  first, Knorm's rule), and the share of heads that keep every digit in their top quarter (a 4x budget).

    python benchmarks/expected_attention_check.py --out benchmarks/results/expected_attention_check_cpu.json
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from headspace import load_model
from headspace.evaluation.tasks import make_sample
from headspace.eviction.policies import make_policy
from headspace.eviction.policies.base import ScoreInputs

WINDOW, FUTURE, SINK = 1024, 512, 4


def record_attention(model, ids: torch.Tensor) -> dict[int, tuple]:
    """Every layer's (queries, keys, values, scaling) of one forward pass over ``ids``."""
    seen = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = (query.detach(), key.detach(), value.detach(), kwargs.get("scaling"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("record", record)
    previous = model.config._attn_implementation
    model.set_attn_implementation("record")
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        model.set_attn_implementation(previous)
    return seen


def expected(model, layer: int, recorded: tuple, end: int, vnorm: bool) -> torch.Tensor:
    """Expected Attention's scores ``(Hk, end)`` for keys before ``end``, from the ``WINDOW`` queries before it."""
    query, key, value, scaling = recorded
    policy = make_policy("expected-attention", window=WINDOW, future=FUTURE, vnorm=vnorm).prepare(model)
    positions = torch.arange(end).expand(1, key.shape[1], end)
    inputs = ScoreInputs(layer, query[:, :, end - WINDOW : end], key[:, :, :end], value[:, :, :end], positions,
                         torch.empty(1, key.shape[1], 0), end - WINDOW, scaling)
    return policy.score(inputs)[0]


def attention_given(recorded: tuple, queries: slice, end: int) -> torch.Tensor:
    """The softmax attention ``(Hk, end)`` the ``queries`` give the keys before ``end``, averaged over them and
    each KV head's query group."""
    query, key, _, scaling = recorded
    group = query.shape[1] // key.shape[1]
    logits = query[0, :, queries].float() @ key[0, :, :end].float().repeat_interleave(group, 0).transpose(1, 2)
    return (logits * scaling).softmax(-1).mean(1).view(key.shape[1], group, end).mean(1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.argsort().argsort().float(), b.argsort().argsort().float()])
    return torch.corrcoef(ranks)[0, 1].item()


def check(model, tokenizer, haystack: str) -> dict:
    sample = make_sample("niah_single", tokenizer, 2048, seed=0, depth=0.5, haystack=haystack)
    context = tokenizer(sample.context)["input_ids"]
    question = tokenizer(sample.question, add_special_tokens=False)["input_ids"]
    digits = tokenizer(sample.answers[0], add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(context)) if context[i : i + len(digits)] == digits)
    needle = torch.arange(start, start + len(digits)) - SINK
    end = len(context)
    prediction = len(context) - FUTURE  # predict the last FUTURE context queries from those before them
    seen = record_attention(model, torch.tensor([context + question]))
    rho, overlap = [], []
    ranks: dict[str, list[float]] = {"expected-attention": [], "question's attention": [], "key norm (low first)": []}
    whole: dict[str, list[float]] = {name: [] for name in ranks}
    for layer, recorded in sorted(seen.items()):
        predicted = expected(model, layer, recorded, prediction, vnorm=False)[:, SINK:]
        actual = attention_given(recorded, slice(prediction, end), prediction)[:, SINK:]
        quarter = actual.shape[-1] // 4
        for head in range(predicted.shape[0]):
            rho.append(spearman(predicted[head], actual[head]))
            top = set(predicted[head].topk(quarter).indices.tolist())
            overlap.append(len(top & set(actual[head].topk(quarter).indices.tolist())) / quarter)
        scores = {"expected-attention": expected(model, layer, recorded, end, vnorm=True),
                  "question's attention": attention_given(recorded, slice(end, None), end),
                  "key norm (low first)": -recorded[1][0, :, :end].float().norm(dim=-1)}
        for name, score in scores.items():
            score = score[:, SINK:]
            percentile = score.argsort(-1).argsort(-1).float()[:, needle] / score.shape[-1]  # (Hk, digits)
            ranks[name].append(percentile.mean().item())
            whole[name].append((percentile.min(-1).values >= 0.75).float().mean().item())
    mean = lambda values: round(sum(values) / len(values), 3)  # noqa: E731
    return {"haystack": haystack, "context_tokens": end, "needle_tokens": len(digits),
            "prediction_spearman": mean(rho), "prediction_top_quarter_overlap": mean(overlap),
            "needle_percentile": {name: mean(v) for name, v in ranks.items()},
            "heads_keeping_whole_needle_in_top_quarter": {name: mean(v) for name, v in whole.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device=args.device, dtype=torch.float32)
    results = [check(model, tokenizer, haystack) for haystack in ("noise", "varied")]
    print("| haystack | EA predicts next 512 (Spearman) | top-quarter overlap | needle percentile: EA / question / "
          "key norm | heads keeping the whole needle in the top quarter: EA / question / key norm |")
    print("|---|---:|---:|---|---|")
    for r in results:
        percentile = " / ".join(f"{v:.2f}" for v in r["needle_percentile"].values())
        kept = " / ".join(f"{v:.2f}" for v in r["heads_keeping_whole_needle_in_top_quarter"].values())
        print(f"| {r['haystack']} | {r['prediction_spearman']:.2f} | {r['prediction_top_quarter_overlap']:.2f} | "
              f"{percentile} | {kept} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "window": WINDOW, "future": FUTURE, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
