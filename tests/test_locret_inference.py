"""benchmarks/locret_inference.py on a tiny Gemma 3: settings parse against the defaults, a sweep runs each
setting once and a rerun resumes, and the tables render."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
from conftest import build_model, tiny_config

from headspace.eviction.retaining.heads import HeadsSpec, RetainingHeads

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports locret_diagnose beside it
    try:
        import locret_inference
    finally:
        sys.path.remove(str(BENCHMARKS))
    return locret_inference


def test_a_setting_names_its_changes_from_the_defaults(sweep):
    setting = sweep.parse_setting("pool=3,center=1")
    assert setting == {**sweep.DEFAULTS, "pool": 3, "center": 1}
    assert sweep.label(setting) == "pool=3,center=1" and sweep.label(sweep.parse_setting("")) == "default"
    with pytest.raises(SystemExit, match="unknown setting 'budget'"):
        sweep.parse_setting("budget=10")


def test_a_sweep_runs_each_setting_once_and_resumes(sweep, byte_tokenizer, tmp_path):
    model = build_model(tiny_config("gemma3", vocab_size=len(byte_tokenizer), max_position_embeddings=1024))
    heads = RetainingHeads(HeadsSpec.from_config(model.config, 8)).save(tmp_path / "heads.safetensors")
    args = argparse.Namespace(families=["heldout"], documents=1, length=400, seed=0, compressions=[4.0],
                              heads=str(heads), settings=["", "chunk=64,pool=3,center=1"])
    path = tmp_path / "sweep.json"
    results = {"full": {}, "runs": {}}
    sweep.run(model, byte_tokenizer, args, results, path)
    assert list(results["runs"]) == ["default@4x", "chunk=64,pool=3,center=1@4x"]
    assert len(results["full"]["heldout/0"]) == 5  # four depths and a multi-key question
    for run in results["runs"].values():
        assert len(run["rows"]) == 5
        assert all(0 <= row[f"{m}_{what}"] <= 1 for row in run["rows"] for m in ("key", "value", "fact")
                   for what in ("kept", "whole"))
    first = results["runs"]["default@4x"]["seconds"]
    sweep.run(model, byte_tokenizer, args, results, path)  # resumed: nothing runs again
    assert results["runs"]["default@4x"]["seconds"] == first
    text = sweep.table(results) + sweep.depth_table(results)
    assert "| default | 4x | heldout | 5 | " in text and "| chunk=64,pool=3,center=1 | 4x | heldout | " in text
