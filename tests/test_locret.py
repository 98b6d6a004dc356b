"""Budgeted caches (Locret and baselines), offload+locret and retaining heads, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from headspace import Engine, HeadspaceError, load_model
from headspace.eviction.budget import BudgetLayer, BudgetOptions, budget_cache
from headspace.eviction.retaining.corpus import random_sequences
from headspace.eviction.retaining.heads import HeadsSpec, RetainingHeads, RopeInverse, resolve_heads
from headspace.eviction.retaining.train import (
    TrainConfig,
    capture,
    retaining_loss,
    train_retaining_heads,
    without_recency,
)
from headspace.kv.layers import WindowLayer

VOCAB = 128
PROMPT = 150
CHUNK = 16
BUDGET = 40
STABILIZER = 8
SINK = 2


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    fields.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def heads(model):
    torch.manual_seed(1)
    return RetainingHeads(HeadsSpec.from_config(model.config, hidden=8))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(2))


def policy_options(policy: str, heads) -> dict:
    return {"heads": heads} if policy == "locret" else {}


def budget_layers(cache) -> list[BudgetLayer]:
    return [layer for layer in cache.layers if isinstance(layer, BudgetLayer)]


POLICIES = ["locret", "streamingllm", "snapkv", "random"]


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_never_exceeded_in_prefill_and_decode(model, heads, ids, policy):
    engine = Engine(model, mode=policy, chunk_size=CHUNK)
    cache = budget_cache(model, policy, prompt_tokens=PROMPT, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                         chunk_size=CHUNK, **policy_options(policy, heads))
    seen = []

    def check(done: int, total: int) -> None:
        for layer in budget_layers(cache):
            seen.append(layer.stored)
            assert layer.stored <= BUDGET
            assert layer.store.capacity <= BUDGET + CHUNK  # never grew past budget + chunk

    engine.prefill(ids, cache=cache, on_chunk=check)
    for token in range(5):
        engine.decode_step(token, cache)
        check(0, 0)
    assert max(seen) == BUDGET
    assert cache.get_seq_length() == PROMPT + 5


@pytest.mark.parametrize("policy", POLICIES)
def test_each_policy_keeps_exactly_the_budget_and_the_stabilizer(model, heads, ids, policy):
    engine = Engine(model, mode=policy, chunk_size=CHUNK)
    cache = budget_cache(model, policy, prompt_tokens=PROMPT, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                         chunk_size=CHUNK, **policy_options(policy, heads))
    engine.prefill(ids, cache=cache)
    for layer in budget_layers(cache):
        positions = layer.positions
        assert positions.shape[-1] == BUDGET and layer.scores.shape == positions.shape
        keys, values = layer.store.view()
        assert keys.shape[2] == values.shape[2] == BUDGET
        must = set(range(PROMPT - STABILIZER, PROMPT)) | set(range(SINK))
        for row in positions.reshape(-1, BUDGET).tolist():
            assert row == sorted(set(row))  # kept in position order, no duplicates
            assert must <= set(row)
        if policy == "streamingllm":
            expected = list(range(SINK)) + list(range(PROMPT - (BUDGET - SINK), PROMPT))
            assert all(row == expected for row in positions.reshape(-1, BUDGET).tolist())


def test_kept_keys_are_the_original_keys(model, ids):
    """Eviction moves rows without altering them: kept keys equal the full cache's keys at those positions."""
    full = Engine(model, mode="full")
    _, reference = full.prefill(ids)
    engine = Engine(model, mode="random", chunk_size=CHUNK)
    cache = budget_cache(model, "random", prompt_tokens=PROMPT, budget=PROMPT, chunk_size=CHUNK)
    engine.prefill(ids[:, :CHUNK * 2], cache=cache)  # nothing evicted yet: identical to full over that prefix
    layer = budget_layers(cache)[0]
    keys, _ = layer.store.view()
    torch.testing.assert_close(keys, reference.layers[0].keys[:, :, : CHUNK * 2], rtol=1e-5, atol=1e-5)
    small = budget_cache(model, "random", prompt_tokens=PROMPT, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                         chunk_size=CHUNK, seed=3)
    engine.prefill(ids, cache=small)
    layer = budget_layers(small)[0]
    keys, _ = layer.store.view()
    positions = layer.positions
    index = positions.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    gathered = reference.layers[0].keys.gather(2, index)
    # the first chunk of each layer's keys does not depend on eviction; later ones do (different past)
    first = positions < CHUNK
    torch.testing.assert_close(keys[first], gathered[first], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_covering_everything_matches_full_and_a_smaller_one_evicts(model, heads, ids, policy):
    full = Engine(model, mode="full", chunk_size=CHUNK).generate(ids, max_new_tokens=6, stop_on_eos=False)
    full_logits, _ = Engine(model, mode="full", chunk_size=CHUNK).prefill(ids)
    engine = Engine(model, mode=policy, chunk_size=CHUNK, budget=PROMPT + 8, stabilizer=STABILIZER, sink=SINK,
                    **policy_options(policy, heads))
    logits, cache = engine.prefill(ids)
    assert all(layer.stored == PROMPT for layer in budget_layers(cache))  # nothing evicted
    torch.testing.assert_close(logits, full_logits, rtol=1e-4, atol=1e-4)
    out = engine.generate(ids, max_new_tokens=6, stop_on_eos=False)
    assert out.token_ids == full.token_ids
    # the same engine with a budget below the prompt evicts, and in a chunked prefill the evictions change the
    # logits; an exact prefill (locret's default) evicts as much and its logits stay full's
    small = Engine(model, mode=policy, chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                   prefill="chunked", **policy_options(policy, heads))
    logits, cache = small.prefill(ids)
    assert all(layer.stored == BUDGET for layer in budget_layers(cache))
    assert (logits - full_logits).abs().max() > 1e-3
    exact = Engine(model, mode=policy, chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                   prefill="exact", **policy_options(policy, heads))
    logits, cache = exact.prefill(ids)
    assert all(layer.stored == BUDGET and layer.host_bytes == 0 for layer in budget_layers(cache))
    torch.testing.assert_close(logits, full_logits, rtol=1e-4, atol=1e-4)


def test_compression_resolves_against_the_prompt(model, ids):
    engine = Engine(model, mode="streamingllm", chunk_size=CHUNK, compression=3, stabilizer=STABILIZER, sink=SINK)
    _, cache = engine.prefill(ids)
    assert cache.settings.budget == 50 == BudgetOptions(compression=3, stabilizer=STABILIZER, sink=SINK).resolve(PROMPT)
    assert all(layer.stored == 50 for layer in budget_layers(cache))
    with pytest.raises(HeadspaceError, match="not both"):
        BudgetOptions(budget=10, compression=2)
    with pytest.raises(HeadspaceError, match="at least 1"):
        BudgetOptions(compression=0.5)
    # the length comes from the prefill that asks for the cache, never from an earlier call
    engine.generate(ids[:, :120], max_new_tokens=2)
    with pytest.raises(HeadspaceError, match="needs the prompt length"):
        engine.new_cache()
    assert engine.new_cache(prompt_tokens=300).settings.budget == 100


def test_budget_smaller_than_stabilizer_is_refused(model, ids, heads):
    with pytest.raises(HeadspaceError, match="stabilizer"):
        budget_cache(model, "locret", prompt_tokens=PROMPT, budget=10, stabilizer=16, sink=0, heads=heads)
    with pytest.raises(HeadspaceError, match="stabilizer"):
        Engine(model, mode="locret", budget=20, stabilizer=16, sink=8, heads=heads)


@pytest.mark.parametrize("mode", ["full", "offload", "hf-offload", "locret", "snapkv", "offload+locret"])
def test_unknown_options_are_refused_when_the_engine_is_made(model, mode):
    with pytest.raises(HeadspaceError, match="budjet"):
        Engine(model, mode=mode, budjet=10)


def test_options_of_another_mode_are_refused(model, heads):
    with pytest.raises(HeadspaceError, match="gpu_heads"):
        Engine(model, mode="locret", gpu_heads=2, heads=heads)
    with pytest.raises(HeadspaceError, match="compression"):
        Engine(model, mode="offload", compression=4)
    with pytest.raises(HeadspaceError, match="decode"):
        Engine(model, mode="locret", decode="exact", heads=heads)
    with pytest.raises(HeadspaceError, match="window"):
        Engine(model, mode="streamingllm", window=4)


def test_a_prompt_shorter_than_the_always_kept_tokens_runs_without_eviction(model, heads, ids):
    full = Engine(model, mode="full").generate(ids[:, :20], max_new_tokens=4, stop_on_eos=False)
    for policy in ("locret", "snapkv"):
        engine = Engine(model, mode=policy, compression=8, **policy_options(policy, heads))
        out = engine.generate(ids[:, :20], max_new_tokens=4, stop_on_eos=False)
        assert out.token_ids == full.token_ids


def test_sliding_window_layers_keep_their_window():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         use_sliding_window=True, sliding_window=24, max_window_layers=1,
                         layer_types=["sliding_attention", "full_attention"])
    model = Qwen3ForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (1, 100))
    engine = Engine(model, mode="streamingllm", chunk_size=CHUNK, budget=200, stabilizer=STABILIZER)
    logits, cache = engine.prefill(ids)
    assert isinstance(cache.layers[0], WindowLayer) and isinstance(cache.layers[1], BudgetLayer)
    assert cache.layers[0].store.length <= 23 + CHUNK  # window - 1 past tokens plus the last chunk
    full_logits, _ = Engine(model, mode="full").prefill(ids)
    torch.testing.assert_close(logits, full_logits, rtol=1e-4, atol=1e-4)


