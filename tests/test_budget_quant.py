"""The budget of the eviction modes kept on the device in fp8 or int8 (``kv_dtype``), on tiny models in float32.

What the budgeted layer must do with a quantized device tier: keep the budget per KV head
(eviction gathers whole rows), attend and score the newest chunk as computed and the older
tokens dequantized (with no eviction it computes exactly what ``offload`` with the same
precision computes), shrink the stored bytes as :meth:`Scheme.bytes_per_token` says, answer
alike after a save and a load, and refuse the grouped schemes (int4, int2) on the device.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, kv_heads, max_diff, random_ids
from test_cli import refused, run, tiny_model  # noqa: F401  (tiny_model: a fixture)

import headspace.kv.quant.store
from headspace import Engine, HeadspaceError
from headspace.eviction import budget
from headspace.eviction.budget import BudgetLayer
from headspace.eviction.retaining.heads import HeadsSpec, RetainingHeads
from headspace.kv.cache import kv_bytes
from headspace.kv.quant.schemes import SCHEMES
from headspace.kv.quant.store import QuantizedKV
from headspace.placement import budget_bytes

CHUNK = 16
BUDGET = 48
STABILIZER = 16
SINK = 4
OPTIONS = dict(chunk_size=CHUNK, budget=BUDGET, stabilizer=STABILIZER, sink=SINK)
# the largest |quantized - exact| of the last prompt logits (about 4 in size) of a budgeted run, where the policy's
# choice does not depend on the values (streamingllm, random): measured over 4 prompts on 7 tiny models, the worst
# was 0.66 (fp8) and 0.14 (int8); the tiny models' peaked attention magnifies an error in a key
TOLERANCE = {"fp8": 1.0, "int8": 0.2}


def budget_layers(cache) -> list[BudgetLayer]:
    layers = [layer for layer in cache.layers if isinstance(layer, BudgetLayer)]
    assert layers
    return layers


def retaining_heads(model) -> RetainingHeads:
    torch.manual_seed(1)
    return RetainingHeads(HeadsSpec.from_config(model.config, hidden=8))


def check_budget(cache, kv_dtype: str) -> None:
    """Every budgeted layer stores rows of the scheme's width, and at most its budget of distinct tokens per KV head
    (exactly the budget once the prompt outgrew it), the newest ``STABILIZER`` and the first ``SINK`` among them."""
    width = SCHEMES[kv_dtype].width
    for layer in budget_layers(cache):
        rows, _ = layer.store.view()
        assert rows.dtype == torch.uint8 and rows.shape[-1] == width(layer.head_dim)
        assert rows.shape[2] == layer.positions.shape[2] == layer.budget
        for head in layer.positions.reshape(-1, layer.budget):
            kept = set(head.tolist())
            assert len(kept) == layer.budget
            assert kept >= set(range(layer.length - STABILIZER, layer.length)) | set(range(SINK))


# -- the budget ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", ["fp8", "int8"])
@pytest.mark.parametrize("mode", ["locret", "snapkv", "h2o", "tova", "pyramidkv", "expected-attention", "knorm"])
def test_a_quantized_budget_is_kept_per_head_in_prefill_and_decode(tiny_models, one_thread, mode, kv_dtype):
    model = tiny_models.model("llama")
    extra = {"heads": retaining_heads(model)} if mode == "locret" else {}
    engine = Engine(model, mode=mode, kv_dtype=kv_dtype, **OPTIONS, **extra)
    logits, cache = engine.prefill(random_ids(160, seed=3))
    check_budget(cache, kv_dtype)
    token = logits.argmax(-1, keepdim=True)
    for _ in range(5):
        token = engine.decode_step(token, cache).argmax(-1, keepdim=True)
        check_budget(cache, kv_dtype)
    assert all(layer.chunk is None for layer in budget_layers(cache))  # nothing held past its attention


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding", "gemma3", "qwen3"])
@pytest.mark.parametrize("kv_dtype", ["fp8", "int8"])
def test_with_nothing_evicted_it_computes_what_quantized_offload_computes(tiny_models, one_thread, arch, kv_dtype,
                                                                          monkeypatch):
    """Both attend each chunk as computed and the tokens before it dequantized: with a budget above the context the
    budgeted layer evicts nothing and must equal ``offload`` with every head resident at the same precision (whose
    decode, told to quantize every step, stores each token as the budget does)."""
    monkeypatch.setattr(headspace.kv.quant.store, "DECODE_BATCH", 1)
    model, ids = tiny_models.model(arch), random_ids(120, seed=4)
    budgeted = Engine(model, mode="snapkv", kv_dtype=kv_dtype, **{**OPTIONS, "budget": 256})
    offload = Engine(model, mode="offload", chunk_size=CHUNK, gpu_heads=kv_heads(model.config), kv_dtype=kv_dtype)
    (expected, _), (logits, cache) = offload.prefill(ids), budgeted.prefill(ids)
    assert max_diff(logits, expected) <= ATOL
    assert all(layer.store.dtype == torch.uint8 for layer in budget_layers(cache))
    exact, _ = Engine(model, mode="snapkv", **{**OPTIONS, "budget": 256}).prefill(ids)
    assert max_diff(logits, exact) > ATOL  # and it did quantize
    generated = [engine.generate(ids, max_new_tokens=12, stop_on_eos=False).token_ids for engine in (budgeted, offload)]
    assert generated[0] == generated[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding", "gemma3", "qwen3"])
@pytest.mark.parametrize("mode", ["streamingllm", "random"])
@pytest.mark.parametrize("kv_dtype", ["fp8", "int8"])
def test_logits_stay_close_to_the_exact_budgeted_run(tiny_models, one_thread, arch, mode, kv_dtype):
    """Policies whose choice does not depend on the values keep the same tokens at any precision, so the logits
    differ by the quantization alone."""
    model, ids = tiny_models.model(arch), random_ids(200, seed=0)
    (expected, exact), (logits, quantized) = (Engine(model, mode=mode, kv_dtype=dtype, **OPTIONS).prefill(ids)
                                              for dtype in ("bf16", kv_dtype))
    assert 1e-4 < max_diff(logits, expected) <= TOLERANCE[kv_dtype]
    for a, b in zip(budget_layers(exact), budget_layers(quantized)):
        assert torch.equal(a.positions, b.positions)


def test_the_policy_scores_what_attention_saw(tiny_models, one_thread, monkeypatch):
    """The keys and values scored are those attended: the chunk as computed, the tokens before it dequantized."""
    attended, scored = [], []
    attention = budget.causal_attention
    monkeypatch.setattr(budget, "causal_attention", lambda q, k, v, *args: attended.append((k, v)) or
                        attention(q, k, v, *args))
    model = tiny_models.model("llama")
    engine = Engine(model, mode="snapkv", kv_dtype="fp8", **OPTIONS)
    cache = engine.new_cache(80, prompt_tokens=80)
    policy = budget_layers(cache)[0].policy  # one for every layer of the cache
    score = policy.score
    policy.score = lambda inputs: scored.append((inputs.keys, inputs.values)) or score(inputs)
    engine.prefill(random_ids(80, seed=5), cache=cache)
    assert len(scored) == len(attended) == 5 * len(budget_layers(cache))
    for (keys, values), (scored_keys, scored_values) in zip(attended, scored):
        assert scored_keys is keys and scored_values is values and keys.dtype == torch.float32


# -- bytes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8", "int8"])
def test_stored_bytes_and_the_footprint_follow_the_scheme(tiny_models, one_thread, kv_dtype):
    """Each stored token of each head takes ``bytes_per_token`` (float32 for exact); the footprint the engine makes
    room for is the most the prefill stored, plus, when quantized, the one layer's working copy attention reads."""
    model = tiny_models.model("llama")
    engine = Engine(model, mode="h2o", kv_dtype=kv_dtype, keep_bytes=0, **OPTIONS)
    cache = engine.new_cache(160, prompt_tokens=160)
    peak = []
    engine.prefill(random_ids(160, seed=6), cache=cache, on_chunk=lambda done, total: peak.append(kv_bytes(cache)[0]))
    scheme, layers = SCHEMES[kv_dtype], budget_layers(cache)
    per_token = scheme.bytes_per_token(layers[0].head_dim, 4)
    assert per_token == {"bf16": 64, "fp8": 20, "int8": 20}[kv_dtype]  # 8 dims, keys and values, scales included
    for layer in layers:
        assert layer.store.nbytes == layer.store.capacity * layer.heads * per_token
    device, host = engine.mode.footprint(engine._request(160, 160))
    working = 0 if scheme.exact else layers[0].heads * (BUDGET + CHUNK) * 64
    assert (device, host) == (max(peak) + working, 0)
    assert device == budget_bytes(engine.shape, BUDGET + CHUNK, torch.float32, CHUNK, engine.options[0].precision)


