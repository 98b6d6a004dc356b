"""RULER-style tasks, the evaluation harness and its summaries, with a word-level toy tokenizer."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from conftest import assert_drawn
from transformers import LlamaConfig, LlamaForCausalLM

from headspace import HeadspaceError
from headspace.commands import main
from headspace.evaluation.harness import EvalConfig, ModeSpec, evaluate, mode_specs
from headspace.evaluation.report import heatmap, summarize, table
from headspace.evaluation.tasks import TASKS, Sample, _fit, make_sample, score
from headspace.eviction.retaining.heads import HeadsSpec, RetainingHeads

VOCAB = 256


class WordTokenizer:
    """Whitespace words hashed to ids; decodes ids to digits, so outputs look like numbers."""

    eos_token_id = None

    def __call__(self, text: str, **kwargs) -> dict:
        return {"input_ids": [zlib.crc32(w.encode()) % VOCAB for w in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(str(i % 10) for i in ids)


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("task", TASKS)
def test_samples_fit_the_length_and_hold_their_answers(tokenizer, task):
    sample = make_sample(task, tokenizer, 600, seed=1, depth=0.3 if task == "niah_single" else None)
    tokens = len(tokenizer(sample.prompt)["input_ids"])
    assert 0.85 * 600 <= tokens <= 600
    assert sample.answers and all(answer in sample.prompt for answer in sample.answers)
    again = make_sample(task, tokenizer, 600, seed=1, depth=0.3 if task == "niah_single" else None)
    assert again.prompt == sample.prompt  # reproducible from the seed
    other = make_sample(task, tokenizer, 600, seed=2, depth=0.3 if task == "niah_single" else None)
    assert other.prompt != sample.prompt


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_depth_places_the_needle(tokenizer, depth):
    sample = make_sample("niah_single", tokenizer, 2000, seed=0, depth=depth)
    where = sample.prompt.index(f"is: {sample.answers[0]}.") / len(sample.prompt)
    assert abs(where - depth) < 0.1


def test_common_words_are_the_most_frequent(tokenizer):
    sample = make_sample("common_words", tokenizer, 1500, seed=0)
    items = [line.split(". ", 1)[1] for line in sample.prompt.splitlines() if ". " in line and line[0].isdigit()]
    counts = {w: items.count(w) for w in set(items)}
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert set(top) == set(sample.answers)
    assert min(counts[w] for w in sample.answers) > max(c for w, c in counts.items() if w not in sample.answers)


def test_score_is_the_share_of_answers_found():
    sample = Sample("niah_multivalue", 100, None, 0, "", ["1234567", "7654321", "1111111", "2222222"], 8)
    assert score(sample, "1234567 and 7654321") == 0.5
    assert score(sample, "nothing") == 0.0


def test_mode_specs_expand_budgeted_modes():
    specs = mode_specs(["full", "offload", "locret", "random"], compressions=[4, 8], budgets=[256], heads="h",
                       stabilizer=32, sink=None)
    labels = [s.label for s in specs]
    assert labels == ["full", "offload", "locret@4x", "locret@8x", "locret@256", "random@4x", "random@8x",
                      "random@256"]
    assert specs[2].options == {"compression": 4.0, "heads": "h", "stabilizer": 32}
    assert "heads" not in specs[5].options
    with pytest.raises(HeadspaceError, match="unknown mode"):
        mode_specs(["fast"])


def test_harness_runs_modes_side_by_side_writes_json_and_resumes(tmp_path, model, tokenizer):
    heads = RetainingHeads(HeadsSpec.from_config(model.config, hidden=8))
    specs = [ModeSpec("full", "full"), ModeSpec("offload", "offload"),
             ModeSpec("locret@big", "locret", {"budget": 4000, "heads": heads, "stabilizer": 16}),
             ModeSpec("locret@4x", "locret", {"compression": 4, "heads": heads, "stabilizer": 16}),
             ModeSpec("streamingllm@4x", "streamingllm", {"compression": 4, "stabilizer": 16})]
    config = EvalConfig(tasks=("niah_single", "variable_tracking"), lengths=(300, 400), depths=(0.2, 0.8),
                        samples=1, seed=0, chunk_size=64)
    out = tmp_path / "eval.json"
    results = evaluate(model, tokenizer, specs, config, out=out, progress=False)
    records = results["records"]
    assert len(records) == 2 * (2 + 1) * len(specs)
    by = {(r["task"], r["length"], r["depth"], r["mode"]): r for r in records}
    for (task, length, depth, mode), record in by.items():
        if mode in ("offload", "locret@big"):  # exact modes produce the very same generation as full
            assert record["output"] == by[(task, length, depth, "full")]["output"]
        if mode == "locret@4x":
            assert record["device_kv_bytes"] < by[(task, length, depth, "full")]["device_kv_bytes"]
    saved = json.loads(out.read_text())
    assert len(saved["records"]) == len(records) and saved["table"]["modes"] == [s.label for s in specs]
    # resuming finds every record done and runs nothing
    calls = []
    again = evaluate(model, tokenizer, specs, config, out=out, progress=False, log=calls.append)
    assert calls == [] and len(again["records"]) == len(records)


def test_summary_table_and_heatmap(tmp_path):
    records = [{"task": "niah_single", "length": n, "depth": d, "index": 0, "mode": m, "score": s}
               for n in (1000, 2000) for d in (0.1, 0.9) for m, s in (("full", 1.0), ("random@4x", 0.0))]
    records.append({"task": "variable_tracking", "length": 1000, "depth": None, "index": 0, "mode": "full",
                    "score": 0.4})
    summary = summarize(records, ["full", "random@4x"])
    assert summary["rows"]["niah_single @1000"] == {"full": 100.0, "random@4x": 0.0}
    assert summary["rows"]["variable_tracking @1000"] == {"full": 40.0, "random@4x": None}
    assert summary["rows"]["needle tasks (mean)"]["full"] == 100.0
    text = table(summary)
    assert text.splitlines()[0] == "| task @ tokens | n | full | random@4x |"
    assert "| niah_single @1000 | 2 | 100.0 | 0.0 |" in text
    png = heatmap(records, tmp_path / "heat.png")
    assert_drawn(png)


def test_eval_cli_refuses_bad_arguments_before_loading(capsys):
    assert main(["eval", "--tasks", "bogus"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["eval", "--modes", "full,warp"]) == 2
    assert "unknown mode" in capsys.readouterr().err
    assert main(["eval", "--depths", "1.5"]) == 2


class _WordTokenizer:
    """One token per whitespace-separated word: a tokenizer as frugal as a large vocabulary's."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": text.split()}


def test_common_words_fill_long_prompts():
    """The list grows with the length asked for (a fixed vocabulary once stopped growing and the fit never ended)."""
    sample = make_sample("common_words", _WordTokenizer(), 20_000, seed=0)
    assert 19_000 <= len(sample.prompt.split()) <= 20_000


def test_a_text_that_stops_growing_is_refused():
    with pytest.raises(HeadspaceError, match="stops growing at 3 tokens, short of 10"):
        _fit(lambda n: "a b c", 10, lambda text: len(text.split()))
