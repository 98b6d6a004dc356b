"""Decode attention over quantized rows: the Triton kernel (run by Triton's interpreter on a CPU: the kernel's own
code) and the portable path both equal attention over the dequantized keys and values."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import headspace.kv.quant.store
from headspace.attention.kernels import decode_lse, merge_lse
from headspace.kv.quant.attend import quantized_decode_lse
from headspace.kv.quant.schemes import SCHEMES

QUANTIZED = [name for name, scheme in SCHEMES.items() if not scheme.exact]


@pytest.fixture
def kernel():
    """The Triton kernel's entry point: compiled on a GPU, run by Triton's interpreter on a CPU (conftest)."""
    pytest.importorskip("triton")
    from headspace.kv.quant import triton_decode

    def run(query, key_rows, value_rows, scheme, scaling):
        if torch.cuda.is_available() and query.dtype == torch.float32:
            pytest.skip("float32 on a GPU takes the portable path (tensor cores would round it to tf32)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out, lse = triton_decode.attend(query.to(device), key_rows.to(device), value_rows.to(device), scheme, scaling)
        return out.cpu(), lse.cpu()

    return run


def rows(name: str, shape: tuple[int, int, int, int], seed: int = 0):
    """Keys with an outlier channel and values, as ``name`` rows, and what those rows dequantize to."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(shape, generator=generator)
    keys[..., 3] *= 8  # KIVI quantizes keys per channel because of channels like this one
    values = torch.randn(shape, generator=generator)
    scheme = SCHEMES[name]
    key_rows, value_rows = scheme.quantize(keys, keys=True), scheme.quantize(values, keys=False)
    dim = shape[-1]
    return scheme, key_rows, value_rows, (scheme.dequantize(key_rows, True, dim, torch.float32),
                                          scheme.dequantize(value_rows, False, dim, torch.float32))


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("tokens", [32, 96, 544])
def test_the_kernel_equals_attention_over_the_dequantized_rows(kernel, name, tokens):
    if name in ("fp8", "int8"):
        tokens += 5  # per-token rows end anywhere
    scheme, key_rows, value_rows, (keys, values) = rows(name, (2, 3, tokens, 64))
    query = torch.randn(2, 3, 4, 64, generator=torch.Generator().manual_seed(1))
    out, lse = kernel(query, key_rows, value_rows, scheme, 0.125)
    want_out, want_lse = decode_lse(query, keys, values, 0.125)
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse.float(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", QUANTIZED)
def test_the_kernel_in_half_precision_rounds_as_attention_over_half_keys_would(kernel, name):
    """The model's dtype on a GPU: keys and values are rounded to it, the scores and softmax stay float32.
    bfloat16 on a GPU; float16 in the interpreter, whose numpy has no bfloat16."""
    half = torch.bfloat16 if torch.cuda.is_available() else torch.float16
    scheme, key_rows, value_rows, (keys, values) = rows(name, (1, 2, 160, 128))
    query = torch.randn(1, 2, 4, 128, generator=torch.Generator().manual_seed(2)).to(half)
    out, lse = kernel(query, key_rows, value_rows, scheme, 128**-0.5)
    want_out, want_lse = decode_lse(query.float(), keys.to(half).float(), values.to(half).float(), 128**-0.5)
    assert out.dtype == half
    torch.testing.assert_close(out.float(), want_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3)


def test_the_kernel_reads_rows_inside_a_larger_store(kernel):
    """Resident rows are a view of a store with room beyond its length and heads further apart."""
    scheme, key_rows, value_rows, (keys, values) = rows("int4", (1, 2, 128, 64))
    store = torch.zeros(1, 2, 192, key_rows.shape[-1], dtype=torch.uint8), torch.zeros(1, 2, 192, key_rows.shape[-1],
                                                                                          dtype=torch.uint8)
    store[0][:, :, :128], store[1][:, :, :128] = key_rows, value_rows
    query = torch.randn(1, 2, 3, 64)
    out, lse = kernel(query, store[0][:, :, :128], store[1][:, :, :128], scheme, 0.1)
    want_out, want_lse = decode_lse(query, keys, values, 0.1)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse.float(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", QUANTIZED)
def test_the_portable_path_equals_attention_over_the_dequantized_rows(name, monkeypatch):
    monkeypatch.setattr(headspace.kv.quant.store, "PIECE", 64)  # several pieces, merged by their log-sum-exp
    scheme, key_rows, value_rows, (keys, values) = rows(name, (1, 2, 256, 32))
    query = torch.randn(1, 2, 3, 32)
    out, lse = quantized_decode_lse(query, key_rows, value_rows, scheme, 1 / math.sqrt(32))
    want_out, want_lse = decode_lse(query, keys, values, 1 / math.sqrt(32))
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-5, rtol=1e-5)


def test_merging_parts_equals_attending_all_keys_at_once():
    query, keys, values = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    parts = [decode_lse(query, keys[:, :, a:b], values[:, :, a:b], 0.25) for a, b in ((0, 7), (7, 33), (33, 40))]
    out, lse = merge_lse(parts)
    want_out, want_lse = decode_lse(query, keys, values, 0.25)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from headspace.kv.quant import triton_decode
from headspace.kv.quant.schemes import SCHEMES
signature = {"query": "*bf16", "key_rows": "*u8", "value_rows": "*u8", "acc": "*fp32", "top_out": "*fp32",
             "total_out": "*fp32", "HEADS": "i32", "N": "i32", "PER_SPLIT": "i32", "scale_log2": "fp32",
             "key_batch": "i64", "key_head": "i64", "value_batch": "i64", "value_head": "i64"}
for name in sys.argv[1:]:
    scheme = SCHEMES[name]
    constants = {"WIDTH": scheme.width(128), "DIM": 128, "RATIO": 4, "RATIO_PAD": 16, "BLOCK_N": triton_decode.BLOCK,
                 **triton_decode._layout(scheme, 128)}
    source = ASTSource(fn=triton_decode.decode, signature={**signature, **dict.fromkeys(constants, "constexpr")},
                       constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": triton_decode.WARPS})
    assert "cubin" in compiled.asm, name
"""


def test_the_kernel_compiles_for_hopper_without_a_gpu():
    """The interpreter runs the kernel's Python; Triton's compiler is stricter (constant branches, shapes): the
    kernel compiles to an H100 binary for every scheme on this machine too, GPU or not."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", COMPILE, *QUANTIZED], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
