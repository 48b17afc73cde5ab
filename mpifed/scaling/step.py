"""Step-function scaling (Tyagi 2025): scale the large-batch gradient only outside critical phases.

Inside a critical phase the aggregate is used as is, because early, fast-moving training is where
large steps hurt most (Achille et al. 2019; Goyal et al. 2017 warm the learning rate up for the same
reason). Outside, it is multiplied by a factor s: a step function of the detector's flag.

The factor either is given, or follows the square-root rule s = sqrt(B / b): Hoffer et al. (2017,
"Train longer, generalize better") scale the learning rate by sqrt(B/b) so that the step's noise
standard deviation, sqrt(Sigma/B) * s, equals that of the small batch b at the base learning rate.
"""

from __future__ import annotations

import math


def sqrt_rule(global_batch: int, small_batch: int) -> float:
    """s = sqrt(B / b) (Hoffer et al. 2017); needs b < B, or the 'large' batch is not large."""
    if small_batch < 1 or small_batch >= global_batch:
        raise ValueError(f"scaling.small_batch = {small_batch}: the square-root rule needs 1 <= small_batch "
                         f"< global batch B = {global_batch}; lower it, or set scaling.scale explicitly")
    return math.sqrt(global_batch / small_batch)


def step_scale(critical: bool, factor: float) -> float:
    """The multiplier for this iteration: 1 inside a critical phase, `factor` outside."""
    return 1.0 if critical else float(factor)
