"""Critical-phase detector: flags the stretches of training where the gradient norm moves fast.

Achille et al. (2019, "Critical learning periods in deep networks") show that what a network learns
early, while its gradients change quickly, fixes what it can learn later; Accordion (Agarwal et al.,
MLSys 2021) detects these "critical regimes" from the relative change of the gradient norm between
two detection intervals and keeps the conservative setting (low compression, small batch) inside
them. Tyagi (2025) uses the same signal to decide when a large-batch gradient may be scaled.

Rule, with windows of `window` consecutive iterations and m_w the mean aggregated gradient norm of
window w:

    rel_w = |m_w - m_{w-1}| / m_{w-1},        critical  <=>  rel_w > threshold

The decision taken when window w closes holds for the iteration that closed it and for every
iteration of window w+1. Every iteration is critical while fewer than two windows have closed
(there is nothing to compare yet, and Accordion too starts in the critical setting) and during the
first `warmup` iterations. m_{w-1} = 0 counts as an infinite change unless m_w = 0 as well.
"""

from __future__ import annotations

import math


class CriticalPhaseDetector:
    """Fed one aggregated-gradient norm per iteration; says whether that iteration is critical.

    Args:
        window: iterations per detection window (>= 1).
        threshold: relative change of the window-mean norm above which a phase is critical (> 0).
        warmup: leading iterations that are critical whatever the norms say (>= 0).

    The state is six plain numbers (`state_dict`), so a checkpoint can store it as attributes.
    """

    def __init__(self, window: int, threshold: float, warmup: int):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window = {window!r}: must be an integer >= 1 (iterations per window)")
        if not threshold > 0 or not math.isfinite(threshold):
            raise ValueError(f"threshold = {threshold!r}: must be a finite number > 0 (relative change, "
                             f"e.g. 0.5 as in Accordion)")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup = {warmup!r}: must be an integer >= 0 (iterations)")
        self.window, self.threshold, self.warmup = window, float(threshold), warmup
        self.iterations = 0        # norms seen so far
        self._sum = 0.0            # sum of the norms of the open window
        self._count = 0            # norms in the open window
        self._prev_mean = math.nan  # mean of the last closed window; NaN before the first closes
        self.rel_change = math.nan  # last rel_w; NaN before the first comparison
        self._decided = True       # last decision; True until the first comparison

    @property
    def critical(self) -> bool:
        """Whether the most recent iteration was critical."""
        return self.iterations <= self.warmup or self._decided

    def update(self, norm: float) -> bool:
        """Record the aggregated gradient norm of one iteration; return whether it is critical."""
        norm = float(norm)
        if not math.isfinite(norm) or norm < 0:
            raise ValueError(f"gradient norm {norm!r} at iteration {self.iterations + 1} is not a finite "
                             f"number >= 0: training diverged; lower the learning rate or the scale factor")
        self.iterations += 1
        self._sum += norm
        self._count += 1
        if self._count == self.window:
            mean = self._sum / self.window
            if not math.isnan(self._prev_mean):
                self.rel_change = _relative_change(self._prev_mean, mean)
                self._decided = self.rel_change > self.threshold
            self._prev_mean = mean
            self._sum, self._count = 0.0, 0
        return self.critical

    def state_dict(self) -> dict[str, float | int | bool]:
        return {"iterations": self.iterations, "sum": self._sum, "count": self._count,
                "prev_mean": self._prev_mean, "rel_change": self.rel_change, "decided": self._decided}

    def load_state_dict(self, state: dict) -> None:
        self.iterations = int(state["iterations"])
        self._sum = float(state["sum"])
        self._count = int(state["count"])
        self._prev_mean = float(state["prev_mean"])
        self.rel_change = float(state["rel_change"])
        self._decided = bool(state["decided"])


def _relative_change(previous: float, current: float) -> float:
    if previous == 0:
        return 0.0 if current == 0 else math.inf
    return abs(current - previous) / previous
