"""Error feedback (residual memory): what a biased codec dropped this round is added to the next update.

Karimireddy et al. 2019 ("Error feedback fixes SignSGD and other gradient compression schemes"):
with e_0 = 0, a client sends C(u_t + e_t) and keeps e_{t+1} = (u_t + e_t) - C(u_t + e_t), so nothing
is lost, only delayed. One object per client; it costs 4 n bytes of client memory (one float32 per
parameter). Use it as

    xc = feedback.compensate(u)
    payload = codec.encode(xc, ctx)                 # or codec.exchange(xc, ..., keep_own=True)
    feedback.update(xc, codec.decode(payload, n, ctx))   # or the exchange's `own`

On a data plane that encodes where the update lies (mpifed.protocol's direct path), the residual is a
tensor there too (`on`, `update_tensor`): a CPU tensor shares the array's memory; on an accelerator it
is copied there at its first use and kept there, and `host()` brings it back for a checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mpifed.compress.base import as_flat_f32, check_count


class ErrorFeedback:
    def __init__(self, n: int, residual: np.ndarray | None = None):
        """A zero residual of n values, or `residual` itself (a pooled client's, kept by its worker)."""
        self.residual = np.zeros(check_count(n), dtype=np.float32) if residual is None else residual
        self._kept: torch.Tensor | None = None  # the residual on an accelerator, once it lives there

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

    def on(self, device: torch.device) -> torch.Tensor:
        """The residual as a tensor on `device`, where it stays from now on (see the module docstring).
        A resumed residual is loaded into `residual` before the first round, so before this copy."""
        if device.type == "cpu":
            return torch.from_numpy(self.residual)
        if self._kept is None or self._kept.device != device:
            self._kept = torch.from_numpy(self.residual).to(device)
        return self._kept

    def update_tensor(self, compensated: torch.Tensor, transmitted: torch.Tensor) -> None:
        """`update` where the residual lives (`on`): the same subtraction and the same reset."""
        residual = self.on(compensated.device)
        torch.sub(compensated, transmitted, out=residual)
        if not bool(torch.isfinite(residual.sum())):
            residual.zero_()

    def host(self) -> np.ndarray:
        """The residual in host memory, brought up to date from the device where it is kept."""
        if self._kept is not None:
            self.residual[:] = self._kept.cpu().numpy()
        return self.residual
