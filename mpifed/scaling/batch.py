"""Optional batch controller: grow the global batch towards the gradient noise scale.

McCandlish et al. (2018) find the critical batch, beyond which more samples per step stop saving
steps, close to B_simple = tr(Sigma) / |G|^2, and B_simple grows as training proceeds. So the global
batch may follow it upwards: the controller moves a fraction `rate` of the way from the current
batch to min(B_simple, cap) each round, never shrinks (a shrinking batch would undo the memory
plan and the learning-rate schedule), and never exceeds `cap`, the sum of the clients' largest
batches under their memory budgets (mpifed.memory). `split_batch` then shares the total out.
"""

from __future__ import annotations

import math
from typing import Sequence


class BatchController:
    """Smoothed, monotone, capped global batch suggestion.

    Args:
        start: current global batch B (samples, >= 1).
        cap: largest global batch the clients can hold (samples, >= start).
        rate: fraction of the gap to the target closed per round, in (0, 1]. The default used by the
            policy config (0.1, about ten rounds to close most of a gap) is this project's choice,
            slow next to the EMA of the noise scale so one noisy estimate cannot jump the batch.
    """

    def __init__(self, start: int, cap: int, rate: float):
        if start < 1:
            raise ValueError(f"global batch {start}: must be >= 1 (samples)")
        if cap < start:
            raise ValueError(f"batch cap {cap} is below the current global batch {start}: the clients' "
                             f"memory limits cannot hold the present batch; lower the client batches")
        if not 0 < rate <= 1:
            raise ValueError(f"scaling.batch_rate = {rate!r}: must be in (0, 1] (fraction per round)")
        self.cap, self.rate = int(cap), float(rate)
        self.batch = float(start)

    def update(self, noise_scale: float) -> int:
        """Fold in this round's smoothed noise scale (samples); return the suggested global batch."""
        if not math.isnan(noise_scale):
            target = min(noise_scale, self.cap)
            if target > self.batch:
                self.batch = min(self.batch + self.rate * (target - self.batch), float(self.cap))
        return int(self.batch)

    def state_dict(self) -> dict[str, float]:
        return {"batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.batch = float(state["batch"])


def split_batch(total: int, max_batches: Sequence[int]) -> list[int]:
    """Share `total` samples among clients in proportion to their max batches, each within its max.

    Proportional shares keep every client's compute time about equal when memory tracks speed;
    rounding leftovers go to the clients with the most headroom.
    """
    caps = [int(m) for m in max_batches]
    if not caps or min(caps) < 1:
        raise ValueError(f"max batches {list(max_batches)}: need one per client, each >= 1")
    if not len(caps) <= total <= sum(caps):
        raise ValueError(f"global batch {total} cannot be split: it must lie between {len(caps)} (one sample "
                         f"per client) and {sum(caps)} (every client at its memory limit)")
    share = [max(1, min(c, total * c // sum(caps))) for c in caps]
    left = total - sum(share)
    while left != 0:
        step = 1 if left > 0 else -1
        order = sorted(range(len(caps)), key=lambda i: share[i] - caps[i] if step > 0 else -share[i])
        for i in order:
            if left == 0:
                break
            if (step > 0 and share[i] < caps[i]) or (step < 0 and share[i] > 1):
                share[i] += step
                left -= step
    return share
