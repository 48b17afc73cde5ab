"""Learning rate per round: optional linear-scaling rule, linear warmup, then constant/step/cosine."""

from __future__ import annotations

import math

from mpifed.config import OptimConfig


def learning_rate(cfg: OptimConfig, rnd: int, rounds: int, global_batch: int) -> float:
    """Learning rate of round `rnd` (0-based) out of `rounds`, for a global batch of `global_batch`."""
    base = cfg.lr * (global_batch / cfg.base_batch if cfg.scale_lr else 1.0)
    if rnd < cfg.warmup_rounds:
        return base * (0.1 + 0.9 * rnd / cfg.warmup_rounds)
    if cfg.schedule == "step":
        return base * cfg.gamma ** sum(rnd >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        span = max(1, rounds - cfg.warmup_rounds)
        return base * 0.5 * (1 + math.cos(math.pi * (rnd - cfg.warmup_rounds) / span))
    return base
