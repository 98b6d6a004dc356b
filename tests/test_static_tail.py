"""Quantized resident heads in the static form: each step's token joins the store's recent positions as a view of
the one buffer the steps write (no copy of them per step), and those positions are the ones eager decode keeps."""

from __future__ import annotations

import pytest
import torch
from conftest import kv_heads

from headspace import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


def test_static_steps_grow_the_recent_positions_in_place(tiny_models):
    model = tiny_models.model("llama")
    ids, ref = tiny_models.reference("llama")
    engines = [Engine(model, mode="offload", gpu_heads=kv_heads(model.config), kv_dtype="int4", chunk_size=32,
                      cuda_graphs=graphs) for graphs in (True, False)]
    caches = [engine.prefill(ids)[1] for engine in engines]
    addresses, lengths = set(), []
    for token in ref.tokens[:6]:
        for engine, cache in zip(engines, caches, strict=True):
            engine.decode_step(token, cache)
        recent = caches[0].layers[0].resident.recent[0]
        addresses.add(recent.data_ptr())
        lengths.append(recent.shape[2])
    assert len(addresses) == 1 and lengths == list(range(lengths[0], lengths[0] + 6))
    for static, eager in zip(caches[0].layers, caches[1].layers, strict=True):
        assert static.resident.quantized == eager.resident.quantized
        for mine, theirs in zip(static.resident.recent, eager.resident.recent, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
