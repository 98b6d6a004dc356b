"""CUDA graphs over the decode step (``cuda_graphs``): the captured step decodes what eager decode does.

Runs only where CUDA is (the lead's GPU machine): tiny float32 models moved to the GPU, and
one bf16 model. ``test_static_decode.py`` checks the same static step without capture on any
machine.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NEW_TOKENS, TinyModels, assert_logits_equal, kv_heads, max_diff

import headspace.engine.graphs
from headspace import Engine, HeadspaceError
from headspace.kv.cache import HeadspaceCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")

ARCHS = ["llama", "mistral", "qwen2-sliding", "gemma3"]


@pytest.fixture(scope="module")
def cuda_models():
    models = TinyModels()
    return lambda arch: models.model(arch).to("cuda")


def engines(model, **options) -> tuple[Engine, Engine]:
    """(eager, graph) engines keeping every KV head on the GPU."""
    made = [Engine(model, mode="offload", chunk_size=32, gpu_heads=kv_heads(model.config), cuda_graphs=graphs,
                   **options) for graphs in (False, True)]
    return made[0], made[1]


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed)).to("cuda")


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_decode_generates_what_eager_decode_does(cuda_models, arch):
    model = cuda_models(arch)
    eager, graph = engines(model, keep_bytes=0)
    ids = prompt(80, 0)
    expected = eager.generate(ids, max_new_tokens=NEW_TOKENS, stop_on_eos=False)
    actual = graph.generate(ids, max_new_tokens=NEW_TOKENS, stop_on_eos=False)
    assert actual.token_ids == expected.token_ids
    assert actual.stats.cuda_graph and not expected.stats.cuda_graph
    assert graph._graphs.captures == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_the_graph_is_replayed_and_recaptured_across_a_tail_boundary(cuda_models, monkeypatch, arch):
    """With a 5-token tail the step is captured again every 5 tokens; in between, no Python runs in the model
    (the cache's update is not called), and every step's logits equal eager decode's."""
    monkeypatch.setattr(headspace.engine.graphs, "TAIL_TOKENS", 5)
    model = cuda_models(arch)
    eager, graph = engines(model)
    ids = prompt(80, 1)
    logits, eager_cache = eager.prefill(ids)
    _, cache = graph.prefill(ids)
    updates = []
    real_update = HeadspaceCache.update

    def counting(self, *args, **kwargs):
        updates.append(1)
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(HeadspaceCache, "update", counting)
    token, steps = int(logits.argmax()), NEW_TOKENS - 1
    for step in range(steps):
        before = len(updates)
        expected = eager.decode_step(token, eager_cache)
        eager_updates = len(updates) - before
        before = len(updates)
        actual = graph.decode_step(token, cache)
        if step % 5:  # replayed: the model's Python did not run
            assert len(updates) == before
        else:  # begun again: one warm-up run and one captured run
            assert len(updates) - before == 2 * eager_updates
        assert_logits_equal(actual, expected)
        token = int(expected.argmax())
    assert graph._graphs.captures == -(-steps // 5)


def test_prompts_of_changing_length_reuse_and_recapture(cuda_models):
    """generate keeps prompts and reuses them for longer and shorter ones, and documents roll back after each
    question: the graph's storage or lengths move under it, and it is captured again where they did."""
    model = cuda_models("gemma3")
    answers = {}
    for index, engine in enumerate(engines(model)):
        document = prompt(60, 2)
        asked = []
        doc = engine.prefill_document(document)
        for seed in (3, 4):
            asked.append(engine.ask(doc, prompt(9, seed), max_new_tokens=12, stop_on_eos=False).token_ids)
        prompts = [document[:, :50], document, torch.cat([document, prompt(7, 5)], dim=1), document[:, :20]]
        generated = [engine.generate(p, max_new_tokens=12, stop_on_eos=False).token_ids for p in prompts]
        answers[index] = asked, generated
    assert answers[0] == answers[1]


def test_auto_uses_graphs_only_where_every_head_is_resident(cuda_models):
    model = cuda_models("llama")
    ids = prompt(40, 6)
    resident = Engine(model, mode="offload", chunk_size=32, gpu_heads=kv_heads(model.config))
    offloaded = Engine(model, mode="offload", chunk_size=32, gpu_heads=1)
    assert resident.graph_decodes(resident.prefill(ids)[1])
    assert not offloaded.graph_decodes(offloaded.prefill(ids)[1])


def test_bf16_graph_decode_is_no_further_from_float32_than_eager_decode(cuda_models):
    """In bf16 no two kernels agree bit for bit; the graph's prefix + tail merge must be as near to float32 as
    eager decode's single flash call."""
    model32 = cuda_models("llama")
    ids = prompt(200, 7)
    reference = Engine(model32, mode="full", chunk_size=64)
    ref_logits, ref_cache = reference.prefill(ids)
    tokens = [int(ref_logits.argmax())]
    bf16 = TinyModels().model("llama").to("cuda", torch.bfloat16)
    eager, graph = engines(bf16)
    caches = [eager.prefill(ids)[1], graph.prefill(ids)[1]]
    worst = [0.0, 0.0]
    for _ in range(24):
        expected = reference.decode_step(tokens[-1], ref_cache)
        for i, engine in enumerate((eager, graph)):
            worst[i] = max(worst[i], max_diff(engine.decode_step(tokens[-1], caches[i]), expected))
        tokens.append(int(expected.argmax()))
    assert worst[1] <= 2 * worst[0] + 1e-3, worst


def test_a_step_that_cannot_be_captured_decodes_eagerly_with_auto_and_is_refused_with_true(cuda_models):
    """A forward that reads a value back to the host (as some rotary embeddings do) cannot be captured: 'auto'
    warns and decodes eagerly, with the same tokens; True says what to pass."""
    model = TinyModels().model("qwen2-sliding").to("cuda")
    def read_back(module, args, out) -> None:  # returns None: the output stays as it was
        out.sum().item()

    hook = model.model.embed_tokens.register_forward_hook(read_back)
    ids = prompt(40, 8)
    try:
        expected = Engine(model, mode="offload", chunk_size=32, gpu_heads=kv_heads(model.config), cuda_graphs=False,
                          keep_bytes=0).generate(ids, max_new_tokens=8, stop_on_eos=False).token_ids
        auto = Engine(model, mode="offload", chunk_size=32, gpu_heads=kv_heads(model.config), keep_bytes=0)
        with pytest.warns(UserWarning, match="could not be captured"):
            result = auto.generate(ids, max_new_tokens=8, stop_on_eos=False)
        assert result.token_ids == expected and not result.stats.cuda_graph
        insist = Engine(model, mode="offload", chunk_size=32, gpu_heads=kv_heads(model.config), cuda_graphs=True)
        with pytest.raises(HeadspaceError, match="(?s)could not be captured.*cuda_graphs=False"):
            insist.generate(ids, max_new_tokens=8, stop_on_eos=False)
    finally:
        hook.remove()