# -- documents -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "kv_dtype"), [("snapkv", "fp8"), ("random", "int8"),
                                                ("offload+locret", "gpu=fp8,host=int4")])
def test_a_quantized_budget_saves_and_loads_to_the_same_answers(tiny_models, one_thread, tmp_path, mode, kv_dtype):
    model = tiny_models.model("llama")
    extra = {"heads": retaining_heads(model)} if "locret" in mode else {}
    ids, question = random_ids(180, seed=8), random_ids(20, seed=9)
    engine = Engine(model, mode=mode, kv_dtype=kv_dtype, **OPTIONS, **extra)
    document = engine.prefill_document(ids)
    answers = [engine.ask(document, question, max_new_tokens=16).token_ids for _ in range(2)]
    engine.save(document, tmp_path / "quantized.hsc")
    loaded = Engine(model, mode=mode, kv_dtype=kv_dtype, **OPTIONS, **extra).load(tmp_path / "quantized.hsc")
    assert torch.equal(loaded.logits, document.logits)
    assert answers[0] == answers[1] == engine.ask(loaded, question, max_new_tokens=16).token_ids
    check_budget(loaded.cache, kv_dtype.split(",")[0].removeprefix("gpu="))
    exact = Engine(model, mode=mode, **OPTIONS, **extra)
    exact.save(exact.prefill_document(ids), tmp_path / "exact.hsc")
    assert (tmp_path / "quantized.hsc").stat().st_size < (tmp_path / "exact.hsc").stat().st_size
    with pytest.raises(HeadspaceError, match=f"saved with kv_dtype={kv_dtype} and this engine has kv_dtype=bf16"):
        exact.load(tmp_path / "quantized.hsc")


