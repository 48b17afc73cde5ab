"""signSGD with scale, and EF-signSGD (the same with error feedback).

Each bucket of values v is sent as one float32 scale ||v||_1 / len(v) and one sign bit per value
(1 for v_i >= 0), decoded as scale * (+-1): the scaled sign of Karimireddy et al. 2019, which keeps
the update's magnitude so that clients' weighted updates can be summed (not majority-voted).
Biased; "efsign" turns error feedback on, which is what makes it converge like SGD in that paper.

Payload (uint8): ceil(n / bucket) float32 scales, then ceil(n / 8) bytes of sign bits.
Bytes: 4 ceil(n / bucket) + ceil(n / 8); default bucket 512: 0.133 n, 30x fewer than dense.

Both directions run block by block (packing.bucket_blocks) so temporaries stay in cache; decoding
looks each byte up in a table of its 8 signs, then scales whole buckets. On the device (torch ops):
the same sign bits, and scales that may differ from the host's in the last bit (the sum of a bucket's
magnitudes in another order); decoding a payload gives the host's values bit for bit.
"""

from __future__ import annotations

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
    block_ranges, block_step, bucket_blocks, code_table, decode_target, row_dots,
)

#: Row b: the 8 values +-1 whose sign bits (1 for +1, first value in the low bit) make byte b.
SIGNS = code_table(1).astype(F32) * np.float32(2) - np.float32(1)
SIGNS.flags.writeable = False


@register_codec("sign")
@register_codec("efsign", error_feedback=True)
class ScaledSign(GatherCodec):
    """bucket: values per scale; default 512 (as QSGD's bucket). A scale costs 4 / bucket bytes per value;
    one scale for the whole vector would let large layers set the step of small ones.
    """

    def __init__(self, bucket: int = 512, *, error_feedback: bool | None = None):
        super().__init__(error_feedback=error_feedback)
        self.bucket = check_bucket(bucket, "sign")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "efsign" if self.error_feedback else "sign"

    def options(self) -> dict[str, Any]:
        return {"bucket": self.bucket, **super().options()}

    def _spec(self, n: int) -> list[tuple[np.dtype, int]]:
        return [(F32, math.ceil(n / self.bucket)), (np.dtype(np.uint8), math.ceil(n / 8))]

    def payload_nbytes(self, n: int) -> int:
        return parts_nbytes(self._spec(check_count(n)))

    def _counts(self, n: int) -> np.ndarray:
        counts = np.full(math.ceil(n / self.bucket), self.bucket, dtype=F32)
        counts[-1] = n - (counts.size - 1) * self.bucket
        return counts

    def encode(self, x: Any, ctx: RoundContext) -> np.ndarray:
        x = as_flat_f32(x)
        payload, (scales, bits) = empty_parts(self._spec(x.size))
        size = min(block_step(self.bucket), len(scales) * self.bucket)
        magnitude, positive = np.empty(size, F32), np.empty(size, bool)  # reused by every block
        ones = np.ones(self.bucket, F32)
        for start, stop, grid in bucket_blocks(x, self.bucket):
            work = magnitude[:grid.size].reshape(grid.shape)
            np.abs(grid, out=work)
            row = start // self.bucket
            row_dots(work, ones, out=scales[row: row + grid.shape[0]])
            mask = positive[:stop - start]
            np.greater_equal(x[start:stop], 0, out=mask)
            bits[start // 8: -(-stop // 8)] = np.packbits(mask, bitorder="little")
        scales /= self._counts(x.size)
        return payload

    on_device = True

    def encode_torch(self, x: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        counts = torch.from_numpy(self._counts(x.numel())).to(x.device)
        scales = tensors.bucket_rows(x.abs(), self.bucket).sum(dim=1) / counts
        return tensors.join_parts(scales, tensors.pack_codes((x >= 0).to(torch.uint8), 1))

    def decode_torch(self, payload: torch.Tensor, n: int, ctx: RoundContext) -> torch.Tensor:
        scales, bits = tensors.split_parts(payload, self._spec(n))
        signs = tensors.unpack_codes(bits, 1, n).to(torch.float32) * 2 - 1
        return (tensors.bucket_rows(signs, self.bucket) * scales[:, None]).reshape(-1)[:n]

    def validate(self, payload: np.ndarray, n: int, ctx: RoundContext) -> None:
        scales, _ = unpack_parts(payload, self._spec(n), self.name)
        check_finite(scales, f"{self.name} scales")
        if (scales < 0).any():
            raise PayloadError(f"{self.name} scale {float(scales.min())} is negative")

    def decode(self, payload: np.ndarray, n: int, ctx: RoundContext) -> np.ndarray:
        scales, bits = unpack_parts(payload, self._spec(n), self.name)
        out, total = decode_target(n, self.bucket)
        out[bits.size * 8:] = 0  # values past the last byte: padding of the last bucket
        for start, stop in block_ranges(total, self.bucket):
            chunk = bits[start // 8: -(-stop // 8)]
            np.take(SIGNS, chunk, axis=0, mode="clip", out=out[start: start + chunk.size * 8].reshape(-1, 8))
            grid = out[start:stop].reshape(-1, self.bucket)
            grid *= scales[start // self.bucket: stop // self.bucket, None]
        return out[:n]
