"""``kv_dtype``: the precision KV is stored in, per tier (the device and host RAM), parsed once.

Written ``int4`` (both tiers), ``host=int4`` (the offloaded heads only: resident heads stay
exact) or ``gpu=fp8,host=int4``; a tier left out stays ``bf16`` (exact).
"""

from __future__ import annotations

from dataclasses import dataclass

from headspace.errors import HeadspaceError
from headspace.kv.quant.schemes import LOSSY, SCHEMES, Scheme

TIERS = ("gpu", "host")
EXACT = "bf16"


def choices() -> str:
    """The precisions, in words, for help texts and errors."""
    return ", ".join(f"{name} (lossy)" if name in LOSSY else name for name in SCHEMES)


@dataclass(frozen=True)
class KVPrecision:
    """The scheme of each tier: ``gpu`` for heads resident on the device, ``host`` for offloaded heads."""

    gpu: str = EXACT
    host: str = EXACT

    def __post_init__(self) -> None:
        for tier in TIERS:
            if getattr(self, tier) not in SCHEMES:
                raise HeadspaceError(f"unknown KV precision '{getattr(self, tier)}' for the {tier} tier; choose from "
                                     f"{choices()}")

    @classmethod
    def parse(cls, value: str | KVPrecision | None) -> KVPrecision:
        """``None``/``bf16`` (exact), a scheme for both tiers (``int4``), or ``tier=scheme`` pairs separated by
        commas (``host=int4``, ``gpu=fp8,host=int4``)."""
        if value is None or isinstance(value, KVPrecision):
            return value or cls()
        if not isinstance(value, str):
            raise HeadspaceError(f"kv_dtype must be a string such as 'int4' or 'host=int4', got {value!r}")
        text = value.strip().lower()
        if "=" not in text:
            return cls(text, text) if text in SCHEMES else cls._refuse(value)
        tiers = {}
        for part in text.split(","):
            tier, _, scheme = (piece.strip() for piece in part.partition("="))
            if tier not in TIERS or tier in tiers or scheme not in SCHEMES:
                cls._refuse(value)
            tiers[tier] = scheme
        return cls(**tiers)

    @staticmethod
    def _refuse(value: str):
        raise HeadspaceError(f"invalid kv_dtype '{value}': give a precision for both tiers ({choices()}), or "
                             f"tier=precision pairs with tier gpu or host (host=int4, gpu=fp8,host=int4)")

    @property
    def exact(self) -> bool:
        return self.gpu == EXACT and self.host == EXACT

    def scheme(self, tier: str) -> Scheme:
        return SCHEMES[getattr(self, tier)]

    def __str__(self) -> str:
        if self.gpu == self.host:
            return self.gpu
        return ",".join(f"{tier}={getattr(self, tier)}" for tier in TIERS if getattr(self, tier) != EXACT)


EXACT_KV = KVPrecision()  # the default: every tier exact
