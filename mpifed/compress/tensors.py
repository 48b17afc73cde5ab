"""Payload bytes built and read with torch ops, on whatever device the update lies (the on-device codecs).

A payload made here has the byte layout of its codec's host payload (typed parts end to end, native
byte order, codes packed first-in-low-bits as mpifed.compress.packing packs them), so the server's
host-side validation and decoding read either one. Everything is one vectorised op per step: no
Python loop over blocks, which on a GPU would cost a kernel launch each.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.uint8): torch.uint8,
                 np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
                 np.dtype(np.uint64): torch.int64}  # indices below 2^63: the same bits


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as uint8 (a view, no copy)."""
    return t.contiguous().view(torch.uint8)


def join_parts(*parts: torch.Tensor) -> torch.Tensor:
    """Typed 1-D tensors end to end as one uint8 payload (packing's pack_parts, on the device)."""
    return torch.cat([as_bytes(p.reshape(-1)) for p in parts])


def split_parts(payload: torch.Tensor, spec: Sequence[tuple[np.dtype, int]]) -> list[torch.Tensor]:
    """Typed views of a uint8 payload per `spec` [(dtype, count), ...] (the codec's own _spec). Every
    codec's parts start at a multiple of their item size, as a typed view needs."""
    out, offset = [], 0
    for dt, count in spec:
        size = np.dtype(dt).itemsize * count
        piece = payload[offset: offset + size]
        out.append(piece if np.dtype(dt) == np.uint8 else piece.view(_TORCH_DTYPES[np.dtype(dt)]))
        offset += size
    return out


def uint32_bytes(indices: torch.Tensor) -> torch.Tensor:
    """int64 indices below 2^32 as the bytes of uint32 values: each one's low 4 bytes (little endian)."""
    return as_bytes(indices.to(torch.int64)).view(-1, 8)[:, :4].reshape(-1)


def uint32_values(raw: torch.Tensor) -> torch.Tensor:
    """Inverse of uint32_bytes: uint8 bytes of uint32 values as int64."""
    return raw.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def bucket_rows(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """x as (ceil(n / bucket), bucket) rows, the last one zero-padded (a view when n fills the rows)."""
    rows = math.ceil(x.numel() / bucket)
    pad = rows * bucket - x.numel()
    return (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(rows, bucket)


def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 codes (each < 2**width; width 1, 2, 4 or 8) packed into bytes, the first code in the low bits."""
    if width == 8:
        return codes.to(torch.uint8)
    per = 8 // width
    pad = -codes.numel() % per
    grid = torch.nn.functional.pad(codes.to(torch.int32), (0, pad)).view(-1, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * width
    return (grid << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of pack_codes: the first `count` codes, as int32."""
    if width == 8:
        return packed[:count].to(torch.int32)
    per = 8 // width
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * width
    return ((packed.to(torch.int32)[:, None] >> shifts) & (2**width - 1)).reshape(-1)[:count]


def generator_for(rng: np.random.Generator, device: torch.device) -> torch.Generator:
    """A torch generator on `device`, seeded from the codec's own numpy stream (same key, same run)."""
    return torch.Generator(device=device).manual_seed(int(rng.integers(0, 2**63 - 1)))
