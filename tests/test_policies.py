"""The stronger baselines (Expected Attention, TOVA, key norm, H2O, PyramidKV, query-aware SnapKV): each keeps
exactly the tokens its rule names on a hand-made case, and keeps its budget through prefill and decode."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from headspace import Engine, HeadspaceError
from headspace.eviction.budget import BudgetLayer, BudgetSettings, budget_cache
from headspace.eviction.policies import make_policy
from headspace.kv.layers import Phase

NEW = ["expected-attention", "h2o", "knorm", "pyramidkv", "snapkv-question", "tova"]
VOCAB, PROMPT, CHUNK, BUDGET, STABILIZER, SINK = 128, 150, 16, 40, 8, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(2))


def kept_after(policy: str, chunks: list[tuple], budget: int, model=None, prompt_tokens: int | None = None,
               **options) -> list[list[int]]:
    """Feed ``chunks`` of (queries (1, Hq, c, D), keys and values (1, Hk, c, D)) through one budgeted layer
    (no stabilizer, no sinks, softmax scale 1); the positions each KV head keeps."""
    settings = BudgetSettings(budget, stabilizer=0, sink=0, prompt_tokens=prompt_tokens)
    layer = BudgetLayer(0, make_policy(policy, **options).prepare(model), settings, chunk_size=8)
    for query, keys, values in chunks:
        layer.update(keys, values)
        layer.attend(query, 1.0, None, Phase.PREFILL)
    return [sorted(row) for row in layer.positions[0].tolist()]


def one_hot(targets: list[int], dim: int = 16, strength: float = 20.0) -> torch.Tensor:
    """Rows ``sqrt(strength) * e_t``: with keys made the same way, a query attends (almost) only its target."""
    rows = torch.zeros(len(targets), dim)
    rows[torch.arange(len(targets)), torch.tensor(targets)] = strength**0.5
    return rows


def chunk_of(query_targets: list[int], key_ids: list[int], heads: int = 2) -> tuple:
    """Queries aimed at ``query_targets`` (the same for each of ``heads`` query heads), keys ``e_id``."""
    query = one_hot(query_targets).expand(1, heads, -1, -1)
    keys = one_hot(key_ids)[None, None]
    return query, keys, torch.ones_like(keys)


# -- each policy's rule on a hand-made case -----------------------------------------------------------
def test_knorm_keeps_the_smallest_keys_per_head():
    keys = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 6.0], [1.0, 6.0, 5.0, 4.0, 3.0, 2.0]])[None, :, :, None]
    keys = keys * torch.ones(1, 1, 1, 8)
    query = torch.randn(1, 4, 6, 8)
    assert kept_after("knorm", [(query, keys, torch.randn_like(keys))], budget=2) == [[1, 3], [0, 5]]


def test_tova_keeps_what_the_last_query_attends():
    # every query but the last aims at token 1; the last one aims at 4, then 2 with half the strength
    query = one_hot([0, 1, 1, 1, 1, 1]).expand(1, 2, -1, -1).clone()
    query[:, :, -1] = one_hot([4])[0] + one_hot([2], strength=5.0)[0]
    keys = one_hot([0, 1, 2, 3, 4, 5])[None, None]
    assert kept_after("tova", [(query, keys, torch.ones_like(keys))], budget=2) == [[2, 4]]
    # averaged over the query group: a second head aiming at 3 brings it level with 4
    query = torch.cat([query, one_hot([0, 1, 1, 1, 1, 3])[None, None]], dim=1)[:, 1:]
    assert kept_after("tova", [(query, keys, torch.ones_like(keys))], budget=2) == [[3, 4]]


def test_h2o_keeps_the_tokens_that_received_most_attention_over_all_chunks():
    # chunk 1 (positions 0-3): its queries look at 0, 1, 1, 1; chunk 2 (4-7) at 2, 2, 0, 7.
    # received: 1 -> 3, 0 -> 2, 2 -> 2, 7 -> 1, the rest ~0
    chunks = [chunk_of([0, 1, 1, 1], [0, 1, 2, 3]), chunk_of([2, 2, 0, 7], [4, 5, 6, 7])]
    assert kept_after("h2o", chunks, budget=4) == [[0, 1, 2, 7]]
    assert kept_after("h2o", chunks, budget=4, block=3) == [[0, 1, 2, 7]]  # queries taken in blocks
    assert kept_after("tova", chunks, budget=4) != [[0, 1, 2, 7]]  # not what the newest query alone names


def test_snapkv_question_keeps_what_the_question_attends_after_holding_the_whole_prompt(model):
    # the prompt's last 2 tokens (the "question", window=2) look at 3 and 5; everything before looks at 0
    chunks = [chunk_of([0, 0, 0, 0], [0, 1, 2, 3]), chunk_of([0, 0, 0, 3], [4, 5, 6, 7]), chunk_of([5], [8])]
    settings = dict(budget=2, prompt_tokens=9, window=2, kernel=1, model=model)
    assert kept_after("snapkv-question", chunks, **settings) == [[3, 5]]  # window spans the last two chunks
    assert kept_after("snapkv-question", chunks[:2], **settings) == [list(range(8))]  # prompt not over: all kept
    # chunk-by-chunk SnapKV had to choose before the question: token 3 or 5 is gone
    assert kept_after("snapkv", chunks, budget=2, window=2, kernel=1) != [[3, 5]]


def rotated(model, rows: torch.Tensor, start: int) -> torch.Tensor:
    """``rows`` (1, H, c, D) given RoPE at positions ``start..`` by the model's own rotary embedding."""
    cos, sin = model.model.rotary_emb(rows, torch.arange(start, start + rows.shape[2])[None])
    return apply_rotary_pos_emb(rows, rows, cos, sin)[0]


