"""``offload`` gives the same logits and greedy tokens as ``full`` (unpatched transformers).

Tiny random-weight models of every supported architecture run the whole matrix of
chunk sizes, GPU-resident heads and head-group sizes; the real SmolLM2 runs a 3K-token
prompt. Further tests break the offloaded path on purpose and check that the same
comparisons then fail, so a pass means something.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import (
    ATOL,
    NEW_TOKENS,
    PROMPT_TOKENS,
    TINY_ARCHS,
    assert_informative,
    assert_logits_equal,
    full_layers,
    kv_heads,
    max_diff,
    run_generate,
)

from headspace import Engine, HeadspaceCache, passkey_prompt
from headspace.kv.layers import OffloadLayer, WindowLayer
from headspace.kv.tiers import DeviceKV, HostKV
from headspace.shape import ModelShape

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = list(TINY_ARCHS)
# whole prompt in one chunk, token by token, and sizes that do and do not divide the 80-token prompt
CHUNKS = [PROMPT_TOKENS, 1, 7, 16, 33]
# (gpu_heads, group_heads, cpu_heads): "all" keeps every KV head on the device, group None picks
# group sizes automatically, cpu_heads > 0 attends that many offloaded heads on the host in decode
HEAD_SPLITS = [
    (0, 1, 0),
    (0, 2, 0),
    (1, 1, 0),
    (1, 2, 0),
    ("all", 1, 0),
    (0, None, 0),
    (0, 1, 1),
    (1, 2, "rest"),
]


def _split(config, gpu_heads, cpu_heads) -> tuple[int, int]:
    gpu = kv_heads(config) if gpu_heads == "all" else gpu_heads
    cpu = kv_heads(config) - gpu if cpu_heads == "rest" else cpu_heads
    return gpu, cpu


class _AttendCounter:
    """Counts HeadspaceCache.attend calls per layer, to prove the offloaded path computed attention."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: dict[int, int] = {}
        original = HeadspaceCache.attend

        def attend(cache, layer_idx, query, scaling):
            self.calls[layer_idx] = self.calls.get(layer_idx, 0) + 1
            return original(cache, layer_idx, query, scaling)

        monkeypatch.setattr(HeadspaceCache, "attend", attend)


@pytest.mark.parametrize("gpu_heads,group_heads,cpu_heads", HEAD_SPLITS, ids=lambda v: str(v))
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_offload_equals_full(tiny_models, monkeypatch, arch, chunk_size, gpu_heads, group_heads, cpu_heads):
    model = tiny_models.model(arch)
    config = model.config
    ids, ref = tiny_models.reference(arch)
    assert_informative(ref.logits, ref.tokens)
    gpu, cpu = _split(config, gpu_heads, cpu_heads)

    counter = _AttendCounter(monkeypatch)
    engine = Engine(model, mode="offload", chunk_size=chunk_size, gpu_heads=gpu, group_heads=group_heads,
                    cpu_heads=cpu)
    run = run_generate(engine, ids)

    assert_logits_equal(run.logits, ref.logits)
    assert run.tokens == ref.tokens

    # the offloaded cache really held the KV and computed every layer's attention
    assert isinstance(run.cache, HeadspaceCache)
    windows = ModelShape.of(config).windows
    for layer, window in zip(run.cache.layers, windows):
        assert isinstance(layer, WindowLayer if window is not None else OffloadLayer)
        assert layer.get_seq_length() == PROMPT_TOKENS + NEW_TOKENS - 1
        if window is None:
            assert (layer.gpu_heads, layer.cpu_heads) == (gpu, cpu)
    forwards = math.ceil(PROMPT_TOKENS / chunk_size) + NEW_TOKENS - 1
    assert counter.calls == {i: forwards for i in range(config.num_hidden_layers)}
    row = 2 * ModelShape.of(config).head_dim * 4  # keys and values of one head and one position, float32
    offloaded = kv_heads(config) - gpu
    reserved = PROMPT_TOKENS + NEW_TOKENS
    assert run.generation.stats.host_kv_bytes == full_layers(config) * offloaded * row * reserved


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_references_are_informative(tiny_models, arch):
    """The tiny models' reference outputs vary with the input, so agreeing with them is not trivial."""
    _, ref = tiny_models.reference(arch, prompt_seed=0)
    _, other = tiny_models.reference(arch, prompt_seed=1)
    assert_informative(ref.logits, ref.tokens)
    assert max_diff(ref.logits, other.logits) > 100 * ATOL
    assert ref.tokens != other.tokens


# -- the comparisons can fail ---------------------------------------------------------------------

def _offload_run(tiny_models, arch, chunk_size=16, gpu_heads=0, group_heads=1):
    model = tiny_models.model(arch)
    engine = Engine(model, mode="offload", chunk_size=chunk_size, gpu_heads=gpu_heads, group_heads=group_heads)
    ids, _ = tiny_models.reference(arch)
    return run_generate(engine, ids)


