"""Evicted tokens merged into summaries (``merge``) and compression once after an exact prefill (``once``)."""

from __future__ import annotations

from types import SimpleNamespace

import psutil
import pytest
import torch
from test_cli import refused, tiny_model  # noqa: F401  (tiny_model: a fixture)
from test_locret import BUDGET, CHUNK, PROMPT, SINK, STABILIZER, budget_layers, heads, ids, model  # noqa: F401  (fixtures)

from headspace import Engine, HeadspaceError
from headspace.attention.kernels import biased_attention_lse, causal_attention, causal_attention_lse, merge_lse
from headspace.eviction.budget import BudgetLayer, BudgetOptions, budget_cache, split_options
from headspace.eviction.summaries import Summaries


@pytest.mark.parametrize("chunk", [1, 5])
def test_a_summary_weighs_as_its_tokens_when_they_are_equal(chunk):
    """n equal evicted tokens merged into one summary (bonus log n) are attended exactly as the n tokens were."""
    torch.manual_seed(3)
    batch, kv_heads, group, dim, stored = 1, 2, 3, 8, 12
    query = torch.randn(batch, kv_heads * group, chunk, dim, dtype=torch.float64)
    keys, values = torch.randn(2, batch, kv_heads, stored, dim, dtype=torch.float64)
    merged_keys, merged_values = torch.randn(2, batch, kv_heads, 2, dim, dtype=torch.float64)
    counts = torch.tensor([[[3.0, 5.0], [1.0, 4.0]]], dtype=torch.float64)
    summaries = Summaries(10, merged_keys * counts[..., None], merged_values * counts[..., None], counts)
    mean_keys, mean_values, bonus = summaries.attended()
    out, _ = merge_lse([causal_attention_lse(query, keys, values, 0.3),
                        biased_attention_lse(query, mean_keys, mean_values, bonus, 0.3)])
    copies = [torch.cat([merged_keys[:, h, b].expand(int(counts[0, h, b]), dim) for b in range(2)])
              for h in range(kv_heads)]
    copy_values = [torch.cat([merged_values[:, h, b].expand(int(counts[0, h, b]), dim) for b in range(2)])
                   for h in range(kv_heads)]
    for head in range(kv_heads):  # per KV head: the copies first (the past), then the stored tokens
        rows = slice(head * group, (head + 1) * group)
        expected = causal_attention(query[:, rows], torch.cat([copies[head][None, None], keys[:, head : head + 1]], 2),
                                    torch.cat([copy_values[head][None, None], values[:, head : head + 1]], 2), 0.3)
        torch.testing.assert_close(out[:, rows].to(expected.dtype), expected, rtol=1e-5, atol=1e-6)  # float32


