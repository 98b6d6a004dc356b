"""The storage tiers (``DeviceKV``, ``HostKV``) and the staging double buffer hold exactly what was written."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headspace.kv.streaming import Staging, Transfers
from headspace.kv.tiers import DeviceKV, HostKV, host_empty

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
DTYPE = torch.float64


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=DTYPE)


def _filled_host(batch, heads, dim, block_tokens, chunks, seed, reserve=None):
    """A HostKV written chunk by chunk, and the concatenation of what was written."""
    generator = torch.Generator().manual_seed(seed)
    host = HostKV(batch, heads, dim, DTYPE, pin=False, block_tokens=block_tokens)
    if reserve is not None:
        host.reserve(reserve)
    keys = torch.empty(batch, heads, 0, dim, dtype=DTYPE)
    values = torch.empty_like(keys)
    for new in chunks:
        k, v = _randn(generator, batch, heads, new, dim), _randn(generator, batch, heads, new, dim)
        host.write(k, v)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
    return host, keys, values


# -- HostKV ---------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 5),
    dim=st.integers(1, 6),
    block_tokens=st.integers(1, 12),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    reserve=st.one_of(st.none(), st.integers(0, 40)),
    data=st.data(),
)
def test_host_reads_back_any_head_range(batch, heads, dim, block_tokens, chunks, reserve, data):
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    host, keys, values = _filled_host(batch, heads, dim, block_tokens, chunks, seed, reserve)
    assert host.length == sum(chunks) == keys.shape[2]
    assert host.capacity >= host.length

    # blocks tile the positions in order, each at least block_tokens long unless it was reserved up front
    first = 0
    for index, (start, k, v) in enumerate(host.blocks):
        assert start == first
        assert k.shape == v.shape == (batch, heads, k.shape[2], dim)
        if index > 0 or reserve is None:
            assert k.shape[2] >= block_tokens
        first += k.shape[2]
    assert first == host.capacity
    assert host.nbytes == 2 * host.capacity * batch * heads * dim * keys.element_size()

    for _ in range(3):
        lo = data.draw(st.integers(0, heads - 1), label="lo")
        hi = data.draw(st.integers(lo + 1, heads), label="hi")
        tokens = data.draw(st.integers(0, host.length), label="tokens")
        start = data.draw(st.integers(0, tokens), label="start")  # the positions before it are not read
        room = tokens - start + data.draw(st.integers(0, 3), label="spare")
        out_k = torch.full((batch, hi - lo, room, dim), float("nan"), dtype=DTYPE)
        out_v = torch.full_like(out_k, float("nan"))
        host.read(slice(lo, hi), out_k, out_v, tokens, start)
        read = tokens - start
        torch.testing.assert_close(out_k[:, :, :read], keys[:, lo:hi, start:tokens], rtol=0, atol=0)
        torch.testing.assert_close(out_v[:, :, :read], values[:, lo:hi, start:tokens], rtol=0, atol=0)
        assert out_k[:, :, read:].isnan().all() and out_v[:, :, read:].isnan().all()  # nothing else written


def test_host_blocks_never_move():
    host, keys, _ = _filled_host(1, 2, 3, block_tokens=4, chunks=[3], seed=0)
    (start, k, v), = host.blocks
    pointer = k.data_ptr()
    more = torch.ones(1, 2, 9, 3, dtype=DTYPE)
    host.write(more, more)
    assert host.blocks[0][1].data_ptr() == pointer
    assert [b[1].shape[2] for b in host.blocks] == [4, 8]  # one new block holds the whole chunk
    out = torch.empty(1, 2, 12, 3, dtype=DTYPE)
    host.read(slice(0, 2), out, out.clone(), 12)
    torch.testing.assert_close(out, torch.cat([keys, more], 2), rtol=0, atol=0)


def test_host_reserve_is_one_block():
    host = HostKV(2, 3, 4, DTYPE, pin=False, block_tokens=16384)
    host.reserve(100)
    assert [k.shape[2] for _, k, _ in host.blocks] == [100]
    host.reserve(50)  # already fits
    assert len(host.blocks) == 1
    host.write(torch.zeros(2, 3, 100, 4, dtype=DTYPE), torch.zeros(2, 3, 100, 4, dtype=DTYPE))
    assert len(host.blocks) == 1


def test_host_empty_unpinned_is_plain_memory():
    tensor = host_empty((2, 3), torch.float32, pin=False)
    assert tensor.shape == (2, 3) and tensor.device.type == "cpu" and not tensor.is_pinned()


# -- DeviceKV -------------------------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 9)),
        st.tuples(st.just("keep_last"), st.integers(0, 20)),
        st.tuples(st.just("keep"), st.floats(0.0, 1.0), st.booleans()),
        st.tuples(st.just("reserve"), st.integers(0, 40)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 4), dim=st.integers(1, 5), ops=_ops,
       seed=st.integers(0, 2**31 - 1))
def test_device_kv_matches_a_model(batch, heads, dim, ops, seed):
    generator = torch.Generator().manual_seed(seed)
    store = DeviceKV(batch, heads, dim, DTYPE, CPU)
    keys = torch.empty(batch, heads, 0, dim, dtype=DTYPE)
    values = torch.empty_like(keys)
    for op in ops:
        if op[0] == "append":
            k, v = _randn(generator, batch, heads, op[1], dim), _randn(generator, batch, heads, op[1], dim)
            store.append(k, v)
            keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        elif op[0] == "keep_last":
            store.keep_last(op[1])
            keys, values = keys[:, :, max(keys.shape[2] - op[1], 0):], values[:, :, max(values.shape[2] - op[1], 0):]
        elif op[0] == "keep":
            length = keys.shape[2]
            kept = round(op[1] * length)
            rows = [torch.randperm(length, generator=generator)[:kept] for _ in range(batch * heads)]
            if op[2]:
                rows = [row.sort().values for row in rows]
            index = torch.stack(rows).reshape(batch, heads, kept)
            store.keep(index)
            gather = index[..., None].expand(-1, -1, -1, dim)
            keys, values = keys.gather(2, gather), values.gather(2, gather)
        else:
            store.reserve(op[1])
            assert store.capacity >= op[1]
        view_k, view_v = store.view()
        assert store.length == keys.shape[2]
        assert store.capacity >= store.length
        torch.testing.assert_close(view_k, keys, rtol=0, atol=0)
        torch.testing.assert_close(view_v, values, rtol=0, atol=0)


def test_device_kv_growth_is_geometric_and_reserve_is_exact():
    store = DeviceKV(1, 2, 3, DTYPE, CPU)
    store.reserve(10)
    assert store.capacity == 10
    store.append(torch.zeros(1, 2, 10, 3, dtype=DTYPE), torch.zeros(1, 2, 10, 3, dtype=DTYPE))
    assert store.capacity == 10  # no growth within what was reserved
    store.append(torch.ones(1, 2, 1, 3, dtype=DTYPE), torch.ones(1, 2, 1, 3, dtype=DTYPE))
    assert store.capacity == 15  # grows by half, not by one
    assert store.nbytes == 2 * 15 * 2 * 3 * 8
    keys, values = store.view()
    assert keys.shape == values.shape == (1, 2, 11, 3)
    assert keys[:, :, :10].eq(0).all() and keys[:, :, 10].eq(1).all()


def test_keep_last_bounds_a_sliding_window():
    """What a window layer does every step: keep ``window - 1`` past tokens, then append the chunk."""
    window = 5
    store = DeviceKV(1, 1, 1, DTYPE, CPU)
    seen = []
    for step, new in enumerate([3, 1, 4, 1, 1, 6, 2]):
        store.keep_last(window - 1)
        chunk = torch.arange(len(seen), len(seen) + new, dtype=DTYPE).reshape(1, 1, new, 1)
        seen.extend(chunk.flatten().tolist())
        store.append(chunk, -chunk)
        keys, values = store.view()
        expected = seen[-(window - 1 + new):]
        assert keys.flatten().tolist() == expected, step
        assert values.flatten().tolist() == [-x for x in expected]


# -- Staging --------------------------------------------------------------------------------------

class _CountingHost(HostKV):
    reads = 0

    def read(self, heads, keys, values, tokens, start=0):
        self.reads += 1
        super().read(heads, keys, values, tokens, start)


def _counting_host(heads=3, tokens=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    host = _CountingHost(1, heads, 4, DTYPE, pin=False, block_tokens=4)
    keys, values = _randn(generator, 1, heads, tokens, 4), _randn(generator, 1, heads, tokens, 4)
    host.write(keys, values)
    return host, keys, values


def test_staging_prefetch_is_reused_not_refetched():
    host, keys, values = _counting_host()
    staging = Staging(Transfers(CPU), CPU, DTYPE)
    staging.fetch(host, slice(1, 2), 10, 12, None, 0)
    assert host.reads == 1
    slot = staging.acquire(host, slice(1, 2), 10, 12, None)
    assert host.reads == 1  # the prefetched slot was used
    assert slot is staging.slots[0] and staging.other == 1
    torch.testing.assert_close(slot.keys[:, :1, :10], keys[:, 1:2], rtol=0, atol=0)
    torch.testing.assert_close(slot.values[:, :1, :10], values[:, 1:2], rtol=0, atol=0)
    # a different group or length is fetched afresh into the other slot
    other = staging.acquire(host, slice(2, 3), 10, 12, None)
    assert host.reads == 2 and other is staging.slots[1]
    torch.testing.assert_close(other.keys[:, :1, :10], keys[:, 2:3], rtol=0, atol=0)
    shorter = staging.acquire(host, slice(2, 3), 7, 12, None)
    assert host.reads == 3 and shorter is staging.slots[0]
    torch.testing.assert_close(shorter.keys[:, :1, :7], keys[:, 2:3, :7], rtol=0, atol=0)
    # positions from a start (the host attends the ones before it): held from the slot's first position, and a
    # prefetch from another start is not taken for them
    staging.fetch(host, slice(0, 2), 10, 12, None, staging.other, start=4)
    late = staging.acquire(host, slice(0, 2), 10, 12, None, start=4)
    assert host.reads == 4
    torch.testing.assert_close(late.keys[:, :2, :6], keys[:, 0:2, 4:10], rtol=0, atol=0)
    whole = staging.acquire(host, slice(0, 2), 10, 12, None)
    assert host.reads == 5
    torch.testing.assert_close(whole.values[:, :2, :10], values[:, 0:2], rtol=0, atol=0)


def test_staging_grows_a_prefetched_slot_and_keeps_its_data():
    host, keys, values = _counting_host()
    staging = Staging(Transfers(CPU), CPU, DTYPE)
    staging.fetch(host, slice(0, 2), 10, 10, None, 1)  # prefetched before the next chunk's size was known
    slot = staging.acquire(host, slice(0, 2), 10, 25, None)
    assert host.reads == 1
    assert slot.keys.shape[2] >= 25 and slot.values.shape[2] >= 25
    torch.testing.assert_close(slot.keys[:, :2, :10], keys[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(slot.values[:, :2, :10], values[:, :2], rtol=0, atol=0)


def test_staging_reserve_sizes_buffers_once():
    host, _, _ = _counting_host()
    staging = Staging(Transfers(CPU), CPU, DTYPE)
    staging.reserve(64)
    slot = staging.acquire(host, slice(0, 2), 10, 11, None)
    assert slot.keys.shape == (1, 2, 64, 4)
    buffer = slot.keys
    again = staging.acquire(host, slice(2, 3), 10, 40, None)  # a narrower group, still fits
    assert again.keys.shape[2] == 64
    assert staging.acquire(host, slice(0, 2), 10, 64, None).keys.shape[2] == 64
    assert buffer.shape[2] == 64
    assert staging.nbytes == sum(2 * s.keys.numel() * 8 for s in staging.slots)


@pytest.mark.parametrize("heads", [slice(0, 3, 2), slice(1, None)])
def test_host_read_accepts_any_slice(heads):
    host, keys, values = _counting_host(heads=3)
    selected = list(range(3))[heads]
    out_k = torch.zeros(1, len(selected), 10, 4, dtype=DTYPE)
    out_v = torch.zeros_like(out_k)
    host.read(heads, out_k, out_v, 10)
    torch.testing.assert_close(out_k, keys[:, selected], rtol=0, atol=0)
    torch.testing.assert_close(out_v, values[:, selected], rtol=0, atol=0)
