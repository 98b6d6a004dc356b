"""``compile_layers``: static decode steps run the decoder layers' norms and MLPs through ``torch.compile`` and stay
exact, compile once for every layer, and leave the model as loaded outside those steps."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from conftest import assert_logits_equal, build_model, kv_heads, random_ids, tiny_config

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
    with pytest.raises(HeadspaceError, match="compile_layers must be True or False"):
        Engine(model, mode="offload", compile_layers="yes")
    with pytest.raises(HeadspaceError, match="no decoder layers with a 'self_attn' module"):
        headspace.engine.graphs.CompiledLayers(torch.nn.Linear(2, 2))