def test_offload_locret_with_a_quantized_budget_still_attends_everything_in_prefill(tiny_models, one_thread):
    """The host tier takes the evicted tokens as attention saw them; the prefill attends them all, so it stays
    within fp8's error of ``full``."""
    model = tiny_models.model("llama")
    ids = random_ids(180, seed=8)
    expected, _ = Engine(model, mode="full").prefill(ids)
    engine = Engine(model, mode="offload+locret", kv_dtype="gpu=fp8,host=int4", heads=retaining_heads(model), **OPTIONS)
    logits, cache = engine.prefill(ids)
    assert 1e-4 < max_diff(logits, expected) <= 2.0  # int4's tolerance against full in tests/test_kv_quant.py
    for layer in budget_layers(cache):
        assert isinstance(layer.host, QuantizedKV) and layer.host.length == 180 - BUDGET
    check_budget(cache, "fp8")


# -- refusals --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", ["int4", "int2", "gpu=int4,host=int4"])
@pytest.mark.parametrize("mode", ["snapkv", "streamingllm", "offload+locret"])
def test_grouped_schemes_are_refused_for_the_budget_on_the_device(tiny_models, mode, kv_dtype):
    model = tiny_models.model("llama")
    extra = {"heads": retaining_heads(model)} if "locret" in mode else {}
    with pytest.raises(HeadspaceError, match=r"exact \(bf16\) or one scale per token \(fp8, int8\)") as error:
        Engine(model, mode=mode, kv_dtype=kv_dtype, **extra)
    assert "host tier of offload+locret (kv_dtype=host=" in str(error.value)


def test_a_host_precision_is_refused_where_nothing_goes_to_the_host(tiny_models):
    with pytest.raises(HeadspaceError, match="keeps no host tier"):
        Engine(tiny_models.model("llama"), mode="snapkv", kv_dtype="gpu=fp8,host=int4")
    assert Engine(tiny_models.model("llama"), mode="snapkv", kv_dtype="gpu=fp8").options[0].kv_dtype == "gpu=fp8"


@pytest.mark.usefixtures("cpu_default_device")
def test_the_command_line_takes_fp8_and_refuses_int4_for_a_budget(capsys, tiny_model):  # noqa: F811
    line = refused(capsys, "generate", "--model", tiny_model, "--prompt", "hi", "--mode", "snapkv",
                   "--kv-dtype", "int4")
    assert "int4" in line and "fp8, int8" in line and "kv_dtype=host=int4" in line
    code, _, err = run(capsys, "generate", "--model", tiny_model, "--prompt", "hello there", "--mode", "snapkv",
                       "--kv-dtype", "fp8", "--budget", "8", "--stabilizer", "4", "--sink", "2",
                       "--max-new-tokens", "4")
    assert code == 0, err
