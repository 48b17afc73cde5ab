"""Compute curves: seconds of one client step as a function of its batch size.

A GPU step costs about the same for every small batch (kernel launches and a half-empty device
dominate), then grows linearly once the device is saturated. The curve is therefore

    t(b) = max(t_floor, a + c * b)        [seconds; b in samples]

with c the marginal seconds per sample, a the intercept of the saturated line and t_floor the
plateau; the knee (b where the two meet) is (t_floor - a) / c. A CPU or a device that saturates at
b = 1 has no plateau: t_floor = 0 and the curve is affine. Each client (real or emulated device)
gets its own curve, fitted from a short profile of its own step function.

Fits minimise *relative* squared error, because step times span orders of magnitude across a
profile and the round-time target (MdAPE) is relative too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

Sample = tuple[int, float]


@dataclass(frozen=True)
class ComputeCurve:
    """t(b) = max(t_floor, a + c*b) seconds for one step at batch b.

    a: intercept of the saturated line, seconds (may be negative when a plateau exists).
    c: marginal cost, seconds per sample (>= 0).
    t_floor: plateau, seconds (0 = no plateau).
    rel_rms: root-mean-square relative residual of the fit (0 for a curve given by hand).
    spread: step-to-step jitter, the sd of log seconds between repeats at one batch size (0 = a
      steady step); it sets how far the slowest of K clients lands above its curve
      (mpifed.perf.straggler). Measured with the other clients stepping at the same time.
    """

    a: float
    c: float
    t_floor: float = 0.0
    rel_rms: float = 0.0
    spread: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.a) and math.isfinite(self.c) and math.isfinite(self.t_floor)):
            raise ValueError(f"compute curve has a non-finite parameter: {self}")
        if self.c < 0 or self.t_floor < 0 or not self.spread >= 0:
            raise ValueError(f"compute curve needs c >= 0, t_floor >= 0 and spread >= 0, got {self}")
        if self.predict(1) <= 0:
            raise ValueError(f"compute curve predicts {self.predict(1):.3g} s at batch 1; "
                             "a step must take positive time (raise a or t_floor)")

    def predict(self, batch: float | np.ndarray) -> float | np.ndarray:
        """Seconds of one step at `batch` samples (scalar or array)."""
        return np.maximum(self.t_floor, self.a + self.c * np.asarray(batch, dtype=float))[()]

    def max_batch_within(self, seconds: float, cap: int) -> int:
        """Largest integer batch in [0, cap] whose step takes at most `seconds` (0 if none)."""
        if seconds < self.predict(1):
            return 0
        if self.c == 0:
            return cap
        b = min(cap, math.floor((seconds - self.a) / self.c))
        # Guard float rounding at the boundary, so that predict(b) <= seconds always holds.
        while b > 0 and self.predict(b) > seconds:
            b -= 1
        return max(0, b)

    @property
    def knee(self) -> float:
        """Batch at which the device saturates (1.0 when there is no plateau)."""
        if self.c == 0 or self.t_floor <= self.a + self.c:
            return 1.0
        return (self.t_floor - self.a) / self.c

    def scaled(self, factor: float) -> "ComputeCurve":
        """The same device running `factor` times slower (used to correct drift)."""
        if not factor > 0:
            raise ValueError(f"scale factor must be > 0, got {factor}")
        return ComputeCurve(self.a * factor, self.c * factor, self.t_floor * factor, self.rel_rms, self.spread)

    def shifted(self, seconds: float) -> "ComputeCurve":
        """Add a batch-independent cost (e.g. encoding the update) to every step."""
        floor = self.t_floor + seconds if self.t_floor > 0 else 0.0
        return ComputeCurve(self.a + seconds, self.c, floor, self.rel_rms, self.spread)

    def with_spread(self, spread: float) -> "ComputeCurve":
        """The same curve with a measured step-to-step jitter (sd of log seconds)."""
        return ComputeCurve(self.a, self.c, self.t_floor, self.rel_rms, spread)

    def to_dict(self) -> dict[str, float]:
        """Plain floats, for HDF5 attributes and the JSON profile file."""
        return {"a": self.a, "c": self.c, "t_floor": self.t_floor, "rel_rms": self.rel_rms, "spread": self.spread}

    @classmethod
    def from_dict(cls, d: dict) -> "ComputeCurve":
        try:
            return cls(float(d["a"]), float(d["c"]), float(d.get("t_floor", 0.0)),
                       float(d.get("rel_rms", 0.0)), float(d.get("spread", 0.0)))
        except KeyError as e:
            raise ValueError(f"compute curve entry {d!r} lacks {e}; it needs a, c (and t_floor)") from None

    @classmethod
    def fit(cls, samples: Iterable[Sample]) -> "ComputeCurve":
        """Least relative squares fit of max(t_floor, a + c*b) to (batch, seconds) samples.

        Tries every split of the distinct batch sizes into a plateau (small batches) and a
        saturated line (at least two sizes), and keeps the split with the smallest error of the
        full max() model. Needs samples at >= 2 distinct batch sizes.
        """
        b, t = _as_arrays(samples)
        best: tuple[float, ComputeCurve] | None = None
        sizes = np.unique(b)
        for k in range(0, len(sizes) - 1):  # sizes[:k] form the plateau
            candidate = _fit_split(b, t, sizes[k])
            if candidate is None:
                continue
            err = float(np.sum(((candidate.predict(b) - t) / t) ** 2))
            if best is None or err < best[0]:
                best = (err, candidate)
        if best is None:
            raise ValueError("could not fit a compute curve: every candidate predicted a "
                             "non-positive step time; check the profile's timings")
        err, curve = best
        return ComputeCurve(curve.a, curve.c, curve.t_floor, math.sqrt(err / len(t)))


def _as_arrays(samples: Iterable[Sample]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(float(b), float(s)) for b, s in samples]
    if not pairs:
        raise ValueError("no (batch, seconds) samples to fit")
    b, t = (np.array(x) for x in zip(*pairs))
    if np.any(b < 1) or np.any(~np.isfinite(t)) or np.any(t <= 0):
        raise ValueError("samples need batch >= 1 and finite seconds > 0")
    if len(np.unique(b)) < 2:
        raise ValueError("a compute curve needs timings at >= 2 distinct batch sizes; "
                         f"got only batch {int(b[0])}")
    return b, t


def _fit_split(b: np.ndarray, t: np.ndarray, first_line: float) -> ComputeCurve | None:
    """Plateau on b < first_line, relative-LS line on b >= first_line."""
    flat, line = b < first_line, b >= first_line
    w = 1.0 / t
    # Relative least squares: minimise sum(((a + c*b) - t) / t)^2, i.e. rows scaled by 1/t.
    design = np.column_stack([w[line], b[line] * w[line]])
    (a, c), *_ = np.linalg.lstsq(design, np.ones(line.sum()), rcond=None)
    if c < 0:  # noise on a flat device: a constant is the honest fit
        a, c = float(np.sum(w[line]) / np.sum(w[line] ** 2)), 0.0
    floor = float(np.sum(w[flat]) / np.sum(w[flat] ** 2)) if flat.any() else 0.0
    try:
        return ComputeCurve(float(a), float(c), floor)
    except ValueError:
        return None
