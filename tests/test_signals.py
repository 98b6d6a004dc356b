"""Decode's host part handed over through flags (headspace/kv/signals.py): the kernel reads its query only once
the ready flag is up and sets the done flag after its output; a layer that hands over so decodes full's logits;
a failed job still sets the done flag and raises in the caller. On a CPU the GPU's side of the flags is played
by :class:`HostSideSignals`; on a GPU the driver's stream operations are tested too."""

from __future__ import annotations

import ctypes
import threading
import time

import pytest
import torch
from conftest import assert_logits_equal
from transformers import AutoModelForCausalLM, LlamaConfig

from headspace.attention import host_decode
from headspace.attention.host_decode import Handoff, host_decode_lse
from headspace.engine.engine import Engine
from headspace.kv import layers
from headspace.kv.signals import DONE, READY, Signals, signals_for
from headspace.kv.split import HostWorker
from headspace.kv.streaming import Transfers

needs_kernel = pytest.mark.skipif(host_decode.library() is None, reason="no C compiler on this machine")


def flag(address: int) -> ctypes.c_int32:
    return ctypes.c_int32.from_address(address)


def reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float):
    scores = query.double() @ keys.double().transpose(-1, -2) * scaling
    return torch.softmax(scores, -1) @ values.double(), torch.logsumexp(scores, -1)


@needs_kernel
def test_the_kernel_reads_its_query_once_ready_and_then_sets_done():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 3000, 64), torch.randn(1, 2, 3000, 64)
    query = torch.zeros(1, 2, 4, 64)  # what is there before the query "arrives": the kernel must not read it
    flags = torch.zeros(2, dtype=torch.int32)
    handoff = Handoff(flags.data_ptr(), 7, flags.data_ptr() + 4, 7)
    out, lse = torch.empty(1, 2, 4, 64), torch.empty(1, 2, 4)
    call = threading.Thread(target=host_decode_lse, args=(query, [(keys, values)], 0.2, 2),
                            kwargs=dict(into=(out, lse), handoff=handoff))
    call.start()
    time.sleep(0.2)
    assert call.is_alive() and int(flags[1]) == 0  # waiting for its query
    arrived = torch.randn(1, 2, 4, 64)
    query.copy_(arrived)
    flag(handoff.ready).value = 6  # an earlier hand-over's value does not release it
    time.sleep(0.05)
    assert call.is_alive()
    flag(handoff.ready).value = 7
    call.join(timeout=30)
    assert not call.is_alive() and int(flags[1]) == 7
    expected_out, expected_lse = reference(arrived, keys, values, 0.2)
    assert torch.allclose(out.double(), expected_out, atol=1e-5)
    assert torch.allclose(lse.double(), expected_lse, atol=1e-4)


class HostSideSignals:
    """The GPU's side of the flags played on a CPU: copies are done once issued (a CPU's are), so the ready flag
    is set at once, and "the stream" waits for the done flag by polling it."""

    def __init__(self):
        self.flags = torch.zeros(2, dtype=torch.int32)
        self.inner = Signals(None, self.flags, 0)

    def next(self) -> Handoff:
        return self.inner.next()

    @property
    def count(self) -> int:
        return self.inner.count

    def ready_after_copies(self, handoff: Handoff, stream) -> None:
        flag(handoff.ready).value = handoff.ready_value

    def wait_done(self, handoff: Handoff) -> None:
        deadline = time.monotonic() + 30
        while int(self.flags[DONE]) != handoff.done_value:
            assert time.monotonic() < deadline, "the done flag was never set"
            time.sleep(1e-4)

    def set_done(self, handoff: Handoff) -> None:
        self.inner.set_done(handoff)


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()  # head size 16: the kernel's


@pytest.mark.parametrize("where", ["kernel", "torch", "cuda"])
def test_a_layer_handing_over_through_flags_decodes_the_logits_of_full(monkeypatch, where):
    if where != "torch" and host_decode.library() is None:
        pytest.skip("no C compiler on this machine")
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("the driver's stream operations need a GPU")
    if where == "torch":  # the worker waits for the query itself and sets the done flag from Python
        monkeypatch.setattr(layers, "host_decode_lse", lambda *args, **kwargs: None)
    if where != "cuda":
        monkeypatch.setattr(Transfers, "signals", HostSideSignals())
    model = tiny_llama().to("cuda" if where == "cuda" else "cpu")
    ids = torch.randint(0, 128, (1, 1500), generator=torch.Generator().manual_seed(3)).to(model.device)
    full = Engine(model, None, mode="full")
    engine = Engine(model, None, mode="offload", gpu_heads=1, chunk_size=512)
    full_logits, full_cache = full.prefill(ids)
    logits, cache = engine.prefill(ids)
    for layer in cache.layers:
        layer.set_host_share(0.75)
    token = int(full_logits.argmax())
    for _ in range(4):
        expected = full.decode_step(token, full_cache)
        assert_logits_equal(engine.decode_step(token, cache), expected)
        token = int(expected.argmax())
    signals = cache.layers[0].transfers.signals
    assert signals is not None and all(layer.transfers.signals is signals for layer in cache.layers)
    assert signals.count == 4 * len(cache.layers)  # every layer of every step handed over
    assert int(signals.flags[READY]) == int(signals.flags[DONE]) == signals.count


def test_a_failed_host_job_sets_the_done_flag_and_raises_in_the_caller():
    signals = HostSideSignals()
    handoff = signals.next()
    keys = torch.randn(1, 2, 100, 16)
    task = layers.HostTask(torch.randn(1, 5, 1, 16), None, 2, None, [(keys, keys)], 2, 0.1, torch.float32,
                           None, None, handoff, signals)  # 5 query rows do not fold by a ratio of 2: it fails
    worker = HostWorker(1)
    worker.submit(layers.attend_on_host, task)
    signals.wait_done(handoff)  # released although the job failed
    with pytest.raises(RuntimeError):
        worker.settle()
    assert not worker.pending


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the driver's stream operations need a GPU")
def test_the_gpu_stream_waits_for_the_host_flag_and_writes_its_own():
    signals = signals_for(torch.device("cuda"))
    assert signals is not None
    handoff = signals.next()
    stream = torch.cuda.Stream()
    marker = torch.zeros(1, device="cuda")
    with torch.cuda.stream(stream):
        signals.wait_done(handoff)
        marker += 1  # runs only after the host's flag
        signals.ready_after_copies(handoff, stream)
    time.sleep(0.2)
    assert int(signals.flags[READY]) != handoff.ready_value  # the stream still waits
    signals.set_done(handoff)
    stream.synchronize()
    assert float(marker) == 1.0 and int(signals.flags[READY]) == handoff.ready_value
