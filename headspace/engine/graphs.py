"""Decode steps replayed from a CUDA graph, for caches whose KV heads are all on the GPU.

With every head resident, a decode step of an 8B model reads ~20 GB at HBM speed in a few
milliseconds, but launching its ~1,500 kernels one by one from Python takes longer: eager
decode ran at 25-42% of the bytes' bound on the H100. A CUDA graph records the kernels of one
step once and replays them with one launch.

A graph replays fixed kernels on fixed memory, so the step is run in the cache's static form
(:mod:`headspace.kv.static`): the token id and its position are written into tensors the
graph reads (``input_ids``, ``position_ids``, and the cache's position), transformers gets
the position explicitly (so it computes none from the cache's Python length), the registered
attention function needs no mask, and the last position's logits land in a tensor the graph
writes. What changes per token in Python (the cache's counters) runs after the replay. After
``tail`` tokens (or when something moved the cache's storage: a prefill, a roll back) the
static form begins again and the step is captured again.

On a CPU, or with ``capture=False``, the same static step runs without a graph: the tests
check it token for token against ``full``.

A replayed kernel still costs a few microseconds however little it does, and most of a step's
kernels are small: transformers' RMSNorm alone is about seven elementwise kernels, twice per
layer, and its rotary embedding about ten. With ``compile_layers`` the static step runs each
decoder layer through ``torch.compile`` (default mode: fused kernels, no CUDA graphs of its own),
which the capture then records. The cache stays outside the compiled code: its ``update`` and the
registered attention function are opaque to dynamo (``torch.compiler.disable``), so each layer
compiles into the pieces around them (norm, projections and rotary; output projection, residuals,
norm and MLP), and the layer index, which transformers passes to the cache, is taken as a dynamic
integer instead of a constant (``allow_unspec_int_on_nn_module``): one set of compiled pieces serves
every layer instead of one per layer. The layers are swapped in around the static step only
(:class:`CompiledLayers`): prefill, eager decode and other engines of the same model run the model
as loaded.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch._dynamo
from torch import nn
from transformers import PreTrainedModel

from headspace.errors import HeadspaceError
from headspace.kv.cache import HeadspaceCache
from headspace.kv.layers import Phase
from headspace.kv.static import StaticDecode

TAIL_TOKENS = 256  # tokens decoded per capture: each step attends the tail through a mask of this many slots
SETTINGS = {"auto": "auto", "on": True, "off": False}  # the command line's --cuda-graphs -> Engine(cuda_graphs=...)


class CaptureError(RuntimeError):
    """The decode step could not be captured (something in the model's forward synchronizes with the host)."""


class CompileError(RuntimeError):
    """The decoder layers could not be compiled (no compiler for Triton's launcher, an op dynamo cannot trace)."""


class CompiledLayers:
    """Compiled stand-ins for the decoder layers (the modules with a ``self_attn`` child), swapped into their
    parents while :meth:`active`. Compiled lazily, on their first call; dynamo takes each layer's weights as
    inputs and its index as a dynamic integer, so the compiled pieces are shared by every layer (one more for
    layer 0, as dynamo specializes the integers 0 and 1, and one per kind of layer, e.g. sliding or full)."""

    def __init__(self, model: PreTrainedModel):
        self.swaps = [(parent, name, child, torch.compile(child)) for parent in model.modules()
                      for name, child in parent.named_children()
                      if isinstance(getattr(child, "self_attn", None), nn.Module)]
        if not self.swaps:
            raise HeadspaceError(f"compile_layers: no decoder layers with a 'self_attn' module in "
                                 f"{type(model).__name__}")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The model runs the compiled layers inside, the loaded ones again after."""
        for parent, name, _, compiled in self.swaps:
            setattr(parent, name, compiled)
        try:
            with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
                yield
        finally:
            for parent, name, child, _ in self.swaps:
                setattr(parent, name, child)


class GraphDecoder:
    """One-token decode steps of one cache at a time, in the static form, captured in a CUDA graph when
    ``capture``.

    The graph holds no reference to the cache (only to its storage, which the cache keeps): when
    the cache goes, so does the graph at the next step of another cache. ``compile_layers``: the step runs the
    decoder layers compiled (:class:`CompiledLayers`).
    """

    def __init__(self, model: PreTrainedModel, capture: bool, tail: int | None = None, compile_layers: bool = False):
        tail = TAIL_TOKENS if tail is None else tail
        if tail < 1:
            raise ValueError(f"tail must be at least 1, got {tail}")
        self.model, self.capture, self.tail = model, capture, tail
        self.compiled = CompiledLayers(model) if compile_layers else None
        self.device = model.device
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.captures = 0  # static forms begun (each captured once with ``capture``): tests and stats count them
        self._cache: weakref.ref[HeadspaceCache] | None = None
        self._static: StaticDecode | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None

    @torch.inference_mode()
    def step(self, token: int | torch.Tensor, cache: HeadspaceCache) -> torch.Tensor:
        """Feed one token (an id, or a tensor holding one) to ``cache``; the logits of the next ``(1, vocab)``."""
        if self._cache is None or self._cache() is not cache or not cache.static_covers(self._static):
            self._begin(cache)
        if isinstance(token, torch.Tensor):
            self.ids.copy_(token.reshape(1, 1))
        else:
            self.ids.fill_(token)
        self._static.position.fill_(cache.get_seq_length())
        if self.capture and self._graph is None:
            self._record(cache)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._logits = self._forward(cache)
        cache.advance_static()
        return self._logits.clone()  # the next replay overwrites the graph's output

    def _begin(self, cache: HeadspaceCache) -> None:
        """A new static form of ``cache`` (its prefix is what the cache holds now); the old graph goes."""
        self._graph = self._logits = None
        self._static = cache.begin_static(self.tail)
        self._cache = weakref.ref(cache)
        self.captures += 1

    def _record(self, cache: HeadspaceCache) -> None:
        """Capture the step. One eager run first, on a side stream: it lets libraries set up their workspaces
        outside the capture (and computes this token, which the replay computes again, identically)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(cache)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # its own pool: freed with the graph (a pool shared across
                # captures broke the allocator once every graph using it had gone)
                logits = self._forward(cache)
        except CompileError:
            raise
        except RuntimeError as error:  # the cache stays as it was: the step can still run eagerly
            self._cache = self._static = None
            raise CaptureError(f"the decode step could not be captured in a CUDA graph: {error}") from error
        self._graph, self._logits = graph, logits

    def _forward(self, cache: HeadspaceCache) -> torch.Tensor:
        cache.phase = Phase.DECODE
        try:
            with self._static.step(), self.compiled.active() if self.compiled else contextlib.nullcontext():
                out = self.model(input_ids=self.ids, position_ids=self._static.position.view(1, 1),
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)
        except torch._dynamo.exc.TorchDynamoException as error:  # compiling: the cache's counts did not move
            self._cache = self._static = None
            raise CompileError(f"the decoder layers could not be compiled: {str(error).splitlines()[0]}") from error
        return out.logits[:, -1].float()
