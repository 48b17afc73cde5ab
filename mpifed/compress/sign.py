"""signSGD with scale, and EF-signSGD (the same with error feedback).

Each bucket of values v is sent as one float32 scale ||v||_1 / len(v) and one sign bit per value
(1 for v_i >= 0), decoded as scale * (+-1): the scaled sign of Karimireddy et al. 2019, which keeps
the update's magnitude so that clients' weighted updates can be summed (not majority-voted).
Biased; "efsign" turns error feedback on, which is what makes it converge like SGD in that paper.

Payload (uint8): ceil(n / bucket) float32 scales, then ceil(n / 8) bytes of sign bits.
Bytes: 4 ceil(n / bucket) + ceil(n / 8); default bucket 512: 0.133 n, 30x fewer than dense.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mpifed.compress.base import (
    F32, GatherCodec, PayloadError, RoundContext, as_flat_f32, bucketed, check_bucket, check_count,
    check_finite, pack_parts, parts_nbytes, register_codec, unpack_parts,
)


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
        scales = (np.abs(bucketed(x, self.bucket)).sum(axis=1, dtype=np.float64) / self._counts(x.size))
        bits = np.packbits(x >= 0, bitorder="little")
        return pack_parts(scales.astype(F32), bits)

    def validate(self, payload: np.ndarray, n: int, ctx: RoundContext) -> None:
        scales, _ = unpack_parts(payload, self._spec(n), self.name)
        check_finite(scales, f"{self.name} scales")
        if (scales < 0).any():
            raise PayloadError(f"{self.name} scale {float(scales.min())} is negative")

    def decode(self, payload: np.ndarray, n: int, ctx: RoundContext) -> np.ndarray:
        scales, bits = unpack_parts(payload, self._spec(n), self.name)
        out = np.zeros(scales.size * self.bucket, dtype=F32)
        out[:n] = np.unpackbits(bits, count=n, bitorder="little")
        out *= np.float32(2)
        out -= np.float32(1)
        grid = out.reshape(scales.size, self.bucket)
        grid *= scales[:, None]
        return out[:n]
