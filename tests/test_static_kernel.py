"""The static step's Triton kernel (:mod:`headspace.attention.triton_decode`): attention over a layer's slots up to a
position read on the device equals attention over exactly those keys, and static decode through it gives the logits
of ``full``. Triton's interpreter runs the kernels' own code on a CPU (conftest); a subprocess checks that they
compile for the H100 without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyModels, assert_logits_equal, kv_heads, max_diff

import headspace.engine.graphs
import headspace.kv.layers
from headspace import Engine
from headspace.attention.kernels import decode_lse

pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def kernels(monkeypatch):
    """The kernel module, with blocks of 16 slots and splits of one block: several splits even over a few slots."""
    pytest.importorskip("triton")
    from headspace.attention import triton_decode

    monkeypatch.setattr(triton_decode, "BLOCK", 16)
    monkeypatch.setattr(triton_decode, "MIN_BLOCKS", 1)
    return triton_decode


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("position", "first", "window"), [
    (150, 0, None),   # several splits, the last ones past the token: they read nothing
    (0, 0, None),     # one slot
    (199, 0, None),   # every slot
    (170, 20, None),  # slot 0 holds position 20 (a window layer's buffer)
    (170, 20, 30),    # a window: the first splits are empty
    (100, 0, 7),      # a window inside one block
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_kernel_attends_exactly_the_slots_up_to_the_position(kernels, position, first, window, dtype):
    if torch.cuda.is_available() and dtype == torch.float32:
        pytest.skip("float32 on a GPU takes the portable path (tensor cores would round it to tf32)")
    generator = torch.Generator().manual_seed(position)
    query = torch.randn(2, 3, 4, 16, generator=generator).to(dtype)
    keys, values = (2 * torch.randn(2, 3, 200, 16, generator=generator)).to(dtype), torch.randn(2, 3, 200, 16).to(dtype)
    last = position - first
    low = 0 if window is None else max(0, last - window + 1)
    garbage = keys.clone(), values.clone()
    for tensor in garbage:  # slots outside [low, last] hold NaN: reading one would show
        tensor[:, :, last + 1 :] = float("nan")
        tensor[:, :, :low] = float("nan")
    out = kernels.attend(query.to(device()), garbage[0].to(device()), garbage[1].to(device()),
                         torch.tensor([position], device=device()), 0.3, first, window).cpu()
    want, _ = decode_lse(query.float(), keys[:, :, low : last + 1].float(), values[:, :, low : last + 1].float(), 0.3)
    assert out.dtype == dtype and out.shape == want.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(("position", "first", "window"), [(150, 0, None), (0, 0, None), (170, 20, 30)])
def test_the_kernel_stores_the_new_token_and_attends_it(kernels, position, first, window):
    """Given the decoded token's key and value, the kernel writes them to its slot (which held garbage) and attends
    them there; no other slot changes."""
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32  # float32 runs on a CPU only
    generator = torch.Generator().manual_seed(position + 1)
    query = torch.randn(2, 3, 4, 16, generator=generator).to(dtype)
    keys, values = (torch.randn(2, 3, 200, 16, generator=generator).to(dtype) for _ in range(2))
    last = position - first
    token = (torch.randn(2, 1, 3, 16, generator=generator).to(dtype).transpose(1, 2),  # strided, as a projection's
             torch.randn(2, 3, 1, 16, generator=generator).to(dtype))
    stored = [tensor.clone() for tensor in (keys, values)]
    stored[0][:, :, last], stored[1][:, :, last] = float("nan"), float("nan")
    stored = [tensor.to(device()) for tensor in stored]
    out = kernels.attend(query.to(device()), *stored, torch.tensor([position], device=device()), 0.3, first, window,
                         new=tuple(part.to(device()) for part in token)).cpu()
    for tensor, before, new in zip(stored, (keys, values), token, strict=True):
        expected = before.clone()
        expected[:, :, last] = new[:, :, 0]
        assert torch.equal(tensor.cpu(), expected)
    low = 0 if window is None else max(0, last - window + 1)
    want, _ = decode_lse(query.float(), *(torch.cat([t[:, :, low:last], n], 2).float()
                                          for t, n in zip((keys, values), token, strict=True)), 0.3)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), want, atol=tolerance, rtol=tolerance)


def test_the_kernel_reads_slots_of_a_larger_store(kernels):
    """Resident slots are a view of storage with heads further apart than the slots attended."""
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32  # float32 runs on a CPU only
    storage = torch.randn(1, 2, 300, 16).to(dtype), torch.randn(1, 2, 300, 16).to(dtype)
    keys, values = storage[0][:, :, :120], storage[1][:, :, :120]
    query = torch.randn(1, 2, 3, 16).to(dtype)
    out = kernels.attend(query.to(device()), keys.to(device()), values.to(device()),
                         torch.tensor([90], device=device()), 0.25).cpu()
    want, _ = decode_lse(query.float(), keys[:, :, :91].float(), values[:, :, :91].float(), 0.25)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), want, atol=tolerance, rtol=tolerance)


@pytest.fixture
def through_the_kernel(monkeypatch):
    """Static steps attend exact resident slots through the kernel (on a CPU, in the interpreter); counts its calls."""
    pytest.importorskip("triton")
    calls = []
    real = headspace.kv.layers.attend_slots

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(headspace.kv.layers, "slot_kernel", lambda query: True)
    monkeypatch.setattr(headspace.kv.layers, "attend_slots", counting)
    monkeypatch.setattr(headspace.engine.graphs, "TAIL_TOKENS", 5)  # the static form begins again every 5 tokens
    return calls


# head sizes the kernel tiles (16): full attention, sliding windows (Mistral), both mixed (Gemma 3)
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU models through the interpreter: on a GPU, the test below")
@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3"])
def test_static_decode_through_the_kernel_gives_the_logits_of_full(tiny_models, through_the_kernel, arch):
    ids, ref = tiny_models.reference(arch)
    model = tiny_models.model(arch)
    full = Engine(model, mode="full")
    engine = Engine(model, mode="offload", chunk_size=32, gpu_heads=kv_heads(model.config), cuda_graphs=True)
    expected, full_cache = full.prefill(ids)
    _, cache = engine.prefill(ids)
    steps = 12
    for token in ref.tokens[:steps]:
        assert_logits_equal(engine.decode_step(token, cache), full.decode_step(token, full_cache))
    assert len(through_the_kernel) == steps * len(cache.layers)
    assert engine._graphs.captures == -(-steps // 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel in a captured graph needs CUDA")
@pytest.mark.parametrize("compile_layers", [False, True])
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_bf16_graph_decode_through_the_kernel_is_no_further_from_float32_than_eager_decode(monkeypatch, arch,
                                                                                         compile_layers):
    """bf16 on the GPU, where the kernel is chosen by itself (and with the norms and MLPs compiled): the replayed
    step's logits are as near to float32 ``full`` as eager decode's, across a recapture (a 5-token tail)."""
    monkeypatch.setattr(headspace.engine.graphs, "TAIL_TOKENS", 5)
    calls = []
    real = headspace.kv.layers.attend_slots
    monkeypatch.setattr(headspace.kv.layers, "attend_slots", lambda *a, **k: calls.append(1) or real(*a, **k))
    models = TinyModels()
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(7)).cuda()
    reference = Engine(models.model(arch).cuda(), mode="full", chunk_size=64)
    ref_logits, ref_cache = reference.prefill(ids)
    tokens = [int(ref_logits.argmax())]
    bf16 = TinyModels().model(arch).to("cuda", torch.bfloat16)
    eager, graph = (Engine(bf16, mode="offload", chunk_size=32, gpu_heads=kv_heads(bf16.config), cuda_graphs=graphs,
                           compile_layers=compile_layers and graphs) for graphs in (False, True))
    caches = [eager.prefill(ids)[1], graph.prefill(ids)[1]]
    worst = [0.0, 0.0]
    for _ in range(12):
        expected = reference.decode_step(tokens[-1], ref_cache)
        for i, engine in enumerate((eager, graph)):
            worst[i] = max(worst[i], max_diff(engine.decode_step(tokens[-1], caches[i]), expected))
        tokens.append(int(expected.argmax()))
    assert calls and graph._graphs.captures >= 3  # captured (warm-up and capture run the kernel), replayed
    assert worst[1] <= 2 * worst[0] + 1e-3, worst


def test_the_kernel_is_taken_only_where_it_runs():
    half, dim = torch.empty(1, 2, 4, 128, dtype=torch.bfloat16), torch.empty(1, 2, 4, 128)
    assert not headspace.kv.layers.slot_kernel(half)  # a CPU
    assert not headspace.kv.layers.slot_kernel(dim)
    if torch.cuda.is_available():
        assert headspace.kv.layers.slot_kernel(half.cuda())
        assert not headspace.kv.layers.slot_kernel(half[..., :96].cuda())  # not a power of two
        assert not headspace.kv.layers.slot_kernel(dim.cuda())  # float32


COMPILE = """
import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from headspace.attention import triton_decode

