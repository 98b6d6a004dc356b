"""``compile_layers``: static decode steps run the decoder layers' norms and MLPs through ``torch.compile`` and stay
exact, compile once for every layer, and leave the model as loaded outside those steps."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from conftest import assert_logits_equal, kv_heads

import headspace.engine.graphs
from headspace import Engine, HeadspaceError

# torch.compile of CPU models writes C++: skipped where no compiler is installed (a bare GPU machine)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for torch.compile on a CPU")]


def test_compiled_layers_decode_the_logits_of_full_and_compile_once_for_all_layers(tiny_models, monkeypatch):
    """Gemma 3 (four norms and an MLP per layer, sliding and full layers): every static step's logits equal
    full's, across static forms begun again (a 5-token tail); one graph per kind of submodule, not per layer."""
    monkeypatch.setattr(headspace.engine.graphs, "TAIL_TOKENS", 5)
    ids, ref = tiny_models.reference("gemma3")
    model = tiny_models.model("gemma3")
    full = Engine(model, mode="full")
    engine = Engine(model, mode="offload", chunk_size=32, gpu_heads=kv_heads(model.config), cuda_graphs=True,
                    compile_layers=True)
    layer = model.model.layers[0]
    loaded = layer.mlp, layer.input_layernorm
    seen = []
    hook = layer.register_forward_pre_hook(lambda module, args: seen.append(type(module.mlp).__name__))
    torch._dynamo.reset()
    try:
        _, full_cache = full.prefill(ids)
        _, cache = engine.prefill(ids)
        for token in ref.tokens[:8]:
            assert_logits_equal(engine.decode_step(token, cache), full.decode_step(token, full_cache))
    finally:
        hook.remove()
    # prefill and full's steps ran the loaded MLP, the 8 static steps the compiled one
    assert seen.count("OptimizedModule") == 8 and len(seen) > 8
    assert (layer.mlp, layer.input_layernorm) == loaded  # swapped back after each step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the norm and the MLP, for all layers


def test_compile_layers_is_checked(tiny_models):
    model = tiny_models.model("llama")
    with pytest.raises(HeadspaceError, match="compile_layers must be True or False"):
        Engine(model, mode="offload", compile_layers="yes")
    with pytest.raises(HeadspaceError, match="no decoder layers with a 'self_attn' module"):
        headspace.engine.graphs.CompiledLayers(torch.nn.Linear(2, 2))
