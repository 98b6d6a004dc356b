"""Every placement is exact: plans that keep different numbers of heads resident in different layers,
with offloaded heads attended on the host in decode, give the same logits and tokens as ``full``;
so does the automatic plan, with the device size injected through ``gpu_memory`` on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    NEW_TOKENS,
    PROMPT_TOKENS,
    assert_informative,
    assert_logits_equal,
    build_model,
    random_ids,
    run_generate,
    tiny_config,
)

from headspace import Engine, HeadspaceCache
from headspace.kv.layers import OffloadLayer
from headspace.kv.split import layer_share
from headspace.models import weight_bytes
from headspace.placement import peak
from headspace.placement.peak import activation_bytes, logits_bytes
from headspace.shape import ModelShape

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny models with at least two full-attention layers, one with sliding-window layers between them
MODELS = {
    "llama-3": dict(arch="llama", num_hidden_layers=3),  # 4 KV heads
    "gemma3-full-sliding-full": dict(arch="gemma3", num_hidden_layers=3,  # 2 KV heads
                                     layer_types=["full_attention", "sliding_attention", "full_attention"]),
}


@pytest.fixture(scope="module")
def references():
    """Each model with its ``full`` run over an 80-token prompt, in one forward pass."""
    runs = {}
    for name, fields in MODELS.items():
        fields = dict(fields)
        model = build_model(tiny_config(fields.pop("arch"), **fields), seed=len(name))
        ids = random_ids(PROMPT_TOKENS, seed=3)
        reference = run_generate(Engine(model, mode="full", chunk_size=PROMPT_TOKENS), ids)
        assert_informative(reference.logits, reference.tokens)
        runs[name] = (model, ids, reference)
    return runs


def offload_layers(cache: HeadspaceCache) -> list[OffloadLayer]:
    return [layer for layer in cache.layers if isinstance(layer, OffloadLayer)]


# (model, resident heads per full layer, group heads, cpu heads, chunk)
PLANS = [
    ("llama-3", (4, 0, 2), 1, 0, 16),
    ("llama-3", (0, 4, 1), 2, 0, 7),
    ("llama-3", (1, 3, 2), 1, 1, 33),
    ("llama-3", (1, 3, 2), 2, 2, 16),  # the layer offloading 3 attends 2 on the host, the others 1 of 1 and of 2
    ("llama-3", (0, 2, 4), 1, 4, 80),  # every offloaded head of the first layer on the host
    ("llama-3", (3, 1, 4), 1, "auto", 16),
    ("gemma3-full-sliding-full", (2, 0), 1, 0, 7),
    ("gemma3-full-sliding-full", (0, 1), 1, 1, 16),
    ("gemma3-full-sliding-full", (1, 0), 2, "auto", 33),
]


@pytest.mark.parametrize(("name", "gpu_heads", "group_heads", "cpu_heads", "chunk"), PLANS, ids=str)
def test_per_layer_plans_equal_full(references, name, gpu_heads, group_heads, cpu_heads, chunk):
    model, ids, reference = references[name]
    engine = Engine(model, mode="offload", chunk_size=chunk, gpu_heads=gpu_heads, group_heads=group_heads,
                    cpu_heads=cpu_heads)
    run = run_generate(engine, ids)
    assert_logits_equal(run.logits, reference.logits)
    assert run.tokens == reference.tokens
    layers = offload_layers(run.cache)
    assert tuple(layer.gpu_heads for layer in layers) == gpu_heads
    kv_heads = layers[0].heads
    most = kv_heads - min(gpu_heads)
    if cpu_heads == "auto":  # exact host tiers: a share of every streamed head's positions, the same in each layer
        split = run.cache.split
        assert split.shares and all(layer.host_share == split.current / split.most and layer.cpu_heads == 0
                                    for layer in layers)
    else:
        assert [layer.cpu_heads for layer in layers] == [layer_share(cpu_heads, kv_heads - g, most) for g in gpu_heads]
    row = 2 * ModelShape.of(model.config).head_dim * 4
    reserved = PROMPT_TOKENS + NEW_TOKENS
    assert run.generation.stats.host_kv_bytes == sum(kv_heads - g for g in gpu_heads) * row * reserved
    assert run.generation.stats.placement == run.cache.describe()


def test_the_host_split_is_a_share_of_each_layers_offloaded_heads():
    assert [layer_share(n, 8, 8) for n in range(9)] == list(range(9))  # uniform plans: the count itself
    assert [layer_share(n, 2, 3) for n in range(4)] == [0, 1, 1, 2]  # 2/3 of n, rounded half up
    assert [layer_share(n, 1, 4) for n in range(5)] == [0, 0, 1, 1, 1]
    assert layer_share(3, 0, 3) == 0 and layer_share(2, 5, 0) == 0


def test_a_mixed_plan_is_described_per_layer(references):
    model, ids, _ = references["llama-3"]
    engine = Engine(model, mode="offload", gpu_heads=(1, 3, 2), cpu_heads=2, group_heads=2)
    cache = engine.new_cache(100)
    assert cache.describe() == ("6 of 12 KV heads on the cpu device (1-3 per layer); 6 in host RAM (1-3 per layer), "
                                "streamed 2 at a time; decode attends 4 of them on the host CPU (1-2 per layer)")


@pytest.fixture
def device_is_all_kv(monkeypatch):
    """No kernel workspaces, allocator slack or margin: a ``gpu_memory`` cap then leaves exactly the activations
    and logits besides the KV, so a test can ask for a device of a given number of heads."""
    for name in ("WORKSPACE_BYTES", "ALLOCATOR_SLACK", "MARGIN"):
        monkeypatch.setattr(peak, name, 0)


@pytest.mark.parametrize(("name", "heads_room", "resident"), [
    ("llama-3", 7, (1, 2, 2)),  # 7 heads of room: a double buffer of one head and 5 resident
    ("llama-3", 20, (4, 4, 4)),  # all 12 fit, no double buffer
    ("gemma3-full-sliding-full", 3, (0, 1)),  # the sliding layer's KV counted, then 1 head and a buffer of 1
])
def test_the_automatic_plan_on_a_cpu_with_a_device_size_is_exact(references, device_is_all_kv, name, heads_room,
                                                                  resident):
    model, ids, reference = references[name]
    shape = ModelShape.of(model.config)
    chunk, dtype = 16, torch.float32
    tokens = PROMPT_TOKENS + NEW_TOKENS
    head = 2 * shape.head_dim * 4 * tokens
    windows = sum(shape.kv_heads * 2 * shape.head_dim * 4 * -(-3 * min(tokens, w + chunk) // 2)
                  for w in shape.windows if w)
    working = activation_bytes(shape, chunk, dtype) + logits_bytes(shape, dtype)
    cap = weight_bytes(model) + working + windows + heads_room * head
    engine = Engine(model, mode="offload", chunk_size=chunk, gpu_memory=cap, group_heads=1)
    run = run_generate(engine, ids)
    assert_logits_equal(run.logits, reference.logits)
    assert run.tokens == reference.tokens
    assert tuple(layer.gpu_heads for layer in offload_layers(run.cache)) == resident
