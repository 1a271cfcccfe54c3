"""Quantities with units, as they are written in profiles and on the command line ("8 GB", "68 GB/s").

Decimal prefixes are powers of 1000 (datasheets use them), binary ones (KiB, MiB, GiB) powers of 1024.
A bare number is refused: a profile figure without a unit is ambiguous.
"""

from __future__ import annotations

import re

_PREFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}

# kind -> (unit suffix after the prefix, multiplier to the base unit)
_KINDS = {
    "bytes": ("B", 1),              # base: bytes
    "bandwidth": ("B/s", 1),        # base: bytes per second
    "frequency": ("Hz", 1),         # base: hertz
    "ops": ("OPS", 1),              # base: operations per second (TOPS = 1e12)
    "power": ("W", 1),              # base: watts
}

_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?)?\s*(B/s|B|Hz|OPS|W)\s*$")


class UnitError(ValueError):
    """A quantity that is missing its unit or has the wrong one."""


def parse(text: str | int | float, kind: str) -> float:
    """Parse ``text`` (for example ``"68 GB/s"``) as a quantity of ``kind``; return it in base units.

    Raises:
        UnitError: when ``text`` is a bare number, has an unknown unit, or a unit of another kind.
    """
    suffix, scale = _KINDS[kind]
    if not isinstance(text, str):
        raise UnitError(f"{text!r} has no unit (expected a value in {suffix}, for example '8 G{suffix}')")
    match = _QUANTITY.match(text)
    if not match or match.group(3) != suffix:
        raise UnitError(f"{text!r} is not a quantity in {suffix} (for example '8 G{suffix}')")
    number, prefix, _ = match.groups()
    return float(number) * _PREFIX[prefix or ""] * scale


def parse_bytes(text: str | int | float) -> int:
    """``"8 GB"`` -> 8_000_000_000; ``"512 MiB"`` -> 536_870_912."""
    return int(round(parse(text, "bytes")))


def format_bytes(n: float) -> str:
    """Human-readable decimal size: 1_500_000_000 -> '1.50 GB'."""
    for prefix in ("T", "G", "M", "K"):
        if abs(n) >= _PREFIX[prefix]:
            return f"{n / _PREFIX[prefix]:.2f} {prefix}B"
    return f"{int(n)} B"
