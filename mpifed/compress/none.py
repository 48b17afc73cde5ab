"""No compression: the float32 update itself, summed by MPI. The reference every codec is measured against.

Bytes: 4 n per client per round.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpifed.compress.base import (
    F32, Exchanged, OneShotReduce, Phases, RoundContext, as_flat_f32, check_count, check_finite,
    check_reduce_payload, register_codec,
)


@register_codec("none")
class Dense(OneShotReduce):
    name = "none"

    def payload_nbytes(self, n: int) -> int:
        return 4 * check_count(n)

    def encode(self, x: Any, ctx: RoundContext) -> np.ndarray:
        return as_flat_f32(x).copy()

    def validate(self, payload: np.ndarray, n: int, ctx: RoundContext) -> None:
        check_finite(check_reduce_payload(payload, F32, n, "none"), "none payload")

    def decode(self, payload: np.ndarray, n: int, ctx: RoundContext) -> np.ndarray:
        return np.asarray(payload, dtype=F32).copy()

    on_device = True

    def encode_tensor(self, x, ctx):
        return x  # the update is its own payload: no copy

    def decode_tensor(self, payload, n, ctx):
        return payload

    def phases(self, x: Any, ctx: RoundContext, keep_own: bool = False) -> Phases:
        """The update is its own payload, summed where it lies: MPI's reduce leaves a client's buffer as
        it is and sums into the root's, so no encode or decode copies an n-sized array each round."""
        x = as_flat_f32(x)
        total = yield x
        if total is not None:
            self.validate(total, x.size, ctx)
        return Exchanged(total, x if keep_own else None)
