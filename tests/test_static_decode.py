"""The static form of decode (what a CUDA graph replays) is exact on a CPU: same logits and tokens as ``full``.

``cuda_graphs=True`` on a CPU runs the very step a graph would capture on CUDA, without the
capture: positions read from a device tensor, new KV written at a slot computed from it,
the prefix attended unmasked and the tail through a mask, the Python counters advanced
after the step. A small tail makes the static form begin again every few tokens, so the
step over a bucket boundary is checked too. ``test_cuda_graphs.py`` runs the capture.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NEW_TOKENS, assert_informative, assert_logits_equal, kv_heads, max_diff, run_generate

import headspace.engine.graphs
import headspace.kv.layers
import headspace.kv.quant.store
from headspace import Engine, HeadspaceError
from headspace.kv.cache import HeadspaceCache, OffloadOptions, offload_cache
from headspace.kv.layers import HeadspaceLayer
from headspace.kv.split import SplitSearch, predicted_split
from headspace.shape import ModelShape

pytestmark = pytest.mark.usefixtures("one_thread")

# full attention only, sliding windows only, and the two mixed (Qwen2 with window layers, Gemma 3)
ARCHS = ["llama", "mistral", "qwen2-sliding", "gemma3", "phi3-sliding"]


def static_engine(model, **options) -> Engine:
    return Engine(model, mode="offload", chunk_size=32, gpu_heads=kv_heads(model.config), cuda_graphs=True,
                  **options)


@pytest.fixture
def small_tail(monkeypatch):
    """A tail of 5 tokens: the static form begins again every 5 decode steps."""
    monkeypatch.setattr(headspace.engine.graphs, "TAIL_TOKENS", 5)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_decode_gives_the_logits_of_full_at_every_step(tiny_models, small_tail, arch):
    ids, ref = tiny_models.reference(arch)
    model = tiny_models.model(arch)
    assert_informative(ref.logits, ref.tokens)
    full = Engine(model, mode="full")
    engine = static_engine(model)
    expected, full_cache = full.prefill(ids)
    actual, cache = engine.prefill(ids)
    assert engine.graph_decodes(cache)
    for token in ref.tokens[:-1]:  # both fed the reference tokens: every step compares the same context
        assert_logits_equal(engine.decode_step(token, cache), full.decode_step(token, full_cache))
    assert cache.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1
    assert engine._graphs.captures == -(-(NEW_TOKENS - 1) // 5)  # began again after every 5 tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_static_decode_generates_the_tokens_of_full(tiny_models, arch):
    ids, ref = tiny_models.reference(arch)
    engine = static_engine(tiny_models.model(arch))
    run = run_generate(engine, ids)
    assert run.tokens == ref.tokens
    assert engine._graphs.captures == 1  # generate reserves its room: one static form holds every new token


def test_the_static_form_is_really_used(tiny_models, small_tail):
    """Breaking the static attention breaks the output: the check above compares the static path."""
    ids, ref = tiny_models.reference("llama")
    engine = static_engine(tiny_models.model("llama"))
    logits, cache = engine.prefill(ids)
    real = type(cache.layers[0]).attend_static

    def wrong(layer, query, scaling, static):
        return real(layer, query, scaling * 1.5, static)

    type(cache.layers[0]).attend_static = wrong
    try:
        broken = engine.decode_step(ref.tokens[0], cache)
    finally:
        type(cache.layers[0]).attend_static = real
    eager = Engine(tiny_models.model("llama"), mode="offload", chunk_size=32, cuda_graphs=False,
                   gpu_heads=kv_heads(tiny_models.model("llama").config))
    logits, eager_cache = eager.prefill(ids)
    assert max_diff(broken, eager.decode_step(ref.tokens[0], eager_cache)) > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kept_documents_and_changing_prompts_decode_as_eagerly(tiny_models, small_tail, arch):
    """Questions about one document roll the cache back between answers, and generate reuses kept prompts of
    other lengths: the static form begins again wherever the storage or lengths moved, and answers agree."""
    model = tiny_models.model(arch)
    gen = torch.Generator().manual_seed(3)
    document, questions = torch.randint(3, 128, (60,), generator=gen), torch.randint(3, 128, (3, 9), generator=gen)
    answers = {}
    for graphs in (False, True):
        engine = static_engine(model) if graphs else Engine(model, mode="offload", chunk_size=32, cuda_graphs=False,
                                                             gpu_heads=kv_heads(model.config))
        doc = engine.prefill_document(document)
        asked = [engine.ask(doc, q, max_new_tokens=12, stop_on_eos=False).token_ids for q in questions]
        prompts = [document[:50], document, torch.cat([document, questions[0]]), document[:20]]
        generated = [engine.generate(p, max_new_tokens=12, stop_on_eos=False).token_ids for p in prompts]
        answers[graphs] = asked, generated
    assert answers[True] == answers[False]


def test_decode_is_eager_where_the_static_form_cannot_serve(tiny_models):
    model = tiny_models.model("llama")
    ids, _ = tiny_models.reference("llama")
    for engine in (Engine(model, mode="offload", gpu_heads=1, chunk_size=32),  # offloaded heads: auto is off
                   Engine(model, mode="offload", gpu_heads=4, chunk_size=32),  # on a CPU auto is off
                   Engine(model, mode="offload", gpu_heads=4, chunk_size=32, cuda_graphs=False),
                   Engine(model, mode="full", chunk_size=32),
                   Engine(model, mode="snapkv", budget=40, stabilizer=8, chunk_size=32)):
        logits, cache = engine.prefill(ids)
        assert not engine.graph_decodes(cache)
        engine.decode_step(3, cache)
        assert engine._graphs is None


def test_cuda_graphs_settings_are_checked(tiny_models):
    model = tiny_models.model("llama")
    with pytest.raises(HeadspaceError, match="cuda_graphs must be True, False or 'auto'"):
        Engine(model, mode="offload", cuda_graphs="yes")
    with pytest.raises(HeadspaceError, match="cuda_graphs=True needs mode 'offload'"):
        Engine(model, mode="full", cuda_graphs=True)
    engine = Engine(model, mode="offload", gpu_heads=2, cuda_graphs=True)
    with pytest.raises(HeadspaceError, match="cuda_graphs=True needs every KV head on the GPU, but this plan "
                                             "offloads some"):
        engine.new_cache(100)
    with pytest.raises(HeadspaceError, match="pass cuda_graphs='auto'"):  # before the prefill, not after it
        engine.generate(torch.arange(3, 40), max_new_tokens=4)


@pytest.mark.parametrize("kv_dtype", ["int4", "fp8"])
def test_quantized_resident_heads_decode_in_the_static_form_as_eagerly(tiny_models, small_tail, kv_dtype,
                                                                      monkeypatch):
    """Every head resident, stored quantized: the static step attends the rows fixed when it began plus its own
    tail slots, and gives the eager step's logits at every step, across static forms begun again (every 5 tokens)
    and groups quantized between them (decode quantizes every 8 tokens here, 32 for int4's groups); a kept
    document asked several questions rolls back past the static form."""
    monkeypatch.setattr(headspace.kv.quant.store, "DECODE_BATCH", 8)
    model = tiny_models.model("llama")
    ids, ref = tiny_models.reference("llama")
    heads = kv_heads(model.config)
    static = Engine(model, mode="offload", gpu_heads=heads, kv_dtype=kv_dtype, chunk_size=32, cuda_graphs=True)
    eager = Engine(model, mode="offload", gpu_heads=heads, kv_dtype=kv_dtype, chunk_size=32, cuda_graphs=False)
    (_, cache), (_, eager_cache) = static.prefill(ids), eager.prefill(ids)
    assert static.graph_decodes(cache) and not eager.graph_decodes(eager_cache)
    for token in ref.tokens[:-1]:  # the same parts, merged in another order: float32 rounding apart
        assert_logits_equal(static.decode_step(token, cache), eager.decode_step(token, eager_cache), atol=1e-3)
    assert static._graphs.captures >= -(-(NEW_TOKENS - 1) // 5)
    answers = []
    for engine in (static, eager):
        document = engine.prefill_document(ids[0, :70])
        answers.append([engine.ask(document, ids[0, 70:70 + n], max_new_tokens=8, stop_on_eos=False).token_ids
                        for n in (4, 4, 7)])
    assert answers[0] == answers[1]


def test_breaking_the_quantized_static_step_breaks_its_output(tiny_models, monkeypatch):
    """The comparison above runs the quantized static path: scaling its prefix wrong moves the logits."""
    model = tiny_models.model("llama")
    ids, ref = tiny_models.reference("llama")
    outputs = []
    for scale in (1.0, 1.5):
        engine = Engine(model, mode="offload", gpu_heads=kv_heads(model.config), kv_dtype="int4", chunk_size=32,
                        cuda_graphs=True)
        _, cache = engine.prefill(ids)
        real = headspace.kv.layers.StaticTail.prefix_lse
        monkeypatch.setattr(headspace.kv.layers.StaticTail, "prefix_lse",
                            lambda tail, query, scaling, real=real, scale=scale: real(tail, query, scaling * scale))
        outputs.append(engine.decode_step(ref.tokens[0], cache))
        monkeypatch.undo()
    assert max_diff(*outputs) > 1e-2


def test_a_cache_without_a_static_form_is_refused(tiny_models):
    ids, _ = tiny_models.reference("llama")
    engine = Engine(tiny_models.model("llama"), mode="snapkv", budget=40, stabilizer=8, chunk_size=32)
    logits, cache = engine.prefill(ids)
    assert isinstance(cache, HeadspaceCache) and not cache.static_capable
    with pytest.raises(HeadspaceError, match="needs every KV head on the device"):
        cache.begin_static(8)
    with pytest.raises(HeadspaceError, match="has no static form"):
        HeadspaceLayer.begin_static(cache.layers[0], None)


# -- the host/PCIe split ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("most", "host", "pcie", "expected"), [
    (6, 54.0, 54.0, 3),   # the 1.39M run's host: attention as fast as PCIe, half of the offloaded heads
    (6, 22.7, 54.0, 2),   # the 1M run's host: 6 * 22.7 / 76.7 = 1.78
    (8, 13.0, 54.0, 2),   # a slow host: 1.55
    (8, 0.0, 54.0, 0),
    (0, 50.0, 50.0, 0),
    (3, 1e6, 1.0, 3),
])
def test_the_split_search_starts_where_the_measured_rates_balance(most, host, pcie, expected):
    assert predicted_split(most, host, pcie) == expected


def test_offload_cache_starts_its_search_at_the_predicted_split(tiny_models):
    shape = ModelShape.of(tiny_models.model("llama").config)  # 4 KV heads, 2 layers
    options = OffloadOptions(gpu_heads=0, cpu_heads="auto")
    for rates, start in (((30.0, 10.0), 12), ((10.0, 30.0), 4)):  # host share in sixteenths: 3/4 and 1/4
        cache = offload_cache(shape, torch.device("cpu"), torch.float32, options, 1, rates=rates)
        assert isinstance(cache.split, SplitSearch) and cache.split.current == start
        assert {layer.host_share for layer in cache.layers} == {start / 16}
    quantized = OffloadOptions(gpu_heads=0, cpu_heads="auto", kv_dtype="int8")  # host heads, of 4 offloaded
    for rates, start in (((30.0, 10.0), 3), ((10.0, 30.0), 1)):
        cache = offload_cache(shape, torch.device("cpu"), torch.float32, quantized, 1, rates=rates)
        assert cache.split.current == start and {layer.cpu_heads for layer in cache.layers} == {start}


def test_a_plan_that_offloads_nothing_has_no_split_to_search(tiny_models):
    """cpu_heads='auto' with every head resident builds exactly the cache cpu_heads=0 builds: no search, no
    host heads, nothing timed per step (it decoded 30% slower on the H100 with a search that had nothing to do)."""
    shape = ModelShape.of(tiny_models.model("llama").config)
    caches = [offload_cache(shape, torch.device("cpu"), torch.float32, OffloadOptions(gpu_heads=4, cpu_heads=cpu),
                            1, rates=(1.0, 1.0)) for cpu in ("auto", 0)]
    assert all(isinstance(cache, HeadspaceCache) and cache.split is None for cache in caches)
    assert caches[0].describe() == caches[1].describe()
    assert all(layer.cpu_heads == 0 for cache in caches for layer in cache.layers)
