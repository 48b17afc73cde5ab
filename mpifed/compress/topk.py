"""Top-k sparsification: send the k largest-magnitude values and their indices (Aji & Heafield 2017).

k = ceil(density * n), at least 1. Biased (it always drops the small values), so error feedback is on
by default. Indices differ per client, so payloads cannot be added: they are gathered.

Payload (uint8): k indices (uint32, or uint64 when n > 2^32), ascending, then k float32 values.
Bytes: 8 k for n <= 2^32 -- at density 0.01 that is 0.08 n, 50x fewer than dense fp32's 4 n.
Time: one pass for candidates above a sampled threshold, an exact selection among them, a sort of k.
On the device: the same selection in torch ops; the same payload bits as the host's wherever the
k-th largest magnitude is not tied (a tie may keep either of the equal values: both are the top k).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mpifed.compress import tensors
from mpifed.compress.base import (
    F32, GatherCodec, PayloadError, RoundContext, as_flat_f32, check_count, check_finite, pack_parts,
    parts_nbytes, register_codec, unpack_parts,
)


def index_dtype(n: int) -> np.dtype:
    """uint32 while every index fits (n <= 2^32), else uint64."""
    return np.dtype(np.uint32) if n <= 2**32 else np.dtype(np.uint64)


def check_indices(idx: np.ndarray, n: int, what: str) -> None:
    """Indices must lie in [0, n) and ascend strictly (which also rules out duplicates)."""
    if idx.size and int(idx.max()) >= n:
        raise PayloadError(f"{what} index {int(idx.max())} is out of range for n = {n}")
    if idx.size > 1 and not (np.diff(idx.astype(np.int64)) > 0).all():
        raise PayloadError(f"{what} indices are not strictly ascending (duplicate or unsorted index)")


SAMPLE = 100_000  # values in the strided sample that guesses the top-k threshold


def top_indices(mag: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of `mag` (unordered): exact, not approximate.

    A full selection (argpartition) over n values costs ~100 ms for n = 11M on this CPU. Instead a
    strided sample of SAMPLE values gives a threshold a little below the k-th largest; the exact
    selection then runs on the ~1.3 k candidates above it (3x faster measured). If the sample guessed
    too high (fewer than k candidates) or mag is not finite, the full selection runs.
    """
    n = mag.size
    if k >= n:
        return np.arange(n)
    if n > 4 * SAMPLE and np.isfinite(mag.sum(dtype=np.float64)):
        sample = mag[::n // SAMPLE]
        expected = k * sample.size / n
        above = min(sample.size, math.ceil(1.3 * expected + 4 * math.sqrt(expected) + 1))
        threshold = np.partition(sample, sample.size - above)[sample.size - above]
        candidates = np.flatnonzero(mag >= threshold)
        if candidates.size >= k:
            return candidates[np.argpartition(mag[candidates], candidates.size - k)[candidates.size - k:]]
    return np.argpartition(mag, n - k)[n - k:]


def top_indices_tensor(mag: torch.Tensor, k: int) -> torch.Tensor:
    """`top_indices` in torch ops, on mag's device: the same sampled threshold, then torch.topk among the
    candidates (5x faster than torch.topk over all n on this CPU: 48 ms against 240 ms for resnet18)."""
    n = mag.numel()
    if k >= n:
        return torch.arange(n, device=mag.device)
    if n > 4 * SAMPLE and bool(torch.isfinite(mag.sum())):
        sample = mag[:: n // SAMPLE]
        expected = k * sample.numel() / n
        above = min(sample.numel(), math.ceil(1.3 * expected + 4 * math.sqrt(expected) + 1))
        threshold = torch.kthvalue(sample, sample.numel() - above + 1).values
        candidates = torch.nonzero(mag >= threshold).squeeze(1)
        if candidates.numel() >= k:
            return candidates[torch.topk(mag[candidates], k, sorted=False).indices]
    return torch.topk(mag, k, sorted=False).indices


@register_codec("topk")
class TopK(GatherCodec):
    """density: fraction of values sent, in (0, 1]; default 0.01 (1%), the benchmarks' point."""

    name = "topk"
    error_feedback_default = True

    def __init__(self, density: float = 0.01, *, error_feedback: bool | None = None):
        super().__init__(error_feedback=error_feedback)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"topk density is the fraction of values sent and must be in (0, 1], got {density}")
        self.density = float(density)

    def options(self) -> dict[str, Any]:
        return {"density": self.density, **super().options()}

    def count(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.density * n)))

    def _spec(self, n: int) -> list[tuple[np.dtype, int]]:
        k = self.count(n)
        return [(index_dtype(n), k), (F32, k)]

    def payload_nbytes(self, n: int) -> int:
        return parts_nbytes(self._spec(check_count(n)))

    def encode(self, x: Any, ctx: RoundContext) -> np.ndarray:
        x = as_flat_f32(x)
        idx = np.sort(top_indices(np.abs(x), self.count(x.size))).astype(index_dtype(x.size))
        return pack_parts(idx, x[idx])

    on_device = True

    def encode_torch(self, x: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        n = x.numel()
        idx = top_indices_tensor(x.abs(), self.count(n)).sort().values
        raw = tensors.as_bytes(idx) if index_dtype(n).itemsize == 8 else tensors.uint32_bytes(idx)
        return torch.cat([raw, tensors.as_bytes(x[idx])])

    def decode_torch(self, payload: torch.Tensor, n: int, ctx: RoundContext) -> torch.Tensor:
        k, wide = self.count(n), index_dtype(n).itemsize == 8
        raw, values = tensors.split_parts(payload, [(np.dtype(np.uint8), (8 if wide else 4) * k), (F32, k)])
        idx = raw.view(torch.int64) if wide else tensors.uint32_values(raw)
        return torch.zeros(n, dtype=torch.float32, device=payload.device).index_put_((idx,), values)

    def validate(self, payload: np.ndarray, n: int, ctx: RoundContext) -> None:
        idx, values = unpack_parts(payload, self._spec(n), "topk")
        check_indices(idx, n, "topk")
        check_finite(values, "topk values")

    def decode(self, payload: np.ndarray, n: int, ctx: RoundContext) -> np.ndarray:
        idx, values = unpack_parts(payload, self._spec(n), "topk")
        out = np.zeros(n, dtype=F32)
        out[idx] = values
        return out

    def decode_add(self, payload: np.ndarray, n: int, ctx: RoundContext, total: np.ndarray,
                   squares: np.ndarray | None = None, weight: float = 1.0) -> None:
        """O(k), not O(n): the indices are unique (validate checks), so fancy-index += is exact."""
        idx, values = unpack_parts(payload, self._spec(n), "topk")
        total[idx] += values
        if squares is not None:
            squares[idx] += np.square(values) / np.float32(weight)