def _assert_detected(run, ref):
    diff = max_diff(run.logits, ref.logits)
    assert diff > 10 * ATOL, f"a corrupted cache changed the logits by only {diff:.3g}"


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding", "gemma3"])
def test_corrupt_host_tier_is_detected(tiny_models, monkeypatch, arch):
    """One stale key of one offloaded head, read back from host memory, breaks equality."""
    _, ref = tiny_models.reference(arch)
    original = HostKV.read

    def read(self, heads, keys, values, tokens, start=0):
        original(self, heads, keys, values, tokens, start)
        if tokens - start > 1:
            keys[:, 0, 0] = keys[:, 0, 1]

    monkeypatch.setattr(HostKV, "read", read)
    _assert_detected(_offload_run(tiny_models, arch), ref)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_corrupt_device_tier_is_detected(tiny_models, monkeypatch, arch):
    """One wrong value of the on-device heads (resident or sliding-window) breaks equality."""
    _, ref = tiny_models.reference(arch)
    original = DeviceKV.view

    def view(self):
        keys, values = original(self)
        values = values.clone()
        values[:, 0, 0] += 1.0
        return keys, values

    monkeypatch.setattr(DeviceKV, "view", view)
    _assert_detected(_offload_run(tiny_models, arch, gpu_heads=kv_heads(tiny_models.model(arch).config)), ref)


@pytest.mark.parametrize("arch", ["mistral", "qwen2-sliding", "phi3-sliding", "gemma3"])
@pytest.mark.parametrize("shift", [-1, 1])
def test_window_off_by_one_is_detected(tiny_models, monkeypatch, arch, shift):
    """The prompt outruns every sliding window: an offload cache with a window one longer or shorter differs."""
    _, ref = tiny_models.reference(arch)
    windows = ModelShape.of(tiny_models.model(arch).config).windows
    assert any(w is not None and w < PROMPT_TOKENS for w in windows)
    read = ModelShape.of

    def shifted(cls, config):
        shape = read(config)
        return dataclasses.replace(shape, windows=tuple(w + shift if w is not None else None for w in shape.windows))

    monkeypatch.setattr(ModelShape, "of", classmethod(shifted))
    _assert_detected(_offload_run(tiny_models, arch, chunk_size=7), ref)


def test_wrong_group_in_staging_is_detected(tiny_models, monkeypatch):
    """Staging hands back the data fetched for the group asked for: serving another group's slot breaks equality."""
    from headspace.kv.streaming import Staging

    _, ref = tiny_models.reference("llama")
    original = Staging.acquire

    def acquire(self, host, heads, tokens, room, written, **options):
        slot = original(self, host, heads, tokens, room, written)
        if heads.start == 1 and tokens > 0:  # pretend group 1's data is group 0's
            host.read(slice(0, 1), slot.keys, slot.values, tokens)
        return slot

    monkeypatch.setattr(Staging, "acquire", acquire)
    _assert_detected(_offload_run(tiny_models, "llama"), ref)


# -- the real SmolLM2 -----------------------------------------------------------------------------

# (chunk_size, gpu_heads, group_heads, cpu_heads): SmolLM2 has 3 KV heads per layer; both chunk sizes
# leave a partial last chunk; group None is automatic; cpu_heads=1 attends one offloaded head on the host
SMOL_SPLITS = [
    (1024, 0, 1, 0),
    (1024, 1, 1, 0),
    (1024, 3, 1, 0),
    (700, 0, 2, 0),
    (700, 1, None, 1),
    (700, 3, 1, 0),
]


@pytest.fixture(scope="module")
def smol_reference(smollm2):
    """The ``full`` run over a ~3K-token pass-key prompt, in one forward pass, computed once."""
    model, tokenizer = smollm2
    engine = Engine(model, tokenizer, mode="full")
    ids = engine.encode(passkey_prompt(tokens=3000))
    assert 2500 < ids.shape[1] < 3500
    engine.chunk_size = ids.shape[1]
    return ids, run_generate(engine, ids)


@pytest.mark.slow
def test_smollm2_reference_is_informative(smollm2, smol_reference):
    _, tokenizer = smollm2
    _, ref = smol_reference
    assert_informative(ref.logits, ref.tokens)
    assert "68142" in tokenizer.decode(ref.tokens)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size,gpu_heads,group_heads,cpu_heads", SMOL_SPLITS)
def test_smollm2_offload_equals_full(smollm2, smol_reference, chunk_size, gpu_heads, group_heads, cpu_heads):
    model, tokenizer = smollm2
    ids, ref = smol_reference
    assert ids.shape[1] % chunk_size != 0  # the last chunk is a partial one
    engine = Engine(model, tokenizer, mode="offload", chunk_size=chunk_size, gpu_heads=gpu_heads,
                    group_heads=group_heads, cpu_heads=cpu_heads)
    run = run_generate(engine, ids)
    assert_logits_equal(run.logits, ref.logits)
    assert run.tokens == ref.tokens
    assert isinstance(run.cache, HeadspaceCache)
    assert (run.generation.stats.host_kv_bytes > 0) == (gpu_heads < 3)


@pytest.mark.slow
def test_smollm2_offload_finds_passkey(smollm2):
    model, tokenizer = smollm2
    engine = Engine(model, tokenizer, mode="offload", gpu_heads=1)
    result = engine.generate(passkey_prompt(), max_new_tokens=10)
    assert result.stats.prompt_tokens > 3500
    assert result.stats.host_kv_bytes > 0
    assert "68142" in result.text
