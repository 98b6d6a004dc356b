"""A tier's KV kept quantized: whole groups as rows of bytes, the newest tokens in full precision.

The rows live where the tier lives (a :class:`~headspace.kv.tiers.DeviceKV` for resident
heads, a :class:`~headspace.kv.tiers.HostKV` in host RAM for offloaded ones), so they
are written, copied and staged like bfloat16 KV, only smaller. New tokens first join
:attr:`QuantizedKV.recent`, full precision on the device; after the layer has attended
them, :meth:`QuantizedKV.take_groups` quantizes (on the device, before any copy to the
host) the whole groups beyond the scheme's residual window. The rows only ever grow,
so a staging slot fetched before the layer's update still holds exactly the rows the
attention reads.

Prefill dequantizes rows (a chain of elementwise torch operations) into the staging buffer,
a head group at a time: its attention is compute-bound, so the passes over memory cost
little there. Decode, which is bound by the bytes it reads, attends the rows as they are
(:mod:`headspace.kv.quant.attend`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from headspace.kv.quant.schemes import Scheme
from headspace.kv.tiers import DeviceKV, HostKV

PIECE = 65536  # tokens dequantized at once: bounds the float32 temporaries at long contexts
DECODE_BATCH = 256  # decode quantizes once this many positions beyond the residual window have gathered


def dequantized_pieces(scheme: Scheme, key_rows: torch.Tensor, value_rows: torch.Tensor, head_dim: int,
                       dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Rows (..., n, width) dequantized :data:`PIECE` tokens (whole groups) at a time, which bounds the float32
    temporaries at long contexts: (first position, keys, values) per piece."""
    step = max(PIECE // scheme.group, 1) * scheme.group
    for start in range(0, key_rows.shape[-2], step):
        yield (start, scheme.dequantize(key_rows[..., start : start + step, :], True, head_dim, dtype),
               scheme.dequantize(value_rows[..., start : start + step, :], False, head_dim, dtype))


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

    def take_groups(self, decoding: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows of the whole groups of recent positions beyond the residual window, quantized here and
        taken out of :attr:`recent`; the caller stores them in :attr:`rows` (None: none to take).

        While ``decoding``, only once :data:`DECODE_BATCH` positions beyond the window have gathered: a
        step then quantizes nothing most of the time, and the static form of decode (which quantizes
        nothing) can run that many steps and still compute what eager steps compute."""
        keys, values = self.recent
        group = self.scheme.group
        beyond = keys.shape[2] - self.scheme.residual
        if beyond < max(DECODE_BATCH if decoding else 0, group):
            return None
        count = beyond // group * group
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
        pieces = dequantized_pieces(self.scheme, row_keys[:, :, :tokens], row_values[:, :, :tokens], self.shape[2],
                                    keys.dtype)
        for start, piece_keys, piece_values in pieces:
            keys[:, :, start : start + piece_keys.shape[2]] = piece_keys
            values[:, :, start : start + piece_values.shape[2]] = piece_values

    def static_steps(self) -> int:
        """Decode steps that quantize nothing from now on (after a decode flush: at least one)."""
        return self.scheme.residual + max(DECODE_BATCH, self.scheme.group) - self.recent[0].shape[2]

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
