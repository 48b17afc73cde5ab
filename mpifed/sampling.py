"""Which clients train in a round, and on which rank: sampling K of N, placing them on W ranks.

Pure functions of (seed, round) and the clients' facts, so a rerun and a resume draw the same clients
and every rank could compute them; the server does, and broadcasts the result (mpifed.protocol).
"""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np

from mpifed.seeding import Purpose, rng


def sample_clients(seed: int, rnd: int, n: int, k: int, sizes: Sequence[int] | None = None) -> np.ndarray:
    """K distinct client ids of N for round `rnd`, ascending: uniform, or with probability proportional to
    `sizes` (each client's samples) when given. K = N takes every client, in order."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    p = None
    if sizes is not None:
        weights = np.asarray(sizes, dtype=np.float64)
        p = weights / weights.sum()
    chosen = rng(seed, Purpose.CLIENTS, rnd, 1).choice(n, size=k, replace=False, p=p)
    return np.sort(chosen).astype(np.int64)


def place_clients(seconds: Sequence[float], workers: int, balanced: bool = True) -> np.ndarray:
    """A worker index (0..workers-1) per client, from each client's predicted step time.

    balanced: longest processing time first, each client onto the least loaded worker (ties: the lowest
    index), which is within 4/3 of the best makespan (Graham 1969); round-robin: client i on worker i mod W.
    """
    count = len(seconds)
    if not balanced:
        return np.arange(count, dtype=np.int64) % workers
    order = sorted(range(count), key=lambda i: (-seconds[i], i))
    loads = [(0.0, w) for w in range(workers)]
    placed = np.zeros(count, dtype=np.int64)
    for i in order:
        load, w = heapq.heappop(loads)
        placed[i] = w
        heapq.heappush(loads, (load + float(seconds[i]), w))
    return placed


def predicted_seconds(batches: Sequence[int], speeds: Sequence[float], local_steps: int) -> np.ndarray:
    """A client's step time up to a constant: samples it computes over its profile's speed (1 = native)."""
    return np.asarray(batches, dtype=np.float64) * local_steps / np.asarray(speeds, dtype=np.float64)


class ClientPool:
    """The server's view of pooled clients: each round's (4, K) assignment [ids; ranks; cursors; holders],
    placed by each client's predicted time (predicted_seconds, or the performance model's with a plan),
    every client's sampler cursor (advanced by the samples it drew), which a checkpoint stores, and the
    rank that holds its error-feedback residual (-1: none yet; 0: the server, which keeps a resumed
    run's residuals in `residuals` until it sends them on)."""

    def __init__(self, seed: int, batches: Sequence[int], seconds: Sequence[float], sizes: Sequence[int],
                 per_round: int, workers: int, local_steps: int, by_data: bool, balanced: bool):
        self.seed, self.workers, self.local_steps, self.balanced = seed, workers, local_steps, balanced
        self.batches = np.asarray(batches, dtype=np.int64)
        self.seconds = np.asarray(seconds, dtype=np.float64)  # each client's predicted time, which placement balances
        self.sizes = np.asarray(sizes, dtype=np.int64) if by_data else None
        self.per_round = per_round
        self.cursors = np.zeros(len(self.batches), dtype=np.int64)
        self.holders = np.full(len(self.batches), -1, dtype=np.int64)
        self.residuals: dict[int, np.ndarray] = {}

    def assign(self, rnd: int, out: np.ndarray) -> np.ndarray:
        """Round `rnd`'s clients into `out` (4, K): ids (ascending), the rank (1..W) of each, its cursor,
        the rank holding its residual; then their cursors move on by what they will draw, and their
        residuals will be on the ranks that train them. Returns the ids."""
        ids = sample_clients(self.seed, rnd, len(self.batches), self.per_round, self.sizes)
        out[0] = ids
        out[1] = place_clients(self.seconds[ids], self.workers, self.balanced) + 1
        out[2] = self.cursors[ids]
        out[3] = self.holders[ids]
        self.cursors[ids] += self.batches[ids] * self.local_steps
        self.holders[ids] = out[1]
        return ids

    def rebatch(self, batches: Sequence[int], seconds: Sequence[float]) -> None:
        """The clients' batches from now on (scaling.grow_batch) and their predicted times at them."""
        self.batches = np.asarray(batches, dtype=np.int64).copy()
        self.seconds = np.asarray(seconds, dtype=np.float64)

    def restore(self, cursors: np.ndarray, residual_clients: np.ndarray, residuals: np.ndarray,
                seconds: np.ndarray | None = None) -> None:
        """A checkpoint's cursors, its residuals, which the server now holds, and the predicted times its
        placement balanced (None: a checkpoint without them, whose times were the profiles')."""
        self.cursors[:] = cursors
        if seconds is not None:
            self.seconds = np.asarray(seconds, dtype=np.float64)
        self.holders[:] = -1
        self.holders[residual_clients] = 0
        self.residuals = {int(k): row.copy() for k, row in zip(residual_clients, residuals)}