def test_expected_attention_without_spread_is_the_attention_of_the_next_query(model):
    """Identical pre-RoPE queries have no covariance: with a one-position future, the expected query is the
    next one exactly, so the scores are its attention (group mean) times the value norms."""
    torch.manual_seed(3)
    dim, tokens = 16, 12
    direction = torch.randn(1, 4, 1, dim)
    query = rotated(model, direction.expand(1, 4, tokens, dim), 0)
    keys, values = torch.randn(1, 2, tokens, dim) * 2, torch.randn(1, 2, tokens, dim)
    following = rotated(model, direction, tokens)  # (1, 4, 1, D): the query at position 12
    probs = (following.view(1, 2, 2, 1, dim) @ keys[:, :, None].transpose(-1, -2)).softmax(-1)
    expected = probs.mean(dim=2)[:, :, 0] * values.norm(dim=-1)
    kept = kept_after("expected-attention", [(query, keys, values)], budget=4, model=model, future=1, skip_first=0)
    assert kept == [sorted(row) for row in expected[0].topk(4).indices.tolist()]


def test_expected_attention_prefers_keys_along_the_queries_spread(model):
    """Queries of mean zero that vary in RoPE plane (0, 8) only: a key in that plane is expected to be
    attended (E[exp(q.k)] grows with k's variance term), one of the same norm elsewhere is not."""
    dim, size = 16, 3.0
    plain = torch.zeros(4, dim)
    plain[0, 0], plain[1, 0], plain[2, 8], plain[3, 8] = size, -size, size, -size
    query = rotated(model, plain.expand(1, 2, 4, dim), 0)
    keys = torch.zeros(1, 1, 4, dim)
    keys[0, 0, 0, 0], keys[0, 0, 1, 1], keys[0, 0, 2, 0], keys[0, 0, 3, 2] = 2.0, 2.0, 1.0, 2.0
    values = torch.ones(1, 1, 4, dim)
    options = dict(model=model, future=1, skip_first=0)
    assert kept_after("expected-attention", [(query, keys, values)], budget=1, **options) == [[0]]
    assert kept_after("expected-attention", [(query, keys, values)], budget=2, **options) == [[0, 2]]


