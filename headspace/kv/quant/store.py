"""A tier's KV kept quantized: whole groups as rows of bytes, the newest tokens in full precision.

The rows live where the tier lives (a :class:`~headspace.kv.tiers.DeviceKV` for resident
heads, a :class:`~headspace.kv.tiers.HostKV` in host RAM for offloaded ones), so they
are written, copied and staged like bfloat16 KV, only smaller. New tokens first join
:attr:`QuantizedKV.recent`, full precision on the device; after the layer has attended
them, :meth:`QuantizedKV.take_groups` quantizes (on the device, before any copy to the
host) the whole groups beyond the scheme's residual window. The rows only ever grow,
so a staging slot fetched before the layer's update still holds exactly the rows the
attention reads.

Dequantizing is a chain of elementwise torch operations, each a pass over memory. With
``HEADSPACE_COMPILE_DEQUANT=1`` in the environment, device reads run it through
``torch.compile`` instead (one fused kernel per scheme, Triton on a GPU; compiled once,
for any length), which the bench can compare with the eager chain.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from headspace.kv.quant.schemes import Scheme
from headspace.kv.tiers import DeviceKV, HostKV

PIECE = 65536  # tokens dequantized at once: bounds the float32 temporaries at long contexts
COMPILE = os.environ.get("HEADSPACE_COMPILE_DEQUANT") == "1"


@functools.cache
def compiled(scheme: Scheme) -> Callable[..., torch.Tensor]:
    """``scheme.dequantize`` compiled once for every shape (``HEADSPACE_COMPILE_DEQUANT=1``)."""
    return torch.compile(scheme.dequantize, dynamic=True)


class QuantizedKV:
    """Keys and values of ``heads`` heads: positions [0, :attr:`quantized`) as rows in ``rows``, the rest in
    :attr:`recent` ``(keys, values)`` on ``device`` in ``dtype``."""

    def __init__(self, scheme: Scheme, rows: DeviceKV | HostKV, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.scheme, self.rows = scheme, rows
        batch, heads, _ = rows.shape
        self.shape = (batch, heads, head_dim)
        self.dtype, self.device = dtype, device
        empty = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=device)
        self.recent: tuple[torch.Tensor, torch.Tensor] = (empty, empty)

    @property
    def quantized(self) -> int:
        """Positions stored as rows: a multiple of the scheme's group."""
        return self.rows.length

    @property
    def length(self) -> int:
        return self.rows.length + self.recent[0].shape[2]

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` rows, in whole groups: a group never straddles two host blocks, so the host
        attention can dequantize the rows of each block on their own."""
        group = self.scheme.group
        self.rows.reserve(-(-tokens // group) * group)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New positions, kept in full precision until :meth:`take_groups`."""
        self.recent = (torch.cat([self.recent[0], keys], dim=2), torch.cat([self.recent[1], values], dim=2))

    def take_groups(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows of the whole groups of recent positions beyond the residual window, quantized here and
        taken out of :attr:`recent`; the caller stores them in :attr:`rows` (None: no group is complete)."""
        keys, values = self.recent
        group = self.scheme.group
        count = (keys.shape[2] - self.scheme.residual) // group * group
        if count <= 0:
            return None
        rows = (self.scheme.quantize(keys[:, :, :count], keys=True),
                self.scheme.quantize(values[:, :, :count], keys=False))
        self.recent = (keys[:, :, count:].clone(), values[:, :, count:].clone())
        return rows

    def dequantize(self, heads: slice, keys: torch.Tensor, values: torch.Tensor, tokens: int,
                   copied: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Dequantize positions [0, ``tokens``) (whole rows) of ``heads`` into ``keys``/``values`` ``(batch,
        len(heads), >=tokens, head_dim)``, from the rows on the device, or, for rows in host RAM, from their
        ``copied`` on the device (:meth:`~headspace.kv.tiers.HostKV.read`)."""
        width = heads.stop - heads.start
        if isinstance(self.rows, HostKV):
            row_keys, row_values = copied[0][:, :width], copied[1][:, :width]
        else:
            row_keys, row_values = (part[:, heads] for part in self.rows.view())
        dim = self.shape[2]
        dequantize = compiled(self.scheme) if COMPILE else self.scheme.dequantize
        step = max(PIECE // self.scheme.group, 1) * self.scheme.group
        for start in range(0, tokens, step):
            stop = min(start + step, tokens)
            keys[:, :, start:stop] = dequantize(row_keys[:, :, start:stop], True, dim, keys.dtype)
            values[:, :, start:stop] = dequantize(row_values[:, :, start:stop], False, dim, values.dtype)

    def truncate(self, tokens: int, recent: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Go back to ``tokens`` rows and the full-precision positions ``recent`` after them (a snapshot's)."""
        if isinstance(self.rows, HostKV):
            self.rows.set_length(tokens)
        else:
            self.rows.truncate(tokens)
        self.recent = recent

    @property
    def nbytes(self) -> int:
        """Bytes of the rows, in the tier that holds them."""
        return self.rows.nbytes

    @property
    def recent_bytes(self) -> int:
        """Bytes of the full-precision positions, on the device whatever the tier."""
        return 2 * self.recent[0].numel() * self.recent[0].element_size()
