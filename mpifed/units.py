"""Parse the human units a job file uses: bytes ("2GiB"), rates ("100Mbit/s"), durations ("5ms").

Numbers without a unit are taken as the base unit (bytes, bytes/s, seconds), so a resolved job
file, which stores plain numbers, reads back to the same values.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")

_BYTES = {
    "": 1, "b": 1,
    "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _split(text: str | int | float, what: str) -> tuple[float, str]:
    if isinstance(text, bool) or (isinstance(text, float) and not math.isfinite(text)):
        raise ValueError(f"expected {what}, got {text!r}")
    if isinstance(text, (int, float)):
        return float(text), ""
    match = _NUMBER.match(str(text))
    if not match:
        raise ValueError(f"expected {what}, got {text!r}")
    return float(match.group(1)), match.group(2).lower()


def parse_bytes(text: str | int | float) -> int:
    """'2GiB' -> 2147483648; '512MB' -> 512000000; 1024 -> 1024."""
    value, unit = _split(text, "a size such as '2GiB' or '512MB'")
    if unit not in _BYTES:
        raise ValueError(f"unknown size unit {unit!r} in {text!r}; use B, KB, MB, GB, KiB, MiB, GiB")
    return int(value * _BYTES[unit])


def parse_rate(text: str | int | float) -> float:
    """'100Mbit/s' -> 12.5e6 bytes/s; '1.5GB/s' -> 1.5e9 bytes/s; a number is bytes/s."""
    value, unit = _split(text, "a rate such as '100Mbit/s' or '1GB/s'")
    per = unit[:-2] if unit.endswith("/s") else unit
    if per in _BITS:
        return value * _BITS[per]
    if per in _BYTES:
        return value * _BYTES[per]
    raise ValueError(f"unknown rate unit {unit!r} in {text!r}; use e.g. Mbit/s, Gbit/s, MB/s, GB/s")


def parse_seconds(text: str | int | float) -> float:
    """'5ms' -> 0.005; '2s' -> 2.0; a number is seconds."""
    value, unit = _split(text, "a duration such as '5ms' or '0.2s'")
    if unit not in _SECONDS:
        raise ValueError(f"unknown time unit {unit!r} in {text!r}; use s, ms, us or ns")
    return value * _SECONDS[unit]


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
