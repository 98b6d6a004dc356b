"""Reading and writing sizes: token counts such as ``32k``, byte amounts such as ``20GiB``, and memory caps;
and on/off options, which the command line gives as 1 and 0.

One parser each, used by the CLI, the benchmarks and the API, so ``1m`` means the
same thing everywhere: k and m are powers of two (``1m`` = 1,048,576 tokens).
"""

from __future__ import annotations

import math
import re

from headspace.errors import HeadspaceError

_TOKENS = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([km]?)", re.IGNORECASE)
_TOKEN_SCALE = {"": 1, "k": 2**10, "m": 2**20}
_BYTES = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?i?b?)", re.IGNORECASE)
_BYTE_SCALE = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_tokens(text: str) -> int:
    """A token count: ``4096``, ``32k`` (32,768), ``1m`` (1,048,576), ``1.5m``."""
    match = _TOKENS.fullmatch(str(text).strip().replace("_", ""))
    if not match:
        raise HeadspaceError(f"invalid token count '{text}' (examples: 4096, 32k, 1m)")
    value = float(match.group(1)) * _TOKEN_SCALE[match.group(2).lower()]
    if value != int(value) or value < 1:
        raise HeadspaceError(f"invalid token count '{text}': it must be a whole number of tokens, >= 1")
    return int(value)


def parse_bytes(text: str) -> int:
    """A byte amount: ``1000000``, ``512MiB``, ``20GiB``, ``20G``, ``1.5TiB`` (all binary units)."""
    match = _BYTES.fullmatch(str(text).strip().replace("_", ""))
    if not match:
        raise HeadspaceError(f"invalid size '{text}' (examples: 512MiB, 20GiB, 1.5TiB)")
    value = float(match.group(1)) * _BYTE_SCALE[(match.group(2)[:1] or "b").lower()]
    if value < 1:
        raise HeadspaceError(f"invalid size '{text}': it must be at least one byte")
    return int(value)


def parse_memory_cap(value: int | float | str) -> int | float:
    """A cap on memory: bytes, or a fraction of the whole in (0, 1].

    An ``int`` is bytes and a ``float`` a fraction. Text with a unit (``20GiB``) or a whole
    number above 1 (``21474836480``) is bytes; a bare number in (0, 1] (``0.5``, ``1``) is a
    fraction. A bare number above 1 that is not whole (``1.5``) is refused: it reads like
    gibibytes without the unit.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise HeadspaceError(f"invalid memory cap {value!r}: give bytes (20GiB) or a fraction in (0, 1] (0.5)")
    if isinstance(value, int):
        if value < 1:
            raise HeadspaceError(f"invalid memory cap {value}: bytes must be at least 1")
        return value
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise HeadspaceError(f"invalid memory cap {value}: a fraction must be in (0, 1]")
        return value
    text = value.strip().replace("_", "")
    try:
        number = float(text)
    except ValueError:
        try:
            return parse_bytes(text)
        except HeadspaceError:
            raise HeadspaceError(f"invalid memory cap '{value}': give bytes (20GiB, 512MiB) or a fraction in "
                                 f"(0, 1] of the device (0.5)") from None
    if 0 < number <= 1:
        return number
    if 1 < number < math.inf and number == int(number):
        return int(number)
    raise HeadspaceError(f"invalid memory cap '{value}': a bare number is a fraction in (0, 1] of the device; "
                         f"give bytes with a unit (examples: 20GiB, 0.5)")


def parse_switch(value: object, name: str) -> bool:
    """An on/off option: True or False, or 1 and 0 as the command line (``--option``, ``--setting``) gives them."""
    if value not in (True, False):
        raise HeadspaceError(f"{name} must be true or false (1 or 0), got {value!r}")
    return bool(value)


def human_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1 (``128.00 KiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
