"""The host/PCIe split search of decode (``cpu_heads="auto"``): it finds the fastest split and never
changes what is computed."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_logits_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig

from headspace.engine.engine import Engine
from headspace.errors import HeadspaceError
from headspace.kv.layers import OffloadLayer
from headspace.kv.split import MARGIN, SHARE_STEPS, SplitSearch


def run_search(search: SplitSearch, step_time) -> list[int]:
    tried = [search.current]
    for _ in range(100):
        if search.done:
            break
        nxt = search.record(step_time(search.current))
        tried.append(nxt)
    assert search.done
    return tried


@settings(max_examples=200, deadline=None)
@given(heads=st.integers(0, 16), host=st.floats(0.05, 20), start=st.integers(0, 16))
def test_search_finds_the_split_where_both_sides_finish_together(heads, host, start):
    """Step time is the slower side: n heads on a host ``host`` times slower than PCIe per head."""
    def step_time(n):
        return max(n * host, heads - n) + 0.01 * n  # a little host overhead per head breaks ties

    search = SplitSearch(heads, start)
    run_search(search, step_time)
    best = min(range(heads + 1), key=step_time)
    within_noise = step_time(best) > (1 - MARGIN) * step_time(0)
    assert step_time(search.current) == step_time(best) or (search.current == 0 and within_noise)
    assert 0 <= search.current <= heads


def test_search_tries_each_split_once_and_takes_the_fastest_of_its_steps():
    times = {2: [5.0, 3.0], 3: [2.5, 9.0], 4: [4.0, 4.0], 0: [6.0, 6.0]}
    search = SplitSearch(8, 2, steps_per_trial=2)
    seen = []
    while not search.done:
        n = search.current
        seen.append(n)
        search.record(times[n].pop(0))
    assert search.current == 3  # 2.5 beats 3.0: a slow outlier step does not count against a split
    assert seen == [2, 2, 3, 3, 4, 4, 0, 0]  # nothing on the host is tried last


@given(most=st.integers(1, 16), start=st.integers(0, 16), wait=st.floats(0.6, 2))
def test_a_fixed_cost_of_any_host_part_ends_the_search_at_none(most, start, wait):
    """Each host unit takes work off the copies but any host part costs ``wait`` more than it saves: the climb
    alone would stop at a local best; the search ends with nothing on the host."""
    def step_time(n):
        return float(most) if n == 0 else max(n * 0.9, most - n) + most * wait  # wait: of a step without host

    search = SplitSearch(most, start)
    run_search(search, step_time)
    assert search.current == 0


@pytest.mark.parametrize(("gain", "kept"), [(0.02, 0), (0.05, 3)])
def test_a_host_part_must_beat_none_by_the_margin(gain, kept):
    """3 units on the host is the fastest split, faster than none by ``gain``: within the margin none is kept."""
    def step_time(n):
        return 1.0 - gain if n == 3 else 1.0 + 0.01 * abs(n - 3) * (n > 0)  # none: 1.0

    search = SplitSearch(8, 3)
    run_search(search, step_time)
    assert search.current == kept


def test_nothing_to_split_is_done_at_once():
    assert SplitSearch(0, 3).done and SplitSearch(0, 3).current == 0


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_auto_split_changes_the_split_during_decode_and_stays_exact():
    """An exact host tier: the search is over a host share of every streamed head's positions."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(5))
    full = Engine(model, None, mode="full").generate(ids, max_new_tokens=24, stop_on_eos=False)
    engine = Engine(model, None, mode="offload", gpu_heads=1, cpu_heads="auto", chunk_size=32)
    splits = []
    real_update = OffloadLayer.update

    def spy(layer, *args, **kwargs):
        if args[0].shape[2] == 1 and layer is first[0]:
            splits.append(layer.host_share)
        return real_update(layer, *args, **kwargs)

    cache = engine.new_cache(100)
    first = [cache.layers[0]]
    OffloadLayer.update = spy
    try:
        logits, cache = engine.prefill(ids, cache=cache)
        tokens = [int(logits.argmax())]
        for _ in range(23):
            tokens.append(int(engine.decode_step(tokens[-1], cache).argmax()))
    finally:
        OffloadLayer.update = real_update
    assert tokens == full.token_ids
    assert cache.split.done and cache.split.shares and cache.split.most == SHARE_STEPS
    assert len(set(splits)) > 1  # the search moved the split and every split gave the same tokens
    assert all(layer.host_share == cache.split.current / SHARE_STEPS and layer.cpu_heads == 0
               for layer in cache.layers)


@pytest.mark.parametrize(("share", "cpu_heads"), [(0.3, 0), (1.0, 0), (0.5, 2), (0.01, 7)])
def test_a_host_share_of_positions_decodes_the_logits_of_full(share, cpu_heads):
    """The host attends the first positions of every streamed head (and ``cpu_heads`` whole heads), the rest is
    streamed, the two merged by log-sum-exp: every step's logits are full's, as the share meets new tokens."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(6))
    full = Engine(model, None, mode="full")
    engine = Engine(model, None, mode="offload", gpu_heads=1, cpu_heads=cpu_heads, chunk_size=32)
    full_logits, full_cache = full.prefill(ids)
    logits, cache = engine.prefill(ids)
    for layer in cache.layers:
        layer.set_host_share(share)
    assert "first" in cache.describe() and "of the positions of each streamed head" in cache.describe()
    token = int(full_logits.argmax())
    for _ in range(6):
        expected = full.decode_step(token, full_cache)
        assert_logits_equal(engine.decode_step(token, cache), expected)
        token = int(expected.argmax())


def test_a_host_share_is_checked():
    model = tiny_llama()
    layer = Engine(model, None, mode="offload", gpu_heads=1).new_cache(10).layers[0]
    with pytest.raises(HeadspaceError, match="host share must be between 0 and 1"):
        layer.set_host_share(1.5)
    quantized = Engine(model, None, mode="offload", gpu_heads=1, kv_dtype="int8").new_cache(10).layers[0]
    with pytest.raises(HeadspaceError, match="needs an exact host tier"):
        quantized.set_host_share(0.5)


def test_auto_split_over_a_quantized_host_tier_counts_heads():
    model = tiny_llama()
    cache = Engine(model, None, mode="offload", gpu_heads=1, cpu_heads="auto", kv_dtype="int8").new_cache(10)
    assert not cache.split.shares and cache.split.most == 7
    assert all(layer.host_share == 0 and layer.cpu_heads == cache.split.current for layer in cache.layers)


def test_bad_cpu_heads_is_refused():
    model = tiny_llama()
    for bad in ("some", 8, -1):
        with pytest.raises(HeadspaceError, match="cpu_heads must be 'auto' or between 0 and 7"):
            Engine(model, None, mode="offload", gpu_heads=1, cpu_heads=bad).new_cache(10)