def test_pyramidkv_spreads_the_budget_from_bottom_to_top_with_the_same_total():
    budgets = make_policy("pyramidkv").layer_budgets(110, [0, 1, 2, 3, 4], kept=10)
    assert budgets == {0: 205, 1: 158, 2: 110, 3: 62, 4: 15}  # 10 kept + 195 ... 5 (= 100 / beta)
    flat = make_policy("pyramidkv", beta=1).layer_budgets(110, [0, 1, 2], kept=10)
    assert flat == {0: 110, 1: 110, 2: 110}
    with pytest.raises(HeadspaceError, match="beta"):
        make_policy("pyramidkv", beta=0.5)


def test_pyramidkv_layers_keep_their_own_budgets(model, ids):
    cache = budget_cache(model, "pyramidkv", prompt_tokens=PROMPT, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                         chunk_size=CHUNK, kernel=1)
    Engine(model, mode="pyramidkv", chunk_size=CHUNK).prefill(ids, cache=cache)
    layers = [layer for layer in cache.layers if isinstance(layer, BudgetLayer)]
    budgets = [layer.budget for layer in layers]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > BUDGET > budgets[-1]
    assert sum(budgets) == BUDGET * len(layers) and budgets[-1] >= STABILIZER + SINK
    assert [layer.stored for layer in layers] == budgets


def test_pyramidkv_budgets_cover_full_attention_layers_only():
    from conftest import build_model, tiny_config

    model = build_model(tiny_config("gemma3", layer_types=["full_attention", "sliding_attention", "full_attention"]))
    cache = budget_cache(model, "pyramidkv", prompt_tokens=200, budget=40, stabilizer=8, sink=2, beta=3)
    assert cache.settings.layer_budgets == {0: 60, 2: 20}  # 10 kept + 30 x (2 - 1/3, 1/3)
    # a prompt within the budget is kept whole by every layer
    assert budget_cache(model, "pyramidkv", prompt_tokens=40, budget=40, stabilizer=8, sink=2).settings.layer_budgets \
        == {}


# -- budgets and exactness, through the engine ---------------------------------------------------------
@pytest.mark.parametrize("policy", NEW)
def test_budget_never_exceeded_in_prefill_and_decode(model, ids, policy):
    engine = Engine(model, mode=policy, chunk_size=CHUNK)
    cache = budget_cache(model, policy, prompt_tokens=PROMPT, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                         chunk_size=CHUNK)
    layers = [layer for layer in cache.layers if isinstance(layer, BudgetLayer)]
    held = policy == "snapkv-question"  # keeps the whole prompt until its last chunk

    def check(done: int, total: int) -> None:
        for layer in layers:
            assert layer.stored == (min(done, layer.budget) if not held or done == total else done)

    engine.prefill(ids, cache=cache, on_chunk=check)
    for token in range(5):
        engine.decode_step(token, cache)
        assert all(layer.stored == layer.budget for layer in layers)
    assert sum(layer.budget for layer in layers) == BUDGET * len(layers)
    must = set(range(PROMPT + 5 - STABILIZER, PROMPT + 5)) | set(range(SINK))
    for layer in layers:
        for row in layer.positions.reshape(-1, layer.budget).tolist():
            assert row == sorted(set(row)) and must <= set(row)