def test_every_evicted_token_is_merged_once_and_the_budget_holds(model, heads, ids):  # noqa: F811
    engine = Engine(model, mode="locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                    merge=16, heads=heads)
    cache = budget_cache(model, "locret", prompt_tokens=PROMPT, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                         chunk_size=CHUNK, merge=16, heads=heads)
    layers = budget_layers(cache)
    engine.prefill(ids, cache=cache)
    for token in range(3):
        engine.decode_step(token, cache)
    for layer in layers:
        assert layer.stored == BUDGET
        merged = layer.summaries.counts.sum(-1)  # per (batch, head)
        assert torch.equal(merged, torch.full_like(merged, PROMPT + 3 - BUDGET))
        kept = torch.zeros(PROMPT + 3)  # evicted positions per block = the block's positions not kept
        for head in range(layer.heads):
            kept.zero_()
            kept[layer.positions[0, head]] = 1
            per_block = (1 - kept).reshape(-1, 1).squeeze(-1)
            blocks = torch.zeros(layer.summaries.counts.shape[-1])
            blocks.scatter_add_(0, torch.arange(PROMPT + 3) // 16, per_block)
            assert torch.equal(layer.summaries.counts[0, head], blocks)


def test_merging_changes_the_answer_but_not_what_is_kept(model, heads, ids):  # noqa: F811
    dropped, _ = Engine(model, mode="locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER,
                        sink=SINK, prefill="chunked", heads=heads).prefill(ids)
    logits, cache = Engine(model, mode="locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                           prefill="chunked", merge=16, heads=heads).prefill(ids)
    _, plain = Engine(model, mode="locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER,
                      sink=SINK, once=True, heads=heads).prefill(ids)
    assert (logits - dropped).abs().max() > 1e-4  # later chunks attend the summaries of earlier ones
    once_logits, once_cache = Engine(model, mode="locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER,
                                     sink=SINK, once=True, merge=16, heads=heads).prefill(ids)
    full_logits, _ = Engine(model, mode="full").prefill(ids)
    torch.testing.assert_close(once_logits, full_logits, rtol=1e-4, atol=1e-4)  # the prompt itself is exact
    for merged, kept in zip(once_cache.layers, plain.layers, strict=True):
        if isinstance(merged, BudgetLayer):  # the same scores choose the same tokens, merged or dropped
            assert torch.equal(merged.positions, kept.positions)


def test_once_holds_the_whole_prompt_until_its_last_chunk(model, heads, ids):  # noqa: F811
    cache = budget_cache(model, "locret", prompt_tokens=PROMPT, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                         chunk_size=CHUNK, once=True, heads=heads)
    layers = budget_layers(cache)

    def check(done: int, total: int) -> None:
        for layer in layers:
            assert layer.stored == (done if done < total else BUDGET)

    Engine(model, mode="locret", chunk_size=CHUNK, heads=heads).prefill(ids, cache=cache, on_chunk=check)
    assert all(layer.store.capacity == BUDGET + CHUNK for layer in layers)  # the prompt's room is given back


def test_merge_takes_its_slots_from_the_budget_and_refuses_what_cannot_work():
    assert BudgetOptions(compression=8, merge=64).resolve(4096) == 512 - 64
    assert BudgetOptions(budget=100, merge=8).resolve(4096) == 100  # a budget in tokens is the tokens kept
    assert BudgetOptions(compression=8, merge=64).resolve(100) == 68  # a short prompt is kept whole
    with pytest.raises(HeadspaceError, match="whole budget"):
        BudgetOptions(compression=8, merge=8)
    with pytest.raises(HeadspaceError, match="block of positions"):
        BudgetOptions(merge=-1)
    with pytest.raises(HeadspaceError, match="once must be true or false"):
        BudgetOptions(once=2)


def test_release_is_once_with_the_prompt_in_host_ram(model, heads, ids):  # noqa: F811
    """offload+locret with release: the prompt is attended exactly over the host tier, which is then freed; the
    budget and summaries are those of once (the same scores choose the same tokens, however often it evicts)."""
    options = dict(chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK, merge=16, heads=heads)
    once = Engine(model, mode="locret", once=True, **options)
    released = Engine(model, mode="offload+locret", release=True, **options)
    kept = Engine(model, mode="offload+locret", **options)
    (once_logits, once_cache), (logits, cache) = once.prefill(ids), released.prefill(ids)
    torch.testing.assert_close(logits, once_logits, rtol=1e-4, atol=1e-4)
    exact_logits, exact_cache = Engine(model, mode="locret", **options).prefill(ids)  # locret's default prefill
    assert torch.equal(exact_logits, logits)
    for layer, reference, exact in zip(budget_layers(cache), budget_layers(once_cache), budget_layers(exact_cache),
                                       strict=True):
        assert layer.host is None and layer.host_bytes == 0 and exact.host is None
        assert torch.equal(layer.positions, reference.positions) and torch.equal(exact.positions, layer.positions)
        assert torch.equal(layer.summaries.counts, reference.summaries.counts)
    assert cache.device_kv_bytes == once_cache.device_kv_bytes == exact_cache.device_kv_bytes  # staging freed
    assert all(layer.host_bytes > 0 for layer in budget_layers(kept.prefill(ids)[1]))  # without release: kept
    for token in range(3):
        torch.testing.assert_close(released.decode_step(token, cache), once.decode_step(token, once_cache),
                                   rtol=1e-4, atol=1e-4)
    generation, once_generation = released.generate(ids, max_new_tokens=4), once.generate(ids, max_new_tokens=4)
    assert generation.stats.host_kv_bytes == 0
    assert generation.token_ids == once_generation.token_ids
    # what host RAM held while the prompt was prefilled is reported, though it was freed; once held none there
    evicted = sum(layer.dtype.itemsize * 2 * layer.heads * layer.head_dim * (PROMPT - BUDGET)
                  for layer in budget_layers(cache))
    assert generation.stats.prefill_host_kv_bytes >= evicted > 0 == once_generation.stats.prefill_host_kv_bytes
    assert "while the prompt was prefilled" in generation.stats.summary()
    assert "while the prompt was prefilled" not in once_generation.stats.summary()


def test_a_kept_document_released_answers_from_its_budget(model, heads, ids):  # noqa: F811
    """A released document's questions attend the budget and summaries, as once's do; a kept host tier would
    give the question's prefill every evicted token."""
    options = dict(chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK, merge=16, heads=heads)
    once = Engine(model, mode="locret", once=True, keep_bytes=0, **options)
    released = Engine(model, mode="offload+locret", release=True, keep_bytes=0, **options)
    exact = Engine(model, mode="locret", keep_bytes=0, **options)  # locret's default: the same, as one mode
    question = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    answers = [engine.ask(engine.prefill_document(ids), question, max_new_tokens=4)
               for engine in (once, released, exact)]
    assert answers[1].token_ids == answers[0].token_ids == answers[2].token_ids
    assert answers[1].stats.host_kv_bytes == answers[2].stats.host_kv_bytes == 0


def test_locret_prefills_exactly_and_merges_unless_told_otherwise():
    """Locret's defaults: an exact prefill with summaries of max(64, 8 x ratio) positions; a chunked prefill (or
    once) brings no summaries; other policies run chunked, as published; conflicting choices are refused."""
    def chosen(policy: str, **given) -> tuple[str, int]:
        options = split_options(policy, given)[0]
        return options.prefill, options.merge

    assert chosen("locret") == ("exact", 64)
    assert chosen("locret", compression=20) == ("exact", 160)
    assert chosen("locret", merge=0) == ("exact", 0)
    assert chosen("locret", prefill="chunked") == ("chunked", 0)
    assert chosen("locret", once=True) == ("chunked", 0)
    assert chosen("snapkv") == ("chunked", 0) and chosen("snapkv", prefill="exact") == ("exact", 0)
    with pytest.raises(HeadspaceError, match="prefill must be 'chunked' or 'exact', got 'fast'"):
        split_options("locret", {"prefill": "fast"})
    with pytest.raises(HeadspaceError, match="give one of them"):
        split_options("locret", {"prefill": "exact", "once": True})
    with pytest.raises(HeadspaceError, match="option.s. prefill not taken by eviction with policy 'locret' and "
                                             "offload"):
        split_options("locret", {"prefill": "chunked"}, offload=True)


def test_an_exact_prefill_that_host_ram_cannot_hold_is_refused_with_the_way_out(model, heads, ids, monkeypatch):  # noqa: F811
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=0))
    options = dict(chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK, heads=heads)
    with pytest.raises(HeadspaceError, match="exact prefill holds the evicted tokens there .* prefill=chunked"):
        Engine(model, mode="locret", **options).prefill(ids)
    _, cache = Engine(model, mode="locret", prefill="chunked", **options).prefill(ids)  # keeps nothing there
    assert all(layer.stored == BUDGET for layer in budget_layers(cache))


@pytest.mark.usefixtures("cpu_default_device")
def test_the_command_line_passes_prefill(capsys, tiny_model):  # noqa: F811
    line = refused(capsys, "generate", "--model", tiny_model, "--prompt", "hi", "--mode", "locret",
                   "--prefill", "exact", "--once")
    assert "give one of them" in line
    line = refused(capsys, "generate", "--model", tiny_model, "--prompt", "hi", "--mode", "offload+locret",
                   "--prefill", "chunked")
    assert "prefill not taken by eviction with policy 'locret' and offload" in line


def test_offload_locret_merges_for_decode_over_the_budget_only(model, heads):  # noqa: F811
    Engine(model, mode="offload+locret", merge=64, heads=heads)
    for options in (dict(merge=64), dict(release=True)):
        with pytest.raises(HeadspaceError, match="has nothing to do; use decode='budget'"):
            Engine(model, mode="offload+locret", decode="exact", heads=heads, **options)
    with pytest.raises(HeadspaceError, match="release must be true or false"):
        Engine(model, mode="offload+locret", release=2, heads=heads)


@pytest.mark.usefixtures("cpu_default_device")
def test_the_command_line_passes_release_and_names_the_mode_that_takes_it(capsys, tiny_model):  # noqa: F811
    line = refused(capsys, "generate", "--model", tiny_model, "--prompt", "hi", "--mode", "locret", "--release")
    assert "release not taken by eviction with policy 'locret'" in line
    line = refused(capsys, "generate", "--model", tiny_model, "--prompt", "hi", "--mode", "offload+locret",
                   "--release", "--merge", "64", "--compression", "8", "--heads", "missing.safetensors")
    assert "release" not in line  # taken: what is refused is the heads file
