"""The footprint a budgeted mode reports (what kept documents make room for) is what its cache holds at most."""

from __future__ import annotations

import pytest
from conftest import PROMPT_TOKENS, random_ids

from headspace import Engine
from headspace.kv.cache import kv_bytes

CHUNK = 16
BYTES_PER_TOKEN = 2 * 2 * 4 * 8 * 4  # tiny llama: 2 layers, keys and values, 4 KV heads of 8, float32


def peak_and_footprint(model, mode: str, **options) -> tuple[int, int]:
    """The most device KV bytes the cache held after any prefill chunk, and the mode's footprint for the prompt."""
    engine = Engine(model, mode=mode, chunk_size=CHUNK, keep_bytes=0, compression=4, **options)
    peak = []
    cache = engine.new_cache(PROMPT_TOKENS, prompt_tokens=PROMPT_TOKENS)
    engine.prefill(random_ids(PROMPT_TOKENS, seed=1), cache=cache,
                   on_chunk=lambda done, total: peak.append(kv_bytes(cache)[0]))
    device, host = engine.mode.footprint(engine._request(PROMPT_TOKENS, PROMPT_TOKENS))
    assert host == 0
    return max(peak), device


@pytest.mark.parametrize("mode", ["snapkv", "snapkv-question", "h2o", "pyramidkv", "expected-attention"])
@pytest.mark.parametrize("stabilizer", [4, 64])  # 64: the budget is stabilizer + sink, more than a quarter prompt
def test_the_footprint_is_the_peak_of_prefill(tiny_models, one_thread, mode, stabilizer):
    peak, footprint = peak_and_footprint(tiny_models.model("llama"), mode, stabilizer=stabilizer, sink=2)
    assert peak == footprint


def test_query_aware_snapkv_counts_the_whole_prompt_it_holds(tiny_models, one_thread):
    model = tiny_models.model("llama")
    _, chunked = peak_and_footprint(model, "snapkv", stabilizer=4, sink=2)
    _, whole = peak_and_footprint(model, "snapkv-question", stabilizer=4, sink=2)
    assert chunked == (PROMPT_TOKENS // 4 + CHUNK) * BYTES_PER_TOKEN  # the budget and a chunk
    assert whole == PROMPT_TOKENS * BYTES_PER_TOKEN  # the prompt, until its last chunk is scored