# -- offload+locret ------------------------------------------------------------------------------------
def test_offload_locret_prefill_is_exact_and_keeps_evicted_tokens_on_host(model, heads, ids):
    full_logits, _ = Engine(model, mode="full").prefill(ids)
    engine = Engine(model, mode="offload+locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER,
                    sink=SINK, heads=heads)
    logits, cache = engine.prefill(ids)
    torch.testing.assert_close(logits, full_logits, rtol=1e-4, atol=1e-4)
    for layer in budget_layers(cache):
        assert layer.stored == BUDGET and layer.host.length == PROMPT - BUDGET
        host = torch.cat(layer.host_positions, dim=-1)
        every = torch.cat([host, layer.positions.cpu()], dim=-1).sort(dim=-1).values
        assert torch.equal(every, torch.arange(PROMPT).expand_as(every))  # each token in exactly one tier
    # decode attends the device budget only: identical to locret's decode from the same (exact) prefill
    before = [layer.host.length for layer in budget_layers(cache)]
    engine.decode_step(5, cache)
    assert all(layer.stored == BUDGET for layer in budget_layers(cache))
    assert [layer.host.length for layer in budget_layers(cache)] == [n + 1 for n in before]


def test_offload_locret_decode_budget_attends_device_tokens_only(model, heads, ids):
    engine = Engine(model, mode="offload+locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER,
                    sink=SINK, heads=heads)
    _, cache = engine.prefill(ids)
    layer = budget_layers(cache)[0]
    seen = {}
    original = layer.attend_with_host

    def spy(*args, **kwargs):
        seen["host"] = True
        return original(*args, **kwargs)

    layer.attend_with_host = spy
    engine.decode_step(7, cache)
    assert "host" not in seen
    exact = Engine(model, mode="offload+locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER,
                   sink=SINK, heads=heads, decode="exact")
    _, cache = exact.prefill(ids)
    layer = budget_layers(cache)[0]
    original = layer.attend_with_host
    layer.attend_with_host = spy
    exact.decode_step(7, cache)
    assert seen.get("host")


