"""Fixed-width code packing and the cache-sized blocks the bucketed codecs (QSGD, sign) loop over.

Why blocks: a codec pass over the whole update streams n float32 values through memory (resnet18:
45 MB, several ms per pass on this CPU, plus page faults for each fresh temporary). Done one block of
whole buckets at a time, the temporaries stay in a core's L2 cache (2 MiB here) and are reused, so
only the input and the payload touch memory; the Python loop costs ~n / BLOCK_VALUES iterations.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np

U8 = np.dtype(np.uint8)

#: Values per block: 64 Ki values make 256 KiB float32 temporaries, a few of which fit a 2 MiB L2
#: cache; measured on resnet18's update, 2^15 to 2^17 were within noise of each other, 2^14 slower.
BLOCK_VALUES = 1 << 16

_PACK_WIDTHS = (1, 2, 4, 8)


def pack_width(max_code: int) -> int:
    """Smallest width in bits from (1, 2, 4, 8) that holds codes 0..max_code.

    Widths divide 8 so that packing is a reshape and a few shifts; a code alphabet that needs 3 bits
    is stored in 4 (the codec's payload_nbytes says so).
    """
    for width in _PACK_WIDTHS:
        if max_code < 2**width:
            return width
    raise ValueError(f"codes up to {max_code} do not fit in 8 bits")


def packed_nbytes(count: int, width: int) -> int:
    return math.ceil(count * width / 8)


def pack_uint(codes: np.ndarray, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Pack uint8 codes (each < 2**width) into bytes, first code in the low bits; width in (1, 2, 4, 8).

    Writes into `out` (packed_nbytes(codes.size, width) bytes) when given. The codes of one byte are
    read as one little-endian word and shifted together, rather than as strided slices (4x slower).
    """
    codes = np.ascontiguousarray(codes, dtype=U8)
    if out is None:
        out = np.empty(packed_nbytes(codes.size, width), dtype=U8)
    if width == 8:
        out[:] = codes
        return out
    if width == 1:
        out[:] = np.packbits(codes, bitorder="little")
        return out
    per = 8 // width
    if codes.size % per:  # the last byte's unused codes are zeros
        codes = np.concatenate([codes, np.zeros(per - codes.size % per, dtype=U8)])
    words = codes.view(f"<u{per}")
    acc = words >> np.uint8(8 - width)  # code j sits at bit 8j of the word and belongs at bit j * width
    acc |= words
    for j in range(2, per):
        acc |= words >> np.uint8(j * (8 - width))
    np.copyto(out, acc, casting="unsafe")  # keeps each word's low byte
    return out


@functools.lru_cache(maxsize=None)
def code_table(width: int) -> np.ndarray:
    """(256, 8 // width) uint8: row b holds the codes packed in byte b, first code first (read-only)."""
    per = 8 // width
    shifts = np.arange(per, dtype=U8) * np.uint8(width)
    table = (np.arange(256, dtype=U8)[:, None] >> shifts) & np.uint8(2**width - 1)
    table.flags.writeable = False
    return table


def unpack_uint(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of pack_uint: the first `count` codes as uint8 (one table lookup per byte)."""
    packed = np.asarray(packed, dtype=U8)
    if width == 8:
        return packed[:count]
    if width == 1:
        return np.unpackbits(packed, count=count, bitorder="little")
    return np.take(code_table(width), packed, axis=0, mode="clip").reshape(-1)[:count]


def row_dots(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[i] = a[i] . b[i] (b may be one row for all): numpy 2's vecdot, ~1.6x faster here than
    einsum and ~2.5x faster than sum(axis=1); einsum where numpy is older."""
    if hasattr(np, "vecdot"):
        return np.vecdot(a, b, out=out)
    return np.einsum("ij,ij->i" if b.ndim == 2 else "ij,j->i", a, b, out=out)


def block_step(bucket: int) -> int:
    """Values per block: whole buckets and a multiple of 8 values (so a block's codes at any width
    fill whole bytes), near BLOCK_VALUES; more only when 8 buckets alone exceed it."""
    unit = bucket * 8 // math.gcd(bucket, 8)
    return unit * max(1, BLOCK_VALUES // unit)


def block_ranges(total: int, bucket: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of block_step(bucket) values (the last may be shorter) covering 0..total."""
    step = block_step(bucket)
    for start in range(0, total, step):
        yield start, min(start + step, total)


def bucket_blocks(x: np.ndarray, bucket: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, grid) per block of x: grid is x[start:stop] as (buckets, bucket) rows.

    A view of x, except for a last partial bucket, which is zero-padded in a copy of that block.
    """
    for start, stop in block_ranges(x.size, bucket):
        part = x[start:stop]
        rows = -(-part.size // bucket)
        if rows * bucket != part.size:
            padded = np.zeros(rows * bucket, dtype=x.dtype)
            padded[:part.size] = part
            part = padded
        yield start, stop, part.reshape(rows, bucket)


def decode_target(n: int, bucket: int) -> tuple[np.ndarray, int]:
    """(out, total): a float32 buffer for decoding n bucketed values, and total = whole buckets' length.

    out holds total values rounded up to a multiple of 8, so a block's table lookups may write whole
    bytes' worth of codes; decoders return out[:n].
    """
    total = math.ceil(n / bucket) * bucket
    return np.empty(-(-total // 8) * 8, dtype=np.float32), total
