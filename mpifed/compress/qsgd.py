"""QSGD: stochastic quantization to s levels per bucket (Alistarh et al. 2017), unbiased.

Each bucket of `bucket` values v is sent as its L2 norm (float32) and, per value, a level
l_i = floor(s v_i / ||v|| + u_i) in {-s..s}, u_i ~ U[0, 1) from the client's own stream
(RoundContext.rng): E[l_i] = s v_i / ||v||, and l_i has the sign of v_i (stochastic rounding of
the signed value has the same law as the paper's sign(v_i) times the rounded |v_i|). Decoded
v_i = ||v|| l_i / s: unbiased, each value within ||v|| / s of the truth, variance at most
min(bucket / s^2, sqrt(bucket) / s) ||v||^2.

Payload (uint8): ceil(n / bucket) float32 norms, then the codes l_i + s in {0..2s}, packed at
w bits each, w the smallest of 2, 4, 8 that holds 2s + 1 codes (s = 1: 2 bits, s <= 7: 4, s <= 127: 8).
Bytes: 4 ceil(n / bucket) + ceil(n w / 8). Default s = 7, bucket = 512: 0.508 n bytes, 7.9x fewer than
dense (the paper's 4-bit, bucket-512 setting). No Elias coding: fixed width keeps decode a table lookup.

Speed (the budget is 10% of a training step for encode + decode): both run block by block
(packing.bucket_blocks) so temporaries stay in cache, and the rounding is one float32 add: s + u_i is
made by writing random bits into the mantissa of float32(s) (23 - floor(log2 s) bits, all the
resolution a float32 sum near s keeps), so code = trunc(s v_i / ||v|| + (s + u_i)).

On the device (torch ops, one pass each): the u_i come from a torch generator on that device seeded
from the client's stream, so its codes are drawn as the host's are but are not the host's bits (the
codec is as unbiased; a run is reproduced on the same kind of device). Decoding a payload gives the
host's values bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from mpifed.compress import tensors
from mpifed.compress.base import (
    F32, GatherCodec, PayloadError, RoundContext, as_flat_f32, check_bucket, check_count, check_finite,
    empty_parts, parts_nbytes, register_codec, unpack_parts,
)
from mpifed.compress.packing import (
    block_ranges, block_step, bucket_blocks, code_table, decode_target, pack_uint, pack_width,
    packed_nbytes, row_dots, unpack_uint,
)

U32 = np.dtype(np.uint32)


@register_codec("qsgd")
class QSGD(GatherCodec):
    """levels: s, quantization levels per sign, 1..127; default 7 (4-bit codes, QSGD's 4-bit setting).

    bucket: values per norm; default 512 (QSGD paper). Smaller buckets cut the variance and cost
    4 / bucket more bytes per value.
    """

    name = "qsgd"

    def __init__(self, levels: int = 7, bucket: int = 512, *, error_feedback: bool | None = None):
        super().__init__(error_feedback=error_feedback)
        if isinstance(levels, bool) or int(levels) != levels or not 1 <= levels <= 127:
            raise ValueError(f"qsgd levels (s) must be an integer in 1..127 so codes fit a byte, got {levels!r}")
        self.levels = int(levels)
        self.bucket = check_bucket(bucket, "qsgd")
        self.width = pack_width(2 * self.levels)

    def options(self) -> dict[str, Any]:
        return {"levels": self.levels, "bucket": self.bucket, **super().options()}

    def _spec(self, n: int) -> list[tuple[np.dtype, int]]:
        return [(F32, math.ceil(n / self.bucket)), (np.dtype(np.uint8), packed_nbytes(n, self.width))]

    def payload_nbytes(self, n: int) -> int:
        return parts_nbytes(self._spec(check_count(n)))

    def encode(self, x: Any, ctx: RoundContext) -> np.ndarray:
        x = as_flat_f32(x)
        s, w = self.levels, self.width
        payload, (norms, packed) = empty_parts(self._spec(x.size))
        rng = ctx.rng("qsgd")
        # float32(s) has zeros in its low 23 - e mantissa bits; OR-ing random bits there gives s + u.
        e = s.bit_length() - 1
        shift, s_bits = np.uint32(9 + e), np.array(s, F32).view(U32)
        size = min(block_step(self.bucket), len(norms) * self.bucket)
        scaled, codes = np.empty(size, F32), np.empty(size, np.uint8)  # reused by every block
        for start, stop, grid in bucket_blocks(x, self.bucket):
            rows, count = grid.shape[0], stop - start
            norm = norms[start // self.bucket: start // self.bucket + rows]
            row_dots(grid, grid, out=norm)
            np.sqrt(norm, out=norm)
            work = scaled[:grid.size].reshape(grid.shape)
            np.multiply(grid, (np.float32(s) / np.where(norm > 0, norm, np.float32(1)))[:, None], out=work)
            noise = rng.integers(0, 2**64 - 1, size=-(-grid.size // 2), dtype=np.uint64,
                                 endpoint=True).view(U32)[:grid.size]
            noise >>= shift
            noise |= s_bits
            work += noise.view(F32).reshape(grid.shape)
            # work is in [0, 2s + 1) up to float rounding at either end: trunc is floor (and makes
            # -0.x a 0); a value rounded up to 2s + 1 is rare, so look (a fast max) before clamping.
            code = codes[:count]
            np.copyto(code, work.reshape(-1)[:count], casting="unsafe")
            if code.max() > 2 * s:
                np.minimum(code, np.uint8(2 * s), out=code)
            pack_uint(code, w, out=packed[start * w // 8: packed_nbytes(stop, w)])
        return payload

    on_device = True

    def encode_torch(self, x: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        s, n = self.levels, x.numel()
        rows = tensors.bucket_rows(x, self.bucket)
        norms = rows.square().sum(dim=1).sqrt()
        scale = torch.tensor(np.float32(s), device=x.device) / torch.where(norms > 0, norms, 1.0)
        noise = torch.rand(rows.shape, generator=tensors.generator_for(ctx.rng("qsgd"), x.device), device=x.device)
        codes = (rows * scale[:, None] + (noise + s)).floor_().clamp_(0, 2 * s).reshape(-1)[:n]
        return tensors.join_parts(norms, tensors.pack_codes(codes.to(torch.uint8), self.width))

    def decode_torch(self, payload: torch.Tensor, n: int, ctx: RoundContext) -> torch.Tensor:
        norms, packed = tensors.split_parts(payload, self._spec(n))
        levels = tensors.unpack_codes(packed, self.width, n).to(torch.float32) - self.levels
        steps = norms / torch.tensor(np.float32(self.levels), device=payload.device)
        return (tensors.bucket_rows(levels, self.bucket) * steps[:, None]).reshape(-1)[:n]

    def validate(self, payload: np.ndarray, n: int, ctx: RoundContext) -> None:
        norms, packed = unpack_parts(payload, self._spec(n), "qsgd")
        check_finite(norms, "qsgd norms")
        if (norms < 0).any():
            raise PayloadError(f"qsgd norm {float(norms.min())} is negative")
        if self._max_code(packed, n) > 2 * self.levels:
            worst = int(unpack_uint(packed, self.width, n).max())
            raise PayloadError(f"qsgd code {worst} is out of range 0..{2 * self.levels} for s = {self.levels}")

    def _max_code(self, packed: np.ndarray, n: int) -> int:
        """Largest of the n codes, field by field over whole bytes (no unpacked copy), then the last
        byte's real codes (its padding is ignored, as decode ignores it)."""
        w, per = self.width, 8 // self.width
        full = packed[:n // per]
        mask = np.uint8(2**w - 1)
        fields = [(full >> np.uint8(j * w)) & mask for j in range(per)] if per > 1 else [full]
        tail = unpack_uint(packed[n // per:], w, n % per)
        return max([int(f.max(initial=0)) for f in fields] + [int(tail.max(initial=0))])

    def decode(self, payload: np.ndarray, n: int, ctx: RoundContext) -> np.ndarray:
        norms, packed = unpack_parts(payload, self._spec(n), "qsgd")
        w, per = self.width, 8 // self.width
        out, total = decode_target(n, self.bucket)
        out[packed.size * per:] = 0  # values past the last byte's codes: padding of the last bucket
        steps = norms / np.float32(self.levels)
        for start, stop in block_ranges(total, self.bucket):
            chunk = packed[start * w // 8: packed_nbytes(stop, w)]
            np.take(self._level_values, chunk, axis=0, mode="clip",
                    out=out[start: start + chunk.size * per].reshape(-1, per))
            grid = out[start:stop].reshape(-1, self.bucket)
            grid *= steps[start // self.bucket: stop // self.bucket, None]
        return out[:n]

    @functools.cached_property
    def _level_values(self) -> np.ndarray:
        """(256, 8 // width) float32: the levels code - s held by each byte, for one-lookup decoding."""
        return code_table(self.width).astype(F32) - np.float32(self.levels)
