"""Error feedback (residual memory): what a biased codec dropped this round is added to the next update.

Karimireddy et al. 2019 ("Error feedback fixes SignSGD and other gradient compression schemes"):
with e_0 = 0, a client sends C(u_t + e_t) and keeps e_{t+1} = (u_t + e_t) - C(u_t + e_t), so nothing
is lost, only delayed. One object per client; it costs 4 n bytes of client memory (one float32 per
parameter). Use it as

    xc = feedback.compensate(u)
    payload = codec.encode(xc, ctx)                 # or codec.exchange(xc, ..., keep_own=True)
    feedback.update(xc, codec.decode(payload, n, ctx))   # or the exchange's `own`
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpifed.compress.base import as_flat_f32, check_count


class ErrorFeedback:
    def __init__(self, n: int, residual: np.ndarray | None = None):
        """A zero residual of n values, or `residual` itself (a pooled client's, kept by its worker)."""
        self.residual = np.zeros(check_count(n), dtype=np.float32) if residual is None else residual

    def compensate(self, x: Any) -> np.ndarray:
        """The update plus everything dropped so far (a new array; x is not modified)."""
        x = as_flat_f32(x)
        if x.size != self.residual.size:
            raise ValueError(f"update has {x.size} values but this error feedback holds {self.residual.size}")
        return x + self.residual

    def update(self, compensated: np.ndarray, transmitted: np.ndarray) -> None:
        """Keep what was dropped: the compensated update minus what the server will see of it.
        A non-finite residual (a diverged step, a payload the server cannot use) is dropped, not
        kept: carried on, it would spoil every later round of this client."""
        compensated, transmitted = as_flat_f32(compensated), as_flat_f32(transmitted)
        if compensated.shape != self.residual.shape or transmitted.shape != self.residual.shape:
            raise ValueError(f"error feedback holds {self.residual.size} values; got {compensated.size} "
                             f"compensated and {transmitted.size} transmitted")
        np.subtract(compensated, transmitted, out=self.residual)
        if not np.isfinite(self.residual.sum()):  # one pass; any NaN or inf makes the sum non-finite
            self.reset()

    def reset(self) -> None:
        self.residual.fill(0.0)
