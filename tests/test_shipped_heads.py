"""Locret finds the heads shipped for a model by its architecture, whichever files ship beside them."""

from __future__ import annotations

import shutil

import torch
from conftest import random_ids, tiny_config

import headspace.eviction.retaining.heads as heads_module
from headspace import Engine
from headspace.eviction.retaining.heads import DATA_DIR, HeadsSpec, RetainingHeads, shipped_heads


def test_a_gemma3_heads_file_beside_smollm2s_is_found_for_gemma3_and_used_by_locret(tiny_models, tmp_path,
                                                                                      monkeypatch, one_thread):
    smollm2 = DATA_DIR / "smollm2-135m.retaining.safetensors"
    shutil.copy(smollm2, tmp_path / smollm2.name)
    gemma = tiny_models.model("gemma3")
    torch.manual_seed(0)
    trained = RetainingHeads(HeadsSpec.from_config(gemma.config, hidden=8))
    for parameter in trained.parameters():
        parameter.data.normal_()
    trained.save(tmp_path / "gemma3-270m.retaining.safetensors")
    monkeypatch.setattr(heads_module, "DATA_DIR", tmp_path)
    heads_module._MEMO.clear()
    assert shipped_heads(gemma.config) == tmp_path / "gemma3-270m.retaining.safetensors"
    assert shipped_heads(tiny_config("llama")) is None  # neither file fits another architecture
    ids = random_ids(80, seed=2)
    engine = Engine(gemma, mode="locret", budget=40, stabilizer=8, sink=2, chunk_size=16, keep_bytes=0)
    shipped = engine.generate(ids, max_new_tokens=4, stop_on_eos=False).token_ids
    given = Engine(gemma, mode="locret", budget=40, stabilizer=8, sink=2, chunk_size=16, keep_bytes=0,
                   heads=trained).generate(ids, max_new_tokens=4, stop_on_eos=False).token_ids
    assert shipped == given
    heads_module._MEMO.clear()