@pytest.mark.parametrize("policy", NEW)
def test_a_budget_covering_the_prompt_matches_full_and_a_smaller_one_changes_the_logits(model, ids, policy):
    full_logits, _ = Engine(model, mode="full").prefill(ids)
    logits, _ = Engine(model, mode=policy, chunk_size=CHUNK, budget=PROMPT + 8, stabilizer=STABILIZER,
                       sink=SINK).prefill(ids)
    torch.testing.assert_close(logits, full_logits, rtol=1e-4, atol=1e-4)
    small, _ = Engine(model, mode=policy, chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER,
                      sink=SINK).prefill(ids)
    if policy == "snapkv-question":  # the prompt's own logits come from the whole prompt, as in SnapKV
        torch.testing.assert_close(small, full_logits, rtol=1e-4, atol=1e-4)
    else:
        assert (small - full_logits).abs().max() > 1e-3


@pytest.mark.parametrize("policy", ["expected-attention", "snapkv-question"])
def test_policies_that_remember_queries_hand_their_state_back(model, ids, policy):
    """What a kept document rolls back to: the recent queries of every budgeted layer, restored as they were."""
    engine = Engine(model, mode=policy, chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK)
    _, cache = engine.prefill(ids)
    chosen = cache.layers[0].policy
    before = chosen.state()
    # snapkv-question keeps its 64-query window, expected-attention every query past the first 4 (within 1024)
    assert before.shape[:2] == (3, 1) and before.shape[3] == (64 if policy == "snapkv-question" else PROMPT - 4)
    engine.decode_step(5, cache)
    assert not torch.equal(chosen.state(), before)
    chosen.set_state(before)
    assert torch.equal(chosen.state(), before)
    chosen.set_state(None)
    assert chosen.state() is None


def locret_kept(chunks: list[list[float]], budget: int, **options) -> list[int]:
    """The positions a locret layer keeps (one KV head, no stabilizer or sinks) when its heads score the prompt's
    chunks as ``chunks`` says, chunk after chunk."""

    class FixedHeads:
        def __init__(self):
            self.calls = iter(chunks)

        def score(self, layer, query, keys, values):
            return torch.tensor(next(self.calls))[None, None]

    policy = make_policy("locret", **options)
    policy.retaining, policy.rope = FixedHeads(), lambda x, start: x
    layer = BudgetLayer(0, policy, BudgetSettings(budget, stabilizer=0, sink=0), chunk_size=len(chunks[0]))
    for chunk in chunks:
        keys = torch.randn(1, 1, len(chunk), 4)
        layer.update(keys, torch.randn_like(keys))
        layer.attend(torch.randn(1, 2, len(chunk), 4), 1.0, None, Phase.PREFILL)
    return sorted(layer.positions[0, 0].tolist())


def test_locret_pooling_keeps_a_high_scored_tokens_neighbours_with_it():
    """With pool=3 a token scores the best of itself and its two neighbours, so the tokens of a value go together."""
    scores = [[0.0, 5.0, 0.0, 0.0, 0.0, 9.0, 0.0, 1.0]]
    assert locret_kept(scores, 6, pool=3) == [0, 1, 2, 4, 5, 6]  # pooled: 5 5 5 0 9 9 9 1
    assert {1, 5, 7} <= set(locret_kept(scores, 6, pool=1))  # unpooled: the three scored tokens, then any zeros
    with pytest.raises(HeadspaceError, match="odd"):
        make_policy("locret", pool=2)


def test_locret_centering_lets_a_later_chunk_compete_by_its_own_ranking():
    """Centred on each chunk's median, a later chunk scored lower overall keeps its best tokens: the budget goes to
    the best of each chunk by their standing within it, not to the whole chunk that the heads scored higher."""
    scores = [[3.0, 2.0, 2.5, 2.2, 2.1], [-1.0, -3.0, -2.5, -3.0, -2.0]]  # medians 2.2 and -2.5
    assert locret_kept(scores, 4) == [0, 2, 3, 4]  # the first chunk's four best
    assert locret_kept(scores, 4, center=True) == [0, 2, 5, 9]  # 0.8 0.3 | 1.5 0.5 after centring
    assert make_policy("locret", center=1).center is True  # as the command line gives it
    with pytest.raises(HeadspaceError, match="center"):
        make_policy("locret", center="false")
