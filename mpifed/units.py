"""Parse the human units a job file uses: bytes ("2GiB"), rates ("100Mbit/s"), durations ("5ms").

Numbers without a unit are taken as the base unit (bytes, bytes/s, seconds), so a resolved job
file, which stores plain numbers, reads back to the same values.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")

_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}

# Bits and bytes are case-sensitive (b = bit, B = byte), as in "100Mb/s" (megabits) against "100MB/s"
# (megabytes): lower-casing would read a link written the usual way 8x too fast. "bit" spelled out is
# unambiguous in any case, so tc's lower-case "mbit" and "gbit" are megabits and gigabits too.
_PREFIXES = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_BIT_WORD_PREFIXES = {"m": 1e6, "g": 1e9, "t": 1e12}
_DATA_UNIT = re.compile(r"^(?P<prefix>[kKMGT]i?|[mgt]|)(?P<base>B|b|bit)$", re.IGNORECASE)
_CASES = ("bits and bytes are case-sensitive: b or bit is a bit, B a byte, with the prefixes k, M, G, T "
          "(powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024)")


def _split(text: str | int | float, what: str) -> tuple[float, str]:
    if isinstance(text, bool) or (isinstance(text, float) and not math.isfinite(text)):
        raise ValueError(f"expected {what}, got {text!r}")
    if isinstance(text, (int, float)):
        return float(text), ""
    match = _NUMBER.match(str(text))
    if not match:
        raise ValueError(f"expected {what}, got {text!r}")
    return float(match.group(1)), match.group(2)


def _data_unit(unit: str, text, kind: str) -> tuple[float, bool]:
    """(bytes per unit, whether the unit counts bits) for '', 'B', 'KiB', 'Mb', 'Gbit', ...; a ValueError
    that says why for a unit whose case leaves bits and bytes in doubt ('mb', 'GIB') or that is unknown."""
    if unit == "":
        return 1.0, False
    match = _DATA_UNIT.match(unit)
    if not match:
        raise ValueError(f"unknown {kind} unit {unit!r} in {text!r}")
    prefix, base = match["prefix"], match["base"]
    if base.lower() == "bit" and prefix in _BIT_WORD_PREFIXES:
        return _BIT_WORD_PREFIXES[prefix] / 8, True
    if prefix not in _PREFIXES:  # 'mb', 'gB', 'GIB': bits or bytes, mega or milli?
        raise ValueError(f"ambiguous unit {unit!r} in {text!r}: {_CASES}")
    bits = base != "B"
    return _PREFIXES[prefix] / (8 if bits else 1), bits


def parse_bytes(text: str | int | float) -> int:
    """'2GiB' -> 2147483648; '512MB' -> 512000000; 1024 -> 1024. Bit units ('512Mb') are refused."""
    value, unit = _split(text, "a size such as '2GiB' or '512MB'")
    try:
        scale, bits = _data_unit(unit, text, "size")
    except ValueError as err:
        raise ValueError(f"{err}; use B, kB, MB, GB, KiB, MiB, GiB") from None
    if bits:
        raise ValueError(f"{text!r} is in bits (b); a size is in bytes (B): write e.g. '512MB' or '512MiB'")
    return int(value * scale)


def parse_rate(text: str | int | float) -> float:
    """'100Mbit/s' or '100Mb/s' -> 12.5e6 bytes/s; '1.5GB/s' -> 1.5e9 bytes/s; a number is bytes/s."""
    value, unit = _split(text, "a rate such as '100Mbit/s' or '1GB/s'")
    try:
        scale, _ = _data_unit(unit[:-2] if unit.endswith("/s") else unit, text, "rate")
    except ValueError as err:
        raise ValueError(f"{err}; use e.g. Mbit/s or Mb/s (megabits), MB/s (megabytes), Gbit/s, GB/s") from None
    return value * scale


def parse_seconds(text: str | int | float) -> float:
    """'5ms' -> 0.005; '2s' -> 2.0; a number is seconds."""
    value, unit = _split(text, "a duration such as '5ms' or '0.2s'")
    unit = unit.lower()  # no case ambiguity among s, ms, us, ns
    if unit not in _SECONDS:
        raise ValueError(f"unknown time unit {unit!r} in {text!r}; use s, ms, us or ns")
    return value * _SECONDS[unit]


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
