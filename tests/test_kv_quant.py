"""Quantized KV tiers (``kv_dtype``): round trips per scheme, attention over the quantized path, generation on the
tiny models, saved documents, plans per precision, and bad values refused.

The reference for the quantized path is attention (the same kernel) over keys and values dequantized here,
independently of the staging code: positions the store holds as rows, dequantized, then its newest positions in
full precision. Each comparison also checks that quantization moved the output, or agreeing would prove nothing.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import ATOL, PROMPT_TOKENS, assert_logits_equal, max_diff, random_ids, run_generate
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bench import tiny
from test_cli import refused, run, tiny_model  # noqa: F401  (tiny_model: a fixture)

import headspace.kv.quant.store
from headspace import Engine, bench
from headspace.attention.kernels import causal_attention
from headspace.errors import HeadspaceError
from headspace.eviction.budget import BudgetLayer
from headspace.eviction.retaining.heads import HeadsSpec, RetainingHeads
from headspace.kv.cache import OffloadOptions
from headspace.kv.layers import OffloadLayer, Phase
from headspace.kv.quant.precision import KVPrecision
from headspace.kv.quant.schemes import SCHEMES, TINY, Grouped
from headspace.kv.quant.store import QuantizedKV
from headspace.kv.streaming import Staging, Transfers
from headspace.kv.tiers import DeviceKV, HostKV
from headspace.models import load_config
from headspace.placement import Machine, largest_context, plan
from headspace.shape import ModelShape

QUANTIZED = [name for name, scheme in SCHEMES.items() if not scheme.exact]
GIB = 2**30


# -- round trips ---------------------------------------------------------------------------------------------

def allowed_error(name: str, x: torch.Tensor, keys: bool) -> torch.Tensor:
    """The most each element of ``x`` (..., n, D) may move in a round trip through scheme ``name``: half a step
    of its scale (never below float16's smallest normal number), plus float16's rounding of the scale (and zero
    point) and float32's."""
    scheme = SCHEMES[name]
    eps = 2.0**-10
    if isinstance(scheme, Grouped):
        levels = 2**scheme.bits - 1
        if keys:  # per channel over groups of tokens
            groups = x.unflatten(-2, (-1, scheme.group))
            low, high = groups.amin(-2, keepdim=True), groups.amax(-2, keepdim=True)
            big = groups.abs().amax(-2, keepdim=True)
            bound = ((high - low) / levels).clamp(min=TINY) / 2 * (1 + eps) + eps * big
            return bound.expand_as(groups).flatten(-3, -2) + 1e-6
        channels = x.unflatten(-1, (-1, min(scheme.group, x.shape[-1])))
        low, high = channels.amin(-1, keepdim=True), channels.amax(-1, keepdim=True)
        big = channels.abs().amax(-1, keepdim=True)
        bound = ((high - low) / levels).clamp(min=TINY) / 2 * (1 + eps) + eps * big
        return bound.expand_as(channels).flatten(-2) + 1e-6
    amax = x.abs().amax(-1, keepdim=True)
    if name == "fp8":  # 3 mantissa bits: half an ulp is 2^-4 of the value; subnormals step by 2^-9 of the scale
        return 2.0**-4 * (1 + eps) * x.abs() + (amax / 448).clamp(min=TINY) * 2.0**-10 + eps * x.abs() + 1e-6
    return (amax / 127).clamp(min=TINY) / 2 * (1 + eps) + eps * x.abs() + 1e-6


@pytest.mark.parametrize("name", QUANTIZED)
@settings(max_examples=20, deadline=None)
@given(head_dim=st.sampled_from([8, 16, 64, 128]), groups=st.integers(1, 3), exponent=st.integers(-4, 2),
       outlier=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_error_is_bounded(name, head_dim, groups, exponent, outlier, seed):
    scheme = SCHEMES[name]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, groups * 32, head_dim, generator=generator) * 10.0**exponent
    if outlier:  # a key channel far larger than the others, as in real keys (within float16's range)
        x[..., 3] *= 20
    for keys in (True, False):
        rows = scheme.quantize(x, keys)
        assert rows.dtype == torch.uint8 and rows.shape == (1, 2, groups * 32, scheme.width(head_dim))
        back = scheme.dequantize(rows, keys, head_dim, torch.float32)
        error = (back - x).abs()
        assert (error <= allowed_error(name, x, keys)).all(), f"{name} keys={keys}: max error {error.max():.3g}"


@pytest.mark.parametrize("name", QUANTIZED)
def test_zeros_and_constants_round_trip_without_nans(name):
    scheme = SCHEMES[name]
    for x in (torch.zeros(1, 1, 32, 16), torch.full((1, 1, 32, 16), -3.0)):
        for keys in (True, False):
            back = scheme.dequantize(scheme.quantize(x, keys), keys, 16, torch.float32)
            assert torch.isfinite(back).all() and max_diff(back, x) <= 3 * 2.0**-10


def test_bytes_per_token_count_the_scales():
    """Llama-3-8B's heads (128 dims), keys and values of one head and token: the planner's unit."""
    assert SCHEMES["bf16"].bytes_per_token(128, 2) == 512
    assert SCHEMES["fp8"].bytes_per_token(128, 2) == 2 * (128 + 2)  # a float16 scale per token
    assert SCHEMES["int8"].bytes_per_token(128, 2) == 2 * (128 + 2)
    assert SCHEMES["int4"].bytes_per_token(128, 2) == 2 * (64 + 16)  # 4 float16 scales and zeros per 32 values
    assert SCHEMES["int2"].bytes_per_token(128, 2) == 2 * (32 + 16)


# -- the kv_dtype option -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "gpu", "host", "canonical"), [
    ("int4", "int4", "int4", "int4"), ("host=int4", "bf16", "int4", "host=int4"), ("bf16", "bf16", "bf16", "bf16"),
    ("gpu=fp8,host=int4", "fp8", "int4", "gpu=fp8,host=int4"), (" HOST=fp8 ", "bf16", "fp8", "host=fp8"),
    ("gpu=int8", "int8", "bf16", "gpu=int8")])
