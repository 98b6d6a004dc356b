"""KV precisions: how keys and values of one head are stored in fewer bits, and what that costs in bytes.

Every scheme turns a ``(..., tokens, head_dim)`` tensor into rows of bytes, one row of
:meth:`Scheme.width` bytes per token with its scales inside, and back. Rows of a fixed
width let the storage tiers (:mod:`headspace.kv.tiers`) keep quantized KV exactly as they
keep bfloat16 KV, as ``uint8`` tensors ``(batch, heads, tokens, width)``: blocks, spans,
copies and the staging double buffer work unchanged, and PCIe carries the small form.

* ``bf16``: the model's own dtype (bfloat16 on a GPU, float32 on a CPU): exact, nothing is quantized.
* ``fp8``: float8 e4m3 with one float16 scale per token and head (absolute maximum to 448).
* ``int8``: symmetric 8-bit integers with one float16 scale per token and head.
* ``int4`` (and ``int2``): KIVI's scheme (Liu et al., 2024). Keys have outlier channels, so they are
  quantized per channel over groups of :data:`GROUP` tokens; values per token over groups of
  :data:`GROUP` channels; both asymmetric (float16 scale and zero point) and packed several to a
  byte. A key group needs all its tokens, so the newest tokens stay in full precision
  (:attr:`Scheme.residual` of them at least) until a whole group beyond them has arrived.

Scales and zero points are float16, two bytes each: KV beyond float16's range (65,504) would not
round-trip, which no model's KV comes near. :meth:`Scheme.bytes_per_token` is the single source of
truth for the planner's arithmetic.
Everything is plain torch, so the same code runs on a CPU and on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # KIVI's group: tokens per key group, channels per value group
RESIDUAL = 64  # int4/int2: the newest tokens always kept in full precision
SCALE = torch.float16
TINY = 2.0**-14  # the smallest normal float16: scales never reach zero


@dataclass(frozen=True)
class Scheme:
    """One storage precision for KV. ``group``: tokens quantized together (rows are written in whole groups);
    ``residual``: the newest tokens always kept in full precision; ``exact``: stored as computed."""

    name: str
    group: int = 1
    residual: int = 0
    exact: bool = False

    def width(self, head_dim: int) -> int:
        """Bytes of one row: one token of one head's keys (or values), scales included."""
        raise NotImplementedError

    def bytes_per_token(self, head_dim: int, itemsize: int) -> int:
        """Bytes of one head's keys and values for one token, scales included (``itemsize``: the model's dtype)."""
        return 2 * (head_dim * itemsize if self.exact else self.width(head_dim))

    def quantize(self, x: torch.Tensor, keys: bool) -> torch.Tensor:
        """``x`` (..., n, D), n a multiple of :attr:`group`, as ``uint8`` rows (..., n, width)."""
        raise NotImplementedError

    def dequantize(self, rows: torch.Tensor, keys: bool, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows (..., n, width) back to (..., n, head_dim) in ``dtype``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Exact(Scheme):
    """Keys and values as the model computes them: the tiers hold the model's dtype, nothing is converted."""

    exact: bool = True

    def quantize(self, x: torch.Tensor, keys: bool) -> torch.Tensor:
        return x

    def dequantize(self, rows: torch.Tensor, keys: bool, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        return rows.to(dtype)


def _scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """Float16 scales (..., k) as bytes (..., 2k)."""
    return scale.to(SCALE).contiguous().view(torch.uint8)


def _scales(rows: torch.Tensor) -> torch.Tensor:
    """Bytes (..., 2k) back to float32 scales (..., k)."""
    return rows.contiguous().view(SCALE).float()


@dataclass(frozen=True)
class PerToken(Scheme):
    """One scale per token and head, symmetric: ``fp8`` (float8 e4m3) or ``int8``."""

    def width(self, head_dim: int) -> int:
        return head_dim + 2

    @property
    def _largest(self) -> float:
        return 448.0 if self.name == "fp8" else 127.0

    def quantize(self, x: torch.Tensor, keys: bool) -> torch.Tensor:
        x = x.float()
        scale = (x.abs().amax(-1, keepdim=True) / self._largest).clamp(min=TINY).to(SCALE)
        scaled = (x / scale.float()).clamp(-self._largest, self._largest)
        if self.name == "fp8":
            codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
        else:
            codes = scaled.round().to(torch.int8).view(torch.uint8)
        return torch.cat([codes, _scale_bytes(scale)], dim=-1)

    def dequantize(self, rows: torch.Tensor, keys: bool, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        codes = rows[..., :head_dim]
        values = codes.view(torch.float8_e4m3fn if self.name == "fp8" else torch.int8).float()
        return (values * _scales(rows[..., head_dim : head_dim + 2])).to(dtype)


@dataclass(frozen=True)
class Grouped(Scheme):
    """KIVI: ``bits``-bit asymmetric codes, keys per channel over token groups, values per token over channel
    groups, ``8 // bits`` codes to a byte."""

    bits: int = 4
    group: int = GROUP
    residual: int = RESIDUAL

    def _channel_group(self, head_dim: int) -> int:
        return min(self.group, head_dim)

    def _key_width(self, head_dim: int) -> int:
        blob = self.group * head_dim * self.bits // 8 + 4 * head_dim  # a group's codes, then scales and zeros
        return -(-blob // self.group)

    def _value_width(self, head_dim: int) -> int:
        return head_dim * self.bits // 8 + 4 * (head_dim // self._channel_group(head_dim))

    def width(self, head_dim: int) -> int:
        return max(self._key_width(head_dim), self._value_width(head_dim))

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        per = 8 // self.bits
        codes = codes.unflatten(-1, (-1, per))
        packed = codes[..., 0]
        for i in range(1, per):
            packed = packed | (codes[..., i] << (self.bits * i))
        return packed

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        mask = (1 << self.bits) - 1
        parts = [(packed >> (self.bits * i)) & mask for i in range(8 // self.bits)]
        return torch.stack(parts, dim=-1).flatten(-2)

    def _codes(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes of ``x`` with one (scale, zero) per slice along ``dim``, both float16."""
        levels = (1 << self.bits) - 1
        low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
        scale = ((high - low) / levels).clamp(min=TINY).to(SCALE)
        zero = low.to(SCALE)
        codes = ((x - zero.float()) / scale.float()).round().clamp(0, levels).to(torch.uint8)
        return codes, scale, zero

    def quantize(self, x: torch.Tensor, keys: bool) -> torch.Tensor:
        x = x.float()
        head_dim, width = x.shape[-1], self.width(x.shape[-1])
        if keys:
            groups = x.unflatten(-2, (-1, self.group))  # (..., n/G, G, D)
            codes, scale, zero = self._codes(groups, dim=-2)
            blob = torch.cat([self._pack(codes).flatten(-2), _scale_bytes(torch.cat([scale, zero], -2)).flatten(-2)],
                             dim=-1)
            blob = torch.nn.functional.pad(blob, (0, self.group * width - blob.shape[-1]))
            return blob.unflatten(-1, (self.group, width)).flatten(-3, -2)
        channels = x.unflatten(-1, (-1, self._channel_group(head_dim)))  # (..., n, D/Gc, Gc)
        codes, scale, zero = self._codes(channels, dim=-1)
        params = torch.cat([scale.squeeze(-1), zero.squeeze(-1)], dim=-1)  # (..., n, 2 D/Gc)
        row = torch.cat([self._pack(codes.flatten(-2)), _scale_bytes(params)], dim=-1)
        return torch.nn.functional.pad(row, (0, width - row.shape[-1]))

    def dequantize(self, rows: torch.Tensor, keys: bool, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        code_bytes = head_dim * self.bits // 8
        if keys:
            blob = rows.unflatten(-2, (-1, self.group)).flatten(-2)  # (..., n/G, G * width)
            codes = self._unpack(blob[..., : self.group * code_bytes].unflatten(-1, (self.group, code_bytes)))
            scale, zero = _scales(blob[..., self.group * code_bytes : self.group * code_bytes + 4 * head_dim]
                                  ).unflatten(-1, (2, head_dim)).unbind(-2)
            x = torch.addcmul(zero.unsqueeze(-2), codes.float(), scale.unsqueeze(-2))  # one pass: codes * scale + zero
            return x.flatten(-3, -2).to(dtype)
        count = head_dim // self._channel_group(head_dim)
        codes = self._unpack(rows[..., :code_bytes]).unflatten(-1, (count, -1))
        scale, zero = _scales(rows[..., code_bytes : code_bytes + 4 * count]).unflatten(-1, (2, count)).unbind(-2)
        return torch.addcmul(zero.unsqueeze(-1), codes.float(), scale.unsqueeze(-1)).flatten(-2).to(dtype)


SCHEMES: dict[str, Scheme] = {scheme.name: scheme for scheme in (
    Exact("bf16"), PerToken("fp8"), PerToken("int8"), Grouped("int4", bits=4), Grouped("int2", bits=2))}
# lose more than one needle in twelve against bf16 (the simulation: int2 0/12 where float32 had 8/12)
LOSSY = ("int2",)
