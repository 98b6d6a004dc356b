"""``compile_layers``: static decode steps run the decoder layers' norms and MLPs through ``torch.compile`` and stay
exact, compile once for every layer, and leave the model as loaded outside those steps."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
import torch._dynamo
from conftest import TinyModels, assert_logits_equal, build_model, kv_heads, random_ids, tiny_config

import headspace.engine.graphs
from headspace import Engine, HeadspaceError

# torch.compile of CPU models writes C++: skipped where no compiler is installed (a bare GPU machine)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for torch.compile on a CPU")]


@pytest.mark.parametrize("layers", [3, 7])
def test_compiled_layers_decode_the_logits_of_full_and_compile_once_for_all_layers(layers, monkeypatch):
    """Gemma 3 (sliding and full layers, four norms per layer): every static step's logits equal full's, across
    static forms begun again (a 5-token tail); the compiled pieces do not grow with the layers (the layer index is
    not a constant to dynamo), and the model runs its loaded layers again outside the static steps."""
    monkeypatch.setattr(headspace.engine.graphs, "TAIL_TOKENS", 5)
    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    model = build_model(tiny_config("gemma3", num_hidden_layers=layers, layer_types=(kinds * layers)[:layers]))
    ids = random_ids(48, seed=0)
    full = Engine(model, mode="full")
    engine = Engine(model, mode="offload", chunk_size=32, gpu_heads=kv_heads(model.config), cuda_graphs=True,
                    compile_layers=True)
    loaded = list(model.model.layers)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda module, args: seen.append(type(module.layers[-1]).__name__))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # counted since the process began otherwise
    try:
        _, full_cache = full.prefill(ids)
        _, cache = engine.prefill(ids)
        token = 5
        for _ in range(8):
            expected = full.decode_step(token, full_cache)
            assert_logits_equal(engine.decode_step(token, cache), expected)
            token = int(expected.argmax())
    finally:
        hook.remove()
    # prefill and full's steps ran the loaded layers, the 8 static steps the compiled ones
    assert seen.count("OptimizedModule") == 8 and len(seen) > 8
    assert list(model.model.layers) == loaded  # swapped back after each step
    # the pieces around the cache: layer 0 (dynamo specializes the integer 0) and every other layer
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 5


def test_compile_layers_is_checked(tiny_models):
    model = tiny_models.model("llama")
    with pytest.raises(HeadspaceError, match="compile_layers must be True, False or 'auto'"):
        Engine(model, mode="offload", compile_layers="yes")
    with pytest.raises(HeadspaceError, match="no decoder layers with a 'self_attn' module"):
        headspace.engine.graphs.CompiledLayers(torch.nn.Linear(2, 2))


def failing_compile(monkeypatch) -> None:
    """Compiling fails as it does on a machine without a compiler for Triton's launcher: a dynamo error."""
    @contextlib.contextmanager
    def active(self):
        raise torch._dynamo.exc.TorchDynamoException("no C compiler found")
        yield

    monkeypatch.setattr(headspace.engine.graphs.CompiledLayers, "active", active)


def test_a_failed_compile_asked_for_is_a_clear_error_and_the_cache_decodes_on(tiny_models, monkeypatch):
    model = tiny_models.model("llama")
    ids = random_ids(40, seed=1)
    full = Engine(model, mode="full")
    expected, full_cache = full.prefill(ids)
    engine = Engine(model, mode="offload", gpu_heads=kv_heads(model.config), cuda_graphs=True, compile_layers=True)
    _, cache = engine.prefill(ids)
    failing_compile(monkeypatch)
    with pytest.raises(HeadspaceError, match="could not be compiled: no C compiler found; pass compile_layers=False"):
        engine.decode_step(5, cache)
    assert cache.get_seq_length() == 40  # nothing stored
    plain = Engine(model, mode="offload", gpu_heads=kv_heads(model.config), cuda_graphs=True, compile_layers=False)
    assert_logits_equal(plain.decode_step(5, cache), full.decode_step(5, full_cache))


def test_compile_layers_auto_compiles_captured_steps_only(tiny_models):
    """On a CPU the static steps (cuda_graphs=True) are not captured, and "auto" leaves them uncompiled."""
    model = tiny_models.model("llama")
    engine = Engine(model, mode="offload", gpu_heads=kv_heads(model.config), cuda_graphs=True)
    assert engine.compile_layers == "auto"
    _, cache = engine.prefill(random_ids(20, seed=2))
    engine.decode_step(5, cache)
    assert engine._graphs.compiled is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="'auto' compiles captured steps, on CUDA")
def test_a_failed_compile_by_default_warns_and_decodes_uncompiled(monkeypatch):
    model = TinyModels().model("llama").to("cuda", torch.bfloat16)
    ids = random_ids(40, seed=1).cuda()
    plain = Engine(model, mode="offload", gpu_heads=kv_heads(model.config), compile_layers=False)
    engine = Engine(model, mode="offload", gpu_heads=kv_heads(model.config))
    caches = [plain.prefill(ids)[1], engine.prefill(ids)[1]]
    failing_compile(monkeypatch)
    with pytest.warns(UserWarning, match="could not be compiled: no C compiler found; decoding without it"):
        got = engine.decode_step(5, caches[1])
    torch.testing.assert_close(got, plain.decode_step(5, caches[0]), atol=0, rtol=0)
    assert engine.compile_layers is False and engine._graphs.compiled is None
