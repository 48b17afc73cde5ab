"""The slowest of K jittering clients: what a synchronous round actually waits for.

A client's step time varies from round to round (shared cores, the scheduler, the allocator); the
round waits for the largest of the K draws, which sits above every client's typical time. With
client k's step lognormal around its curve, T_k = t_k * exp(s_k Z_k), Z_k independent N(0, 1), the
round's compute term is predicted as the *median* of max_k T_k, the x that solves

    prod_k Phi((ln x - ln t_k) / s_k) = 1/2

(the median, not the mean, because round times are judged by the median absolute percentage error).
For K equal clients this is t * exp(s * Phi^-1(2^(-1/K))): +0.55 s at K = 2, +0.82 s at 3, +1.0 s at 4;
a client far faster than the slowest adds nothing. s_k = 0 gives the plain max of the curves.

spreads() estimates s_k from rounds of K clients stepping at once: the sd of each client's log step
time around its batch size's mean, less the part all clients share in a round (shared jitter moves
every client together, so it does not raise the maximum above the typical client; counting it
over-predicted the slowest client by 5-10% on a loaded machine).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

_PHI = NormalDist()


def slowest_median(times: Sequence[float], spreads: Sequence[float]) -> float:
    """Median of max_k t_k exp(s_k Z_k) (see the module docstring); seconds, >= max(times)."""
    if len(times) != len(spreads) or not times:
        raise ValueError(f"need one spread per time, got {len(spreads)} for {len(times)}")
    if any(t <= 0 for t in times) or any(s < 0 for s in spreads):
        raise ValueError(f"need times > 0 and spreads >= 0, got {list(times)}, {list(spreads)}")
    top = max(times)
    noisy = [(t, s) for t, s in zip(times, spreads) if s > 0]
    if not noisy:
        return float(top)

    def below(x: float) -> float:  # P(max <= x), counting the noiseless clients as steps at t_k
        if any(s == 0 and x < t for t, s in zip(times, spreads)):
            return 0.0
        return math.prod(_PHI.cdf((math.log(x) - math.log(t)) / s) for t, s in noisy)

    lo, hi = top, top * math.exp(6 * max(s for _, s in noisy))
    for _ in range(60):  # bisection on log x: P(max <= x) grows with x
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if below(mid) < 0.5 else (lo, mid)
    return float(math.sqrt(lo * hi))


def spreads(seconds: np.ndarray, batches: np.ndarray) -> list[float]:
    """Each client's own jitter s_k from rounds in which all K clients stepped at once.

    seconds, batches: (rounds, K) step times and batch sizes. Log times are centred per client and
    batch size (the curve's part), then per round across clients (the part every client shares: a
    neighbour's job, the machine slowing down), which moves all clients together and so does not
    make one of them the straggler; s_k is solved from what is left (two clients' residuals mirror
    each other, so two clients get the same s). K = 1 gives [0.0]: a lone client waits for no one."""
    x = np.log(np.asarray(seconds, dtype=float))
    b = np.asarray(batches)
    if x.ndim != 2 or x.shape != b.shape or not np.isfinite(x).all():
        raise ValueError(f"need (rounds, clients) arrays of positive seconds and batches, got {x.shape}, {b.shape}")
    rounds, k = x.shape
    if k == 1:
        return [0.0]
    groups = np.zeros(k)
    for j in range(k):
        for size in np.unique(b[:, j]):
            rows = b[:, j] == size
            x[rows, j] -= x[rows, j].mean()
        groups[j] = len(np.unique(b[:, j]))
    x -= x.mean(axis=1, keepdims=True)
    v = np.sum(x ** 2, axis=0) / np.maximum(rounds - groups, 1)
    # centring per round leaves r_j = e_j - mean(e): Var r_j = s_j^2 (1 - 2/K) + sum(s^2) / K^2
    total = k / (k - 1) * v.sum()
    if k == 2:  # r_1 = -r_2: only the sum is seen, so both get half
        return [float(np.sqrt(total / 2))] * 2
    return [float(np.sqrt(max(0.0, (vj - total / k ** 2) / (1 - 2 / k)))) for vj in v]
