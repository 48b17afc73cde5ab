"""Re-planning: move samples between clients when their measured step times drift from the plan.

The clients' curves come corrected by the online model (mpifed.perf.online: each curve times a
smoothed measured / predicted factor, so a neighbour's job on the GPU, thermal throttling or a wrong
profile all show up). Every round the planner re-splits the same global batch over the corrected
curves, and the split is adopted only when it shortens the predicted slowest step by more than the
dead band and the last change is at least `min_interval` rounds old. The dead band keeps noise from
flapping batches back and forth; the interval lets the factors see the new batches before they are
judged. The global batch never changes, so the optimizer's hyperparameters stay valid; only the
b_k / B weights follow the new split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mpifed.perf.curves import ComputeCurve
from mpifed.perf.planner import plan_batches


@dataclass
class Replanner:
    """Dead-banded re-planning of per-client batches at a fixed global batch.

    max_batches: the largest batch each client may take (planning.plan_cap), in client order.
    batches: the split in force (e.g. from plan_batches); its sum is the global batch, kept fixed.
    dead_band: relative gain of the slowest predicted step needed to change batches. Default 0.10:
      above the few-percent noise of a step time, below the 1.5x gains a
      real imbalance gives.
    min_interval: rounds between changes. Default 5 = 1 / smoothing of the online model's factors,
      their time constant.
    """

    max_batches: Sequence[int]
    batches: list[int]
    dead_band: float = 0.10
    min_interval: int = 5
    since_change: int = 0
    """Rounds observed since the batches last changed (state)."""

    def __post_init__(self) -> None:
        if self.dead_band < 0:
            raise ValueError(f"dead_band must be >= 0, got {self.dead_band}")
        if self.min_interval < 1:
            raise ValueError(f"min_interval must be >= 1 round, got {self.min_interval}")
        self.batches = [int(b) for b in self.batches]
        if len(self.batches) != len(self.max_batches):
            raise ValueError(f"need one max batch per batch: {len(self.batches)} batches, "
                             f"{len(self.max_batches)} max batches")
        bad = [k for k, (b, cap) in enumerate(zip(self.batches, self.max_batches)) if not 1 <= b <= cap]
        if bad:
            raise ValueError(f"clients {bad} start outside 1 <= batch <= max batch")

    @property
    def global_batch(self) -> int:
        return sum(self.batches)

    def observe(self, curves: Sequence[ComputeCurve]) -> bool:
        """After a round, with the clients' corrected curves (client order); True if `batches` changed."""
        if len(curves) != len(self.batches):
            raise ValueError(f"need one curve per client ({len(self.batches)}), got {len(curves)}")
        self.since_change += 1
        if self.since_change < self.min_interval:
            return False
        now = max(float(c.predict(b)) for c, b in zip(curves, self.batches))
        split = plan_batches(curves, self.max_batches, self.global_batch)
        best = max(float(c.predict(b)) for c, b in zip(curves, split))
        if split == self.batches or now <= (1 + self.dead_band) * best:
            return False
        self.batches = split
        self.since_change = 0
        return True
