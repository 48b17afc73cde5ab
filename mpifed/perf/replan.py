"""Re-planning: move samples between clients when their measured step times drift from the plan.

Each client's curve is corrected by a speed factor s_k, an exponentially weighted moving average
of measured / predicted step time at its current batch (a neighbour's job on the GPU, thermal
throttling or a wrong profile all show up as s_k != 1). Every round the planner re-splits the same
global batch over the corrected curves, and the split is adopted only when it shortens the
predicted slowest step by more than the dead band and the last change is at least `min_interval`
rounds old. The dead band keeps noise from flapping batches back and forth; the interval lets the
average see the new batches before they are judged. The global batch never changes, so the
optimizer's hyperparameters stay valid; only the b_k / B weights follow the new split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from mpifed.perf.curves import ComputeCurve
from mpifed.perf.planner import plan_batches


@dataclass
class Replanner:
    """Smoothed, dead-banded re-planning of per-client batches at a fixed global batch.

    curves, max_batches: the clients' fitted curves and memory caps, in client order.
    batches: the split in force (e.g. from plan_batches); its sum is the global batch, kept fixed.
    smoothing: EWMA weight of the newest measurement, in (0, 1]. Default 0.2: about 5 rounds of
      memory, enough to average out per-round jitter of a few percent yet follow a step change
      within ~10 rounds.
    dead_band: relative gain of the slowest predicted step needed to change batches. Default 0.10,
      the issue's "e.g. 10%": above the few-percent noise of a step time, below the 1.5x gains a
      real imbalance gives.
    min_interval: rounds between changes. Default 5 = 1 / smoothing, the EWMA's time constant.
    """

    curves: Sequence[ComputeCurve]
    max_batches: Sequence[int]
    batches: list[int]
    smoothing: float = 0.2
    dead_band: float = 0.10
    min_interval: int = 5
    speed: list[float] = field(default_factory=list)
    """s_k: smoothed measured/predicted step time per client (state; 1.0 = as profiled)."""
    since_change: int = 0
    """Rounds observed since the batches last changed (state)."""

    def __post_init__(self) -> None:
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.dead_band < 0:
            raise ValueError(f"dead_band must be >= 0, got {self.dead_band}")
        if self.min_interval < 1:
            raise ValueError(f"min_interval must be >= 1 round, got {self.min_interval}")
        self.batches = [int(b) for b in self.batches]
        if len(self.batches) != len(self.curves) or len(self.max_batches) != len(self.curves):
            raise ValueError(f"need one batch and one max batch per curve: {len(self.batches)} batches, "
                             f"{len(self.max_batches)} max batches, {len(self.curves)} curves")
        bad = [k for k, (b, cap) in enumerate(zip(self.batches, self.max_batches)) if not 1 <= b <= cap]
        if bad:
            raise ValueError(f"clients {bad} start outside 1 <= batch <= max batch")
        if not self.speed:
            self.speed = [1.0] * len(self.curves)
        self.speed = [float(s) for s in self.speed]

    @property
    def global_batch(self) -> int:
        return sum(self.batches)

    def corrected(self) -> list[ComputeCurve]:
        """The clients' curves scaled by their smoothed speed factors."""
        return [c.scaled(s) for c, s in zip(self.curves, self.speed)]

    def predict(self) -> list[float]:
        """Predicted step seconds of each client at its current batch (log as t_iter_pred parts)."""
        return [float(c.predict(b)) for c, b in zip(self.corrected(), self.batches)]

    def observe(self, seconds: Sequence[float]) -> bool:
        """Feed one round's measured step times (client order); True if `batches` changed."""
        if len(seconds) != len(self.curves):
            raise ValueError(f"need one measured time per client ({len(self.curves)}), got {len(seconds)}")
        if any(not t > 0 for t in seconds):
            raise ValueError(f"measured step times must be > 0, got {list(seconds)}")
        w = self.smoothing
        for k, (curve, b, t) in enumerate(zip(self.curves, self.batches, seconds)):
            self.speed[k] = (1 - w) * self.speed[k] + w * t / float(curve.predict(b))
        self.since_change += 1
        if self.since_change < self.min_interval:
            return False
        corrected = self.corrected()
        now = max(float(c.predict(b)) for c, b in zip(corrected, self.batches))
        split = plan_batches(corrected, self.max_batches, self.global_batch)
        best = max(float(c.predict(b)) for c, b in zip(corrected, split))
        if split == self.batches or now <= (1 + self.dead_band) * best:
            return False
        self.batches = split
        self.since_change = 0
        return True

    def state_dict(self) -> dict:
        """Plain numbers for a checkpoint: batches, speed factors and the change counter."""
        return {"batches": list(self.batches), "speed": list(self.speed), "since_change": self.since_change}

    def load_state_dict(self, state: dict) -> None:
        batches = [int(b) for b in state["batches"]]
        if sum(batches) != self.global_batch or len(batches) != len(self.batches):
            raise ValueError(f"checkpointed batches {batches} do not match this job's "
                             f"{len(self.batches)} clients and global batch {self.global_batch}")
        self.batches = batches
        self.speed = [float(s) for s in state["speed"]]
        self.since_change = int(state["since_change"])
