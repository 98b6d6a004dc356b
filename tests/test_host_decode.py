"""The compiled host decode kernel: exact against plain attention, and refused where it does not apply."""

import pytest
import torch

from headspace.attention import host_decode
from headspace.attention.host_decode import host_decode_lse, items_of
from headspace.attention.kernels import split_decode_lse

pytestmark = pytest.mark.skipif(host_decode.library() is None, reason="no C compiler on this machine")


def reference(query: torch.Tensor, spans, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float64 over the spans' positions: output (1, Hk, R, D) and log-sum-exp."""
    keys = torch.cat([k for k, _ in spans], dim=2).double()
    values = torch.cat([v for _, v in spans], dim=2).double()
    scores = query.double() @ keys.transpose(-1, -2) * scaling
    return torch.softmax(scores, -1) @ values, torch.logsumexp(scores, -1)


# the kernel's forms: bf16 dot products where the CPU has them, and the rows widened to float32 (every CPU)
WIDENED = ("-mno-avx512bf16",)


@pytest.mark.parametrize("form", [(), WIDENED], ids=["native", "widened"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("ratio", "dim"), [(1, 64), (3, 64), (4, 128), (5, 96), (8, 256), (16, 32)])
def test_the_kernel_equals_attention_over_strided_spans(form, dtype, ratio, dim):
    torch.manual_seed(ratio * dim)
    # a host tier's layout: (1, heads, positions, dim) blocks, of which the spans take some heads and positions
    blocks = [(torch.randn(1, 5, n, dim).to(dtype), torch.randn(1, 5, n, dim).to(dtype)) for n in (3000, 1700)]
    spans = [(k[:, 1:4, 10:], v[:, 1:4, 10:]) for k, v in blocks] + [(blocks[0][0][:, 1:4, :1],
                                                                        blocks[0][1][:, 1:4, :1])]
    query = torch.randn(1, 3, ratio, dim).to(dtype)
    out, lse = host_decode_lse(query, spans, 0.3, threads=2, lib=host_decode.library(form))
    expected_out, expected_lse = reference(query, spans, 0.3)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    assert torch.allclose(out.double(), expected_out, atol=tolerance)
    assert torch.allclose(lse.double(), expected_lse, atol=1e-4)


def test_split_decode_takes_the_kernel_and_falls_back_to_torch_alike(monkeypatch):
    torch.manual_seed(0)
    spans = [(torch.randn(1, 2, 5000, 128, dtype=torch.bfloat16), torch.randn(1, 2, 5000, 128, dtype=torch.bfloat16))]
    query = torch.randn(1, 2, 4, 128, dtype=torch.bfloat16)
    compiled = split_decode_lse(query, spans, 0.1, 8)
    monkeypatch.setenv("HEADSPACE_HOST_KERNEL", "torch")
    host_decode.library.cache_clear()
    try:
        assert host_decode_lse(query, spans, 0.1, 2) is None
        fallback = split_decode_lse(query, spans, 0.1, 8)
    finally:
        monkeypatch.delenv("HEADSPACE_HOST_KERNEL")
        host_decode.library.cache_clear()
    assert torch.allclose(compiled[0].float(), fallback[0].float(), atol=1e-2)
    assert torch.allclose(compiled[1], fallback[1], atol=1e-3)


@pytest.mark.parametrize("case", ["batch", "float16", "dim", "ratio", "generator", "columns"])
def test_what_the_kernel_does_not_take_is_left_to_torch(case):
    dtype, batch, dim, ratio = torch.bfloat16, 1, 64, 2
    if case == "batch":
        batch = 2
    if case == "float16":
        dtype = torch.float16
    if case == "dim":
        dim = 72  # not whole vectors of 16
    if case == "ratio":
        ratio = 17
    keys = torch.randn(batch, 2, 300, dim).to(dtype)
    spans = [(keys, keys.clone())]
    if case == "columns":  # rows not contiguous
        spans = [(k.transpose(-1, -2).contiguous().transpose(-1, -2), v) for k, v in spans]
    if case == "generator":
        spans = iter(spans)
    query = torch.randn(batch, 2, ratio, dim).to(dtype)
    assert host_decode_lse(query, spans, 0.1, 2) is None


def test_items_cover_every_position_of_every_head_once():
    spans = [(torch.empty(1, 3, n, 16), None) for n in (5000, 7, 70000)]
    items = items_of(spans, heads=3, threads=4).tolist()
    for span, (keys, _) in enumerate(spans):
        for head in range(3):
            cuts = sorted((first, stop) for s, h, first, stop in items if (s, h) == (span, head))
            assert cuts[0][0] == 0 and cuts[-1][1] == keys.shape[2]
            assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert len(items) >= 4 * 4  # enough pieces for the threads to share


def test_loading_the_kernel_leaves_subnormal_numbers_alone():
    """Linked with -ffast-math, gcc's start-up code would flush subnormals to zero in the whole process."""
    for form in ((), WIDENED):
        host_decode.library(form)
    smallest_normal = 2.2250738585072014e-308
    assert smallest_normal / 2 > 0.0
    assert torch.tensor(1.1754944e-38, dtype=torch.float32) / 2 > 0