def compile(fn, signature, constants, warps):
    source = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constants, "constexpr")}, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert "cubin" in compiled.asm, fn

SHAPES = (("bf16", 128), ("fp16", 128), ("bf16", 256), ("bf16", 64))
for (dtype, dim), store in itertools.product(SHAPES, (False, True)):  # STORE: the new token written by the kernel
    compile(triton_decode._split,
            {"query": f"*{dtype}", "keys": f"*{dtype}", "values": f"*{dtype}", "position": "*i64", "acc": "*fp32",
             "top_out": "*fp32", "total_out": "*fp32", "new_key": f"*{dtype}", "new_value": f"*{dtype}",
             "HEADS": "i32", "FIRST": "i64", "WINDOW": "i64", "PER_SPLIT": "i32", "scale_log2": "fp32",
             "key_batch": "i64", "key_head": "i64", "key_slot": "i64", "value_batch": "i64", "value_head": "i64",
             "value_slot": "i64", "new_key_batch": "i64", "new_key_head": "i64", "new_value_batch": "i64",
             "new_value_head": "i64"},
            {"DIM": dim, "RATIO": 4, "RATIO_PAD": 16, "BLOCK_N": triton_decode.BLOCK, "STORE": store},
            triton_decode.WARPS)
    compile(triton_decode._merge,
            {"acc": "*fp32", "top_in": "*fp32", "total_in": "*fp32", "out": f"*{dtype}", "SPLITS": "i32"},
            {"DIM": dim, "RATIO": 4, "SPLIT_BLOCK": triton_decode.MERGE_BLOCK}, 4)
"""


def test_the_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs the kernels' Python; Triton's compiler is stricter: both compile to H100 binaries."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
