"""benchmarks/locret_diagnose.py on a tiny Gemma 3 (sliding and full layers): its oracle is the question's true
attention, its table policy keeps what the table ranks first, and a whole run renders its tables."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, tiny_config

from headspace.engine.engine import Engine
from headspace.eviction.budget import budget_cache
from headspace.eviction.retaining.heads import HeadsSpec, RetainingHeads

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "locret_diagnose.py"


@pytest.fixture(scope="module")
def diagnose():
    spec = importlib.util.spec_from_file_location("locret_diagnose", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(byte_tokenizer):
    return build_model(tiny_config("gemma3", vocab_size=len(byte_tokenizer), max_position_embeddings=1024))


def test_the_oracle_is_the_questions_eager_attention(diagnose, model):
    document, question = torch.randint(3, 128, (1, 60)), torch.randint(3, 128, (1, 7))
    engine = Engine(model, None, mode="full", chunk_size=16, keep_bytes=0)
    kept = engine.prefill_document(document)
    oracle = diagnose.question_attention(model, kept, question, [1])
    assert kept.cache.get_seq_length() == 60  # rolled back
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(torch.cat([document, question], 1), output_attentions=True).attentions[1][0]  # (Hq, L, L)
    expected = probs[:, 60:, :60].amax(dim=1).view(2, 2, 60).amax(dim=1)
    torch.testing.assert_close(oracle[1], expected, rtol=1e-4, atol=1e-5)


def test_the_table_policy_keeps_the_best_ranked_tokens(diagnose, model):
    table = {1: torch.rand(2, 60)}
    cache = budget_cache(model, diagnose.TableScores(table=table), prompt_tokens=60, chunk_size=16, budget=20,
                         stabilizer=4, sink=2)
    Engine(model, None, mode="locret", chunk_size=16, keep_bytes=0, budget=20, stabilizer=4, sink=2).prefill(
        torch.randint(3, 128, (1, 60)), cache=cache)
    kept = diagnose.layer_state(cache, "positions")[1][0]
    for head in range(2):
        rest = table[1][head, 2:56].topk(14).indices + 2
        expected = sorted([0, 1, 56, 57, 58, 59] + rest.tolist())
        assert sorted(kept[head].tolist()) == expected


def test_a_run_reports_ranks_kept_shares_and_answers(diagnose, model, byte_tokenizer, tmp_path):
    heads = RetainingHeads(HeadsSpec.from_config(model.config, 8)).save(tmp_path / "heads.safetensors")
    args = argparse.Namespace(families=["heldout"], documents=1, length=500, seed=0, compressions=[4.0],
                              heads=str(heads), oracle_caches=True)
    rows = diagnose.diagnose(model, byte_tokenizer, args)
    assert {r["family"] for r in rows} == {"heldout"} and len(rows) == 5  # four depths and a multi-key question
    for row in rows:
        assert row["value_tokens"] >= 6 and row["layers"] == [1]
        assert set(row["modes"]) == {"full", "locret@4x", "oracle@4x"}
        kept = row["modes"]["oracle@4x"]["value_kept"]
        assert len(kept) == 1 and len(kept[0]) == 2 and all(0 <= k <= 1 for k in kept[0])
    text = diagnose.table(rows, [4.0]) + diagnose.layer_table(rows, 4.0)
    assert "| heldout | 5 | " in text and "| 1 | " in text
    args.oracle_caches = False  # the ranks without the oracle's caches
    rows = diagnose.diagnose(model, byte_tokenizer, args)
    assert all(set(row["modes"]) == {"full", "locret@4x"} and row["oracle_key_top"] for row in rows)
    assert "| heldout | 5 | " in diagnose.table(rows, [4.0]) + diagnose.layer_table(rows, 4.0)