def test_kv_dtype_is_parsed_once(text, gpu, host, canonical):
    precision = KVPrecision.parse(text)
    assert (precision.gpu, precision.host, str(precision)) == (gpu, host, canonical)
    assert OffloadOptions(kv_dtype=text).kv_dtype == canonical


@pytest.mark.parametrize("text", ["int5", "host=int5", "disk=int4", "gpu=int4,gpu=fp8", "host", "", "=int4"])
def test_bad_kv_dtype_is_refused_naming_the_choices(text):
    with pytest.raises(HeadspaceError, match="bf16, fp8, int8, int4") as error:
        OffloadOptions(kv_dtype=text)
    assert "host=int4" in str(error.value)


def test_modes_that_cannot_take_kv_dtype_refuse_it(tiny_models):
    model = tiny_models.model("llama")
    for mode in ("full", "snapkv", "locret"):
        with pytest.raises(HeadspaceError, match="kv_dtype"):
            Engine(model, mode=mode, kv_dtype="int4")


# -- attention over the quantized path -----------------------------------------------------------------------

def stored(store: DeviceKV | HostKV | QuantizedKV, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position ``store`` holds, as the attention should see it: rows dequantized (read back here, without
    the staging code), then the newest positions in full precision."""
    if not isinstance(store, QuantizedKV):
        return store.view() if isinstance(store, DeviceKV) else _host_rows(store)
    rows = store.rows.view() if isinstance(store.rows, DeviceKV) else _host_rows(store.rows)
    parts = [store.scheme.dequantize(part, keys, head_dim, store.dtype) for part, keys in zip(rows, (True, False))]
    return tuple(torch.cat([part, recent], dim=2) for part, recent in zip(parts, store.recent))


def _host_rows(host: HostKV) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, dim = host.shape
    empty = torch.empty(0, dim, dtype=host.dtype)
    return tuple(torch.cat([empty, *host.rows(host.length, values)]).reshape(batch, heads, host.length, dim)
                 for values in (False, True))


@pytest.mark.parametrize("precision", ["int4", "int8", "fp8", "int2", "host=int4", "gpu=fp8,host=int4"])
@pytest.mark.parametrize("gpu_heads", [0, 1, 3])
def test_quantized_attention_equals_attention_over_the_dequantized_kv(precision, gpu_heads, monkeypatch):
    """Chunks of odd sizes, then decode steps across group boundaries (decode quantizes every 40 tokens here):
    every output equals attention over what the tiers hold, dequantized, within float32 rounding, and differs
    from exact attention."""
    monkeypatch.setattr(headspace.kv.quant.store, "DECODE_BATCH", 40)
    torch.manual_seed(0)
    heads, dim, ratio = 4, 16, 2
    layer = OffloadLayer(Transfers(torch.device("cpu")), torch.device("cpu"), torch.float32, heads, dim, gpu_heads,
                         group_heads=2, block_tokens=48, precision=KVPrecision.parse(precision))
    staging = Staging(layer.transfers, torch.device("cpu"), torch.float32)
    exact_keys = exact_values = torch.empty(1, heads, 0, dim)
    moved = 0.0
    for step, chunk in enumerate([70, 37, 5] + [1] * 40):
        keys, values = torch.randn(1, heads, chunk, dim) * 2, torch.randn(1, heads, chunk, dim)
        layer.update(keys, values)
        exact_keys, exact_values = torch.cat([exact_keys, keys], 2), torch.cat([exact_values, values], 2)
        parts = [stored(store, dim) for store in (layer.resident, layer.host) if store is not None]
        expected_keys, expected_values = (torch.cat(part, dim=1) for part in zip(*parts))
        query = torch.randn(1, heads * ratio, chunk, dim)
        out = layer.attend(query, 0.25, staging, Phase.PREFILL if chunk > 1 else Phase.DECODE)
        assert max_diff(out, causal_attention(query, expected_keys, expected_values, 0.25)) < 1e-5, step
        moved = max(moved, max_diff(out, causal_attention(query, exact_keys, exact_values, 0.25)))
        for store in (layer.resident, layer.host):
            if isinstance(store, QuantizedKV):  # whole groups quantized once attended, the newest kept exact
                recent = store.recent[0].shape[2]
                assert store.quantized % store.scheme.group == 0
                assert recent < store.scheme.residual + max(store.scheme.group, 40 if chunk == 1 else 0)
                assert recent >= min(store.scheme.residual, store.length)
    assert moved > 1e-3


@pytest.mark.parametrize("kv_dtype", ["host=int4", "host=fp8"])
def test_host_attention_reads_the_quantized_rows(tiny_models, one_thread, kv_dtype):
    """Decode with offloaded heads attended on the host CPU (dequantized there, block by block) gives the logits
    of streaming them to the device, across group boundaries and host blocks."""
    model, ids = tiny_models.model("llama"), random_ids(150, seed=7)
    engines = [Engine(model, mode="offload", gpu_heads=1, chunk_size=16, kv_dtype=kv_dtype, cpu_heads=cpu_heads)
               for cpu_heads in (0, 3)]
    runs = [engine.prefill(ids) for engine in engines]
    assert [layer.cpu_heads for layer in runs[1][1].layers] == [3, 3]
    token = runs[0][0].argmax(-1, keepdim=True)
    for _ in range(40):
        streamed, on_host = (engine.decode_step(token, cache) for engine, (_, cache) in zip(engines, runs))
        assert max_diff(streamed, on_host) < 1e-4
        token = streamed.argmax(-1, keepdim=True)


# -- generation on the tiny models ---------------------------------------------------------------------------

# the largest |offload - full| of the logits after a 200-token prompt each precision may give on the tiny models
# (float32, logits up to about 5): their attention is peaked, so an error in a key moves the logits far more than
# in a trained model; the measured worst of the four models is about half of these
TOLERANCE = {"int8": 0.15, "fp8": 0.8, "int4": 2.0, "host=int4": 2.0, "gpu=fp8,host=int4": 2.0}


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding", "gemma3", "qwen3"])
@pytest.mark.parametrize("kv_dtype", list(TOLERANCE))
def test_quantized_offload_generates_close_to_full(tiny_models, one_thread, arch, kv_dtype):
    """A prompt long enough for int4 to quantize groups during the prefill, then a generation over it."""
    model, ids = tiny_models.model(arch), random_ids(200, seed=0)
    expected, _ = Engine(model, mode="full").prefill(ids)
    engine = Engine(model, mode="offload", gpu_heads=1, chunk_size=16, kv_dtype=kv_dtype)
    result = run_generate(engine, ids, new_tokens=8)
    diff = max_diff(result.logits, expected)
    assert 1e-4 < diff <= TOLERANCE[kv_dtype], f"{arch} {kv_dtype}: logits differ by {diff:.3g}"
    assert result.logits.argmax() == expected.argmax()
    layers = [layer for layer in result.cache.layers if isinstance(layer, OffloadLayer)]
    assert layers and all(isinstance(layer.host, QuantizedKV) and layer.host.quantized for layer in layers)
    assert f"KV stored {KVPrecision.parse(kv_dtype)}" in result.cache.describe()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_stays_exact(tiny_models, one_thread, arch):
    ids, reference = tiny_models.reference(arch)
    engine = Engine(tiny_models.model(arch), mode="offload", gpu_heads=1, chunk_size=16, kv_dtype="bf16")
    result = run_generate(engine, ids)
    assert_logits_equal(result.logits, reference.logits, ATOL)
    assert result.tokens == reference.tokens
    layers = [layer for layer in result.cache.layers if isinstance(layer, OffloadLayer)]
    assert all(isinstance(layer.resident, DeviceKV) and isinstance(layer.host, HostKV) for layer in layers)


# -- documents -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", ["int4", "gpu=int8,host=int4"])
def test_saved_quantized_cache_loads_back_to_identical_logits(tiny_models, one_thread, tmp_path, kv_dtype):
    model = tiny_models.model("llama")
    ids, question = random_ids(200, seed=3), random_ids(6, seed=4)
    exact = Engine(model, mode="offload", gpu_heads=1, chunk_size=16)
    exact_bytes = exact.save(exact.prefill_document(ids), tmp_path / "exact.hsc")
    engine = Engine(model, mode="offload", gpu_heads=1, chunk_size=16, kv_dtype=kv_dtype)
    document = engine.prefill_document(ids)
    saved = engine.save(document, tmp_path / "quantized.hsc")
    assert saved < 0.75 * exact_bytes  # rows and scales instead of float32 KV, but for the newest 72 positions
    assert json.loads(json.dumps(engine.option_values))["kv_dtype"] == kv_dtype

    again = Engine(model, mode="offload", chunk_size=16, kv_dtype=kv_dtype)
    loaded = again.load(tmp_path / "quantized.hsc")
    assert torch.equal(loaded.logits, document.logits)
    first, _ = engine.prefill(question, cache=document.cache)
    second, _ = again.prefill(question, cache=loaded.cache)
    assert torch.equal(first, second)

    with pytest.raises(HeadspaceError, match=f"saved with kv_dtype={kv_dtype} and this engine has kv_dtype=bf16"):
        Engine(model, mode="offload", chunk_size=16).load(tmp_path / "quantized.hsc")


def test_a_kept_quantized_document_answers_the_same_twice(tiny_models, one_thread):
    engine = Engine(tiny_models.model("llama"), mode="offload", gpu_heads=1, chunk_size=16, kv_dtype="int4")
    document = engine.prefill_document(random_ids(PROMPT_TOKENS, seed=5))
    question = random_ids(40, seed=6)  # long enough to quantize groups of its own, which a rollback undoes
    answers = [engine.ask(document, question, max_new_tokens=24).token_ids for _ in range(2)]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("decode", ["budget", "exact"])
def test_offload_locret_keeps_its_evicted_tokens_quantized(tiny_models, one_thread, tmp_path, decode):
    """The budget stays exact on the device; what Locret evicts goes to host RAM as int4 rows. The prefill still
    attends everything (close to full), a kept document answers alike twice and after a save and load."""
    model = tiny_models.model("llama")
    torch.manual_seed(1)
    options = dict(mode="offload+locret", chunk_size=16, budget=80, decode=decode, kv_dtype="host=int4",
                   heads=RetainingHeads(HeadsSpec.from_config(model.config, hidden=8)))
    ids, question = random_ids(180, seed=8), random_ids(20, seed=9)
    expected, _ = Engine(model, mode="full").prefill(ids)
    engine = Engine(model, **options)
    logits, cache = engine.prefill(ids)
    assert 1e-4 < max_diff(logits, expected) <= TOLERANCE["int4"] and logits.argmax() == expected.argmax()
    hosts = [layer.host for layer in cache.layers if isinstance(layer, BudgetLayer)]
    assert all(isinstance(host, QuantizedKV) and host.quantized and host.length == 100 for host in hosts)
    document = engine.prefill_document(ids)
    answers = [engine.ask(document, question, max_new_tokens=16).token_ids for _ in range(2)]
    engine.save(document, tmp_path / "doc.hsc")
    loaded = Engine(model, **options).load(tmp_path / "doc.hsc")
    assert torch.equal(loaded.logits, document.logits)
    assert answers[0] == answers[1] == engine.ask(loaded, question, max_new_tokens=16).token_ids
    with pytest.raises(HeadspaceError, match="budget on the device exact"):
        Engine(model, **{**options, "kv_dtype": "int4"})


# -- plans -----------------------------------------------------------------------------------------------------

def test_plans_count_each_tier_at_its_precision():
    shape = ModelShape.of(load_config("random:llama-3-8b"))
    tokens, layers = 1024, shape.full_layers
    exact = plan(shape, tokens, torch.bfloat16, "offload", 2, 1)
    host = plan(shape, tokens, torch.bfloat16, "offload", 2, 1, precision=KVPrecision.parse("host=int4"))
    assert host.resident_kv_bytes == exact.resident_kv_bytes == 2 * layers * tokens * 512
    assert exact.host_kv_bytes == 6 * layers * tokens * 512
    assert host.host_kv_bytes == 6 * layers * tokens * 160
    assert host.staging_bytes == 2 * 1 * tokens * (512 + 160)  # exact heads, and the host rows they come from
    both = plan(shape, tokens, torch.bfloat16, "offload", 2, 1, precision=KVPrecision.parse("int4"))
    assert both.resident_kv_bytes == 2 * layers * tokens * 160
    assert both.recent_bytes == 8 * layers * 512 * (64 + 256)  # residual window + a decode batch, exact


def test_largest_context_grows_with_fewer_bits():
    shape = ModelShape.of(load_config("random:llama-3-8b"))
    machine = Machine(device=20 * GIB, host=100 * GIB)
    largest = {name: largest_context(shape, torch.bfloat16, 4096, machine, OffloadOptions(kv_dtype=name))
               for name in SCHEMES}
    assert largest["bf16"] < largest["fp8"] == largest["int8"] < largest["int4"] < largest["int2"]
    assert 1.9 < largest["fp8"] / largest["bf16"] < 2.0  # 260 bytes per head and token for 512
    assert 3.1 < largest["int4"] / largest["bf16"] < 3.2  # 160 for 512, less the exact newest positions


def test_info_prints_the_largest_context_per_precision(capsys, monkeypatch):
    """Planned for a GPU given by --gpu-memory and 64 GiB of host RAM (on a GPU machine the GPU would be measured)."""
    if torch.cuda.is_available():
        pytest.skip("plans for a GPU that is not here")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=64 * GIB))
    code, out, err = run(capsys, "info", "--model", "random:llama-3-8b", "--device", "cuda", "--gpu-memory", "40GiB",
                         "--dtype", "bfloat16")
    assert code == 0, err
    found = {}
    for name in SCHEMES:
        match = re.search(rf"^{name}( \(lossy\))?\s+([\d.]+ \w+) \(([\d,]+) bytes\)\s+([\d,]+) tokens", out, re.M)
        assert match, out
        found[name] = int(match.group(4).replace(",", ""))
        assert int(match.group(3).replace(",", "")) == 32 * 8 * SCHEMES[name].bytes_per_token(128, 2)
    assert found["bf16"] < found["fp8"] < found["int4"] < found["int2"]


# -- the command line ----------------------------------------------------------------------------------------

@pytest.mark.usefixtures("cpu_default_device")
def test_bad_kv_dtype_on_the_command_line_is_one_line_and_exit_2(capsys, tiny_model):  # noqa: F811
    line = refused(capsys, "generate", "--prompt", "hi", "--kv-dtype", "int5")
    assert "--kv-dtype" in line and "invalid kv_dtype 'int5'" in line and "int4" in line
    line = refused(capsys, "generate", "--prompt", "hi", "--mode", "snapkv", "--kv-dtype", "int4",
                   "--model", tiny_model)
    assert "kv_dtype" in line


def test_bench_compares_precisions_side_by_side(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "random_model", tiny)
    out = tmp_path / "bench.json"
    code = bench.main(["--contexts", "300,1k", "--modes", "offload,offload/kvhost=fp8,offload/gpu1/kvgpu=fp8+host=int4",
                       "--kv-dtype", "int4", "--chunk-size", "128", "--decode-steps", "2", "--synthetic-from", "1k",
                       "--json", str(out), "--device", "cpu", "--gpu-heads", "0"])
    assert code == 0, capsys.readouterr().err
    cells = json.loads(out.read_text())["cells"]
    labels = ["offload/kvint4", "offload/kvhost=fp8", "offload/gpu1/kvgpu=fp8+host=int4"]
    assert [c["mode"] for c in cells] == labels * 2
    assert [c["kv_dtype"] for c in cells[:3]] == ["int4", "host=fp8", "gpu=fp8,host=int4"]
    assert all(c["error"] is None and c["decode_tokens_per_s"] > 0 for c in cells)
    int4, fp8 = cells[0], cells[1]
    assert int4["host_kv_bytes"] < fp8["host_kv_bytes"]  # 80 bytes per head, token and tensor against 130
    assert "offload/gpu1/kvgpu=fp8+host=int4" in capsys.readouterr().out