def test_offload_locret_with_exact_decode_matches_full(model, heads, ids):
    full = Engine(model, mode="full").generate(ids, max_new_tokens=8, stop_on_eos=False)
    out = Engine(model, mode="offload+locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                 heads=heads, decode="exact").generate(ids, max_new_tokens=8, stop_on_eos=False)
    assert out.token_ids == full.token_ids
    assert out.stats.host_kv_bytes > 0


# -- retaining heads -----------------------------------------------------------------------------------
def test_rope_inverse_recovers_pre_rope_keys(model):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(1, 2, 10, 16)
    cos, sin = model.model.rotary_emb(x, torch.arange(37, 47)[None])
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(RopeInverse(model)(rotated, 37), x, rtol=1e-5, atol=1e-5)


def assert_targets_are(model, ids: torch.Tensor, targets: torch.Tensor, tokens: int, received) -> None:
    """``targets[layer, t, head]`` of the first ``tokens`` tokens is log(1e-4 + the largest of ``received(group, t)``,
    the probabilities that the wanted queries of KV head ``head``'s group give token t (0 if none), written out from
    transformers' own eager attention probabilities."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions  # per layer (1, Hq, L, L)
    length = ids.shape[1]
    for layer, p in enumerate(probs):
        grouped = p[0].reshape(2, 2, length, length)  # (KV head, query head of its group, query, key)
        for head in range(2):
            for t in range(tokens):
                given = received(grouped[head], t)
                best = given.max().item() if given.numel() else 0.0
                expected = torch.log(torch.tensor(best + 1e-4))
                torch.testing.assert_close(targets[layer, t, head], expected, rtol=1e-4, atol=1e-4)


def test_capture_targets_are_max_later_attention(model):
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(5))
    gap = 3
    features, targets = capture(model, ids, smooth=1, tail=0, gap=gap)
    assert features.shape == (2, 48, (4 + 2 * 2) * 16) and targets.shape == (2, 48, 2)
    assert_targets_are(model, ids, targets, 48, lambda group, t: group[:, t + gap :, t])
    assert targets.std() > 0.5  # the maxima vary from token to token


def test_relative_targets_weigh_each_query_by_the_keys_it_sees(model):
    """``targets="relative"``: query i's probabilities times its i + 1 keys, so that attention diluted over a long
    prefix counts as much as the same share of a short one."""
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(6))
    gap = 2
    _, plain = capture(model, ids, smooth=1, tail=0, gap=gap)
    _, relative = capture(model, ids, smooth=1, tail=0, gap=gap, scale="relative")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions
    for layer, p in enumerate(probs):
        grouped = p[0].reshape(2, 2, 40, 40)
        for head in range(2):
            for t in range(40 - gap):
                later = grouped[head, :, t + gap :, t] * torch.arange(t + gap + 1, 41)
                expected = torch.log(later.max() + 1e-4)
                torch.testing.assert_close(relative[layer, t, head], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, relative)
    with pytest.raises(HeadspaceError, match="targets"):
        TrainConfig(targets="uniform")


def test_question_targets_come_from_the_questions_queries_alone(model):
    """``target_queries="questions"`` (Locret's): a document token's target is the most any query of the questions
    that end the sequence gives it (still ``gap`` on); the questions' own tokens are not trained."""
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(7))
    asks = 30
    _, later = capture(model, ids, smooth=1, tail=0, gap=2)
    features, questions = capture(model, ids, smooth=1, tail=0, gap=2, queries_from=asks)
    assert features.shape[1] == questions.shape[1] == asks
    assert_targets_are(model, ids, questions, asks, lambda group, t: group[:, max(asks, t + 2) :, t])
    assert (questions < later[:, :asks]).any()  # the document's own queries gave some tokens more
    with pytest.raises(HeadspaceError, match="add up to 1"):
        TrainConfig(target_queries="questions", synthetic=0.5, prose=0.0)
    with pytest.raises(HeadspaceError, match="end in questions"):
        train_retaining_heads(model, random_sequences(VOCAB, 40),
                              TrainConfig(steps=1, seq_len=40, target_queries="questions", synthetic=1.0))


def test_detrended_targets_lose_their_line_in_log_distance_to_the_questions(model):
    """``detrend``: each head's question targets less their least-squares line in log(distance to the questions):
    a made-up trend plus noise comes back as the noise's own residual with the mean kept, and :func:`capture`
    applies exactly that to each layer and head."""
    asks = 36
    x = torch.log(asks - torch.arange(asks, dtype=torch.float64))
    noise = torch.randn(2, 3, asks, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    slope = torch.tensor([[-0.8], [0.0], [1.5]], dtype=torch.float64)
    flat = without_recency(-5 + slope * x + noise, asks)
    centred = x - x.mean()
    fitted = (noise * centred).sum(-1, keepdim=True) / centred.square().sum()  # the noise's own line
    torch.testing.assert_close(flat, -5 + slope * x.mean() + noise - fitted * centred)  # each row's mean kept
    torch.testing.assert_close((flat * centred).sum(-1), torch.zeros(2, 3, dtype=torch.float64), atol=1e-9, rtol=0)

    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(8))
    _, plain = capture(model, ids, smooth=1, tail=0, gap=2, queries_from=asks)
    _, detrended = capture(model, ids, smooth=1, tail=0, gap=2, queries_from=asks, detrend=True)
    torch.testing.assert_close(detrended, without_recency(plain.transpose(1, 2), asks).transpose(1, 2))
    assert not torch.allclose(detrended, plain)
    with pytest.raises(HeadspaceError, match="questions"):
        TrainConfig(detrend=True, target_queries="later", synthetic=0.5, prose=0.0)
    with pytest.raises(HeadspaceError, match="queries_from"):
        capture(model, ids, detrend=True)


def test_training_reduces_the_loss(model):
    config = TrainConfig(steps=25, seq_len=64, lr=3e-3, hidden=16, batch_tokens=128, buffer_tokens=512,
                         tail=8, gap=4, updates=4, target_queries="later")  # random tokens ask no questions
    held_out = next(random_sequences(VOCAB, 64, seed=99))
    x, y = capture(model, held_out.reshape(1, -1), config.smooth, config.tail, config.gap)
    start, _ = train_retaining_heads(model, random_sequences(VOCAB, 64), TrainConfig(**{**vars(config), "steps": 1}))
    trained, losses = train_retaining_heads(model, random_sequences(VOCAB, 64), config)
    with torch.no_grad():
        before, after = float(retaining_loss(start, x, y)), float(retaining_loss(trained, x, y))
    assert len(losses) == 25 and after < 0.7 * before


def test_saved_heads_load_back_to_identical_scores(tmp_path, model, heads):
    path = heads.save(tmp_path / "heads.safetensors", recipe={"steps": 1})
    loaded = RetainingHeads.load(path, model.config)
    assert loaded.spec == heads.spec and loaded.recipe == {"steps": 1}
    q, k, v = torch.randn(1, 4, 12, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    assert torch.equal(loaded.score(1, q, k, v), heads.score(1, q, k, v))


def test_heads_for_another_model_are_refused(tmp_path, model, heads, ids):
    path = heads.save(tmp_path / "heads.safetensors")
    other = tiny_llama(num_key_value_heads=4)
    with pytest.raises(HeadspaceError, match="another model"):
        RetainingHeads.load(path, other.config)
    with pytest.raises(HeadspaceError, match="another model"):
        Engine(other, mode="locret", heads=str(path), budget=100).prefill(ids)
    with pytest.raises(HeadspaceError, match="another model"):
        resolve_heads(heads, tiny_llama(num_hidden_layers=3).config, torch.device("cpu"))
    with pytest.raises(HeadspaceError, match="no retaining heads ship"):
        Engine(model, mode="locret", budget=100).prefill(ids)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(HeadspaceError):
        RetainingHeads.load(tmp_path / "junk.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host tier, copy streams)")
def test_offload_locret_on_cuda_streams_the_host_tier_exactly(heads, ids):
    model = tiny_llama().to("cuda")
    ids = ids.to("cuda")
    full_logits, _ = Engine(model, mode="full").prefill(ids)
    full = Engine(model, mode="full").generate(ids, max_new_tokens=8, stop_on_eos=False)
    for group in (1, 2):
        engine = Engine(model, mode="offload+locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER,
                        sink=SINK, heads=heads, decode="exact", group_heads=group)
        logits, cache = engine.prefill(ids)
        torch.testing.assert_close(logits, full_logits, rtol=1e-4, atol=1e-4)
        assert all(layer.stored == BUDGET for layer in budget_layers(cache))
        assert engine.generate(ids, max_new_tokens=8, stop_on_eos=False).token_ids == full.token_ids
    locret = Engine(model, mode="locret", chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK,
                    heads=heads).generate(ids, max_new_tokens=8, stop_on_eos=False)
    assert len(locret.token_ids) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host tier, copy streams)")
def test_offload_locret_prefill_is_exact_on_cuda_when_kernels_queue_up():
    """A model large enough that the GPU runs behind Python (random Llama 3.2 1B, 4K tokens): a staging buffer
    allocated from memory that queued kernels still read must not be written by the copy stream before they ran
    (it was: the prefill's logits were 4 to 5 off those of ``full``)."""
    model, _ = load_model("random:llama-3.2-1b", device="cuda", dtype=torch.float32)
    torch.manual_seed(1)
    wide_heads = RetainingHeads(HeadsSpec.from_config(model.config, hidden=8)).to("cuda")
    generator = torch.Generator().manual_seed(2)
    ids, question = torch.randint(0, 1000, (1, 4096), generator=generator), torch.randint(0, 1000, (1, 40))
    full = Engine(model, mode="full", chunk_size=1024, keep_bytes=0)
    full_logits, _ = full.prefill(ids)
    full.ask(full.prefill_document(ids), question, max_new_tokens=1)  # memory freed to the allocator, as in use
    for options in (dict(), dict(release=True, merge=64)):
        engine = Engine(model, mode="offload+locret", chunk_size=1024, compression=8, heads=wide_heads, **options)
        logits, _ = engine.prefill(ids)
        torch.testing.assert_close(logits, full_logits, rtol=1e-3, atol=1e-3)
