"""Random-k sparsification with shared indices: summable, so it travels by MPI Reduce.

Every rank draws the same k = ceil(density * n) indices from the round's shared stream
(RoundContext.shared_rng, keyed by seed and round), so only the k float32 values travel and the
payloads of all clients add up elementwise. With unbiased=True the server scales by n/k, making
E[decode(encode(x))] = x over the index draw (Stich et al. 2018; Wangni et al. 2018).

Bytes: 4 k per client per round (no indices). Time: drawing k of n without replacement and a sort.
On the device the indices are drawn the same way on the host (k int64: 8 k bytes to the device, not
the update's 4 n) and the values gathered and scattered there: the same payload bits as the host's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mpifed.compress.base import (
    F32, OneShotReduce, RoundContext, as_flat_f32, check_count, check_finite, check_reduce_payload,
    register_codec,
)


@register_codec("randomk")
class RandomK(OneShotReduce):
    """density: fraction of values sent, in (0, 1]; default 0.01 (1%), the same point as top-k.

    unbiased: scale the kept values by n/k on decode (default True, so the codec needs no error
    feedback). With error feedback set unbiased=False: the n/k scale would make the residual grow.
    """

    name = "randomk"

    def __init__(self, density: float = 0.01, unbiased: bool = True, *, error_feedback: bool | None = None):
        super().__init__(error_feedback=error_feedback)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"randomk density is the fraction of values sent and must be in (0, 1], got {density}")
        if unbiased and self.error_feedback:
            raise ValueError("randomk with error_feedback=true needs unbiased=false: the n/k rescale of an "
                             "unbiased random-k makes the error-feedback residual grow without bound")
        self.density, self.unbiased = float(density), bool(unbiased)
        self._drawn: tuple = (None, None)  # (device, n, seed, round), its indices on that device

    def options(self) -> dict[str, Any]:
        return {"density": self.density, "unbiased": self.unbiased, **super().options()}

    def count(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.density * n)))

    def indices(self, n: int, ctx: RoundContext) -> np.ndarray:
        """The round's k indices, identical on every rank (ascending)."""
        k = self.count(n)
        return np.sort(ctx.shared_rng("randomk").choice(n, size=k, replace=False))

    def payload_nbytes(self, n: int) -> int:
        return 4 * self.count(check_count(n))

    def encode(self, x: Any, ctx: RoundContext) -> np.ndarray:
        x = as_flat_f32(x)
        return x[self.indices(x.size, ctx)]

    on_device = True

    def _indices_on(self, device: torch.device, n: int, ctx: RoundContext) -> torch.Tensor:
        """The round's indices as a tensor on `device`, drawn once for a round's encode and decode."""
        key = (device, n, ctx.seed, ctx.round)
        if self._drawn[0] != key:
            self._drawn = (key, torch.from_numpy(self.indices(n, ctx)).to(device))
        return self._drawn[1]

    def encode_torch(self, x: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        return x[self._indices_on(x.device, x.numel(), ctx)]

    def decode_torch(self, payload: torch.Tensor, n: int, ctx: RoundContext) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.float32, device=payload.device)
        scale = torch.tensor(n / self.count(n) if self.unbiased else 1.0, dtype=torch.float32, device=payload.device)
        return out.index_put_((self._indices_on(payload.device, n, ctx),), payload * scale)

    def validate(self, payload: np.ndarray, n: int, ctx: RoundContext) -> None:
        check_finite(check_reduce_payload(payload, F32, self.count(n), "randomk"), "randomk payload")

    def decode(self, payload: np.ndarray, n: int, ctx: RoundContext) -> np.ndarray:
        out = np.zeros(n, dtype=F32)
        scale = np.float32(n / self.count(n)) if self.unbiased else np.float32(1.0)
        out[self.indices(n, ctx)] = np.asarray(payload, dtype=F32) * scale
        return out
