"""The static form of decode: every shape fixed and every position read on the device.

A CUDA graph replays the kernels of one decode step without Python, so nothing that changes
from token to token may be a Python number inside the step. In this form (a cache whose heads
are all on the device, :meth:`~headspace.kv.cache.HeadspaceCache.begin_static`):

* the token's absolute position is a device tensor, :attr:`StaticDecode.position`, written
  before each step; every layer stores the new key and value at a slot computed from it;
* a full-attention layer attends its first ``prefix`` positions (those stored when the static
  form began) without a mask, and the next ``tail`` slots with a mask that lets through the
  slots up to the position, merged exactly by log-sum-exp
  (:func:`~headspace.attention.kernels.masked_decode_attention`);
* a sliding-window layer attends its whole buffer (the window before the static form began
  plus ``tail`` slots) with a mask that lets through the last ``window`` positions;
* on a GPU in half precision, exact resident heads skip both: one Triton kernel attends the
  slots up to the position, read on the device, and a second merges its splits
  (:mod:`headspace.attention.triton_decode`), two kernels per layer instead of about fifteen.

The layers' own counters (``length``) are Python numbers, advanced after each step outside
the graph (:meth:`~headspace.kv.cache.HeadspaceCache.advance_static`), so between steps the
cache is an ordinary cache: prefill, roll back or save it as any other. Once ``tail`` tokens
have been decoded, or anything moved the storage, the static form begins again with a new
prefix (:meth:`~headspace.kv.cache.HeadspaceCache.static_covers` says when).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StaticDecode:
    """The device-side state of one static form: the position tensor, the prefix and tail sizes, and the masks
    of the step being built (made once per forward call, shared by the layers that need the same one)."""

    def __init__(self, device: torch.device, prefix: int, tail: int):
        self.device = device
        self.prefix, self.tail = prefix, tail
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # the decoded token's absolute position
        self.running = False  # a forward call in the static form is being run (or captured)
        self._made: dict[tuple, torch.Tensor] = {}

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run (or capture) one forward call in the static form; the masks are made afresh inside it."""
        self.running, self._made = True, {}
        try:
            yield
        finally:
            self.running, self._made = False, {}

    def slot(self, first: int) -> torch.Tensor:
        """The slot of the decoded token in a buffer whose slot 0 holds absolute position ``first``."""
        if first == 0:
            return self.position
        return self._make(("slot", first), lambda: self.position - first)

    def tail_mask(self) -> torch.Tensor:
        """Additive mask (tail,) of the tail slots of full-attention layers: 0 up to the position, -inf after."""
        def make() -> torch.Tensor:
            positions = torch.arange(self.prefix, self.prefix + self.tail, device=self.device)
            return _additive(positions <= self.position)

        return self._make(("tail",), make)

    def window_mask(self, first: int, slots: int, window: int) -> torch.Tensor:
        """Additive mask (slots,) of a sliding-window buffer whose slot 0 holds absolute position ``first``: the
        ``window`` positions up to the decoded one count."""
        def make() -> torch.Tensor:
            positions = torch.arange(first, first + slots, device=self.device)
            return _additive((positions <= self.position) & (positions > self.position - window))

        return self._make(("window", first, slots, window), make)

    def _make(self, key: tuple, make) -> torch.Tensor:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


def _additive(keep: torch.Tensor) -> torch.Tensor:
    """0 where ``keep``, -inf elsewhere, in float32 (scores are float32)."""
    return torch.zeros(keep.shape, device=keep.device).masked_fill_(~keep, float("-inf"))
