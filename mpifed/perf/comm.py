"""Latency-bandwidth (alpha-beta) cost of the four collectives one mpifed round uses.

Each collective costs  t = alpha * L(p, m) + beta * W(p, m)  seconds, with p ranks, m bytes,
alpha the per-message latency (s) and beta the per-byte time (s/B, compute of a reduction folded
in). L and W count the latency and bandwidth terms of the algorithm MPICH picks, following Thakur,
Rabenseifner and Gropp, "Optimization of Collective Communication Operations in MPICH" (IJHPCA
2005); the switch points are MPICH's defaults (CVARs named below), with lg = ceil(log2 p):

  bcast   (model, root 0)   m < 12288 B or p < 8: binomial tree         L = lg,        W = lg * m
                            m < 512 KiB, p a power of two: scatter +
                              recursive-doubling allgather              L = 2 lg,      W = 2(p-1)/p * m
                            otherwise: scatter + ring allgather         L = lg + p-1,  W = 2(p-1)/p * m
  reduce  (summable update) m <= 2048 B: binomial tree                  L = lg,        W = lg * m
                            otherwise: Rabenseifner (reduce-scatter+gather) L = 2 lg,  W = 2(p-1)/p * m
  gatherv (sparse/quantized update, m per client): linear at the root   L = p-1,       W = (p-1) * m
  gather  (per-rank metrics row, m per rank): binomial tree             L = lg,        W = (p-1) * m

alpha and beta are fitted per collective from a short measurement on the real MPI, so shared
memory, the network and MPICH's actual choices are all absorbed into the two numbers; the model
carries the shape (how cost grows with p and m), the fit carries the machine.

One (alpha, beta) pair cannot follow protocol switches (eager -> rendezvous, messages leaving the
caches) across six decades of sizes: on one H100 node under Open MPI 4.1 (3 and 8 ranks) it missed
sizes between the measured ones by 3-36% (median per collective). So CommModel.predict returns the
measurement itself at a measured size and rank count, log-log interpolates between measured sizes
(6-27% on the same data: better for 6 of 8 collective/rank cases, not all), and uses the alpha-beta
fit elsewhere (other p, sizes beyond the profile). The round's own sizes are read off the probe
rounds (mpifed.probes), so the round's own collectives come from measurements; `mpifed profile`
adds bare collectives at other sizes for the fit's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

KINDS = ("bcast", "reduce", "gatherv", "gather")

BCAST_SHORT_BYTES = 12288
"""MPIR_CVAR_BCAST_SHORT_MSG_SIZE default: below it MPICH broadcasts along a binomial tree."""
BCAST_MIN_PROCS = 8
"""MPIR_CVAR_BCAST_MIN_PROCS default: with fewer ranks MPICH always uses the binomial tree."""
BCAST_LONG_BYTES = 524288
"""MPIR_CVAR_BCAST_LONG_MSG_SIZE default: below it (and above the short size) a power-of-two rank count
allgathers by recursive doubling, not around a ring."""
REDUCE_SHORT_BYTES = 2048
"""MPIR_CVAR_REDUCE_SHORT_MSG_SIZE default: above it MPICH uses Rabenseifner's reduce."""


@dataclass(frozen=True)
class CollectiveSample:
    """One measured collective: kind, ranks p, bytes m (per rank for gather/gatherv), seconds."""

    kind: str
    ranks: int
    nbytes: int
    seconds: float

    def to_list(self) -> list:
        return [self.kind, self.ranks, self.nbytes, self.seconds]

    @classmethod
    def from_list(cls, row: Sequence) -> "CollectiveSample":
        kind, ranks, nbytes, seconds = row
        return cls(str(kind), int(ranks), int(nbytes), float(seconds))


def terms(kind: str, ranks: int, nbytes: float) -> tuple[float, float]:
    """(L, W): latency-term count and bandwidth-term bytes of `kind` on p ranks and m bytes."""
    p, m = ranks, float(nbytes)
    if p < 2:
        raise ValueError(f"a collective needs >= 2 ranks (server + client), got {p}")
    lg = math.ceil(math.log2(p))
    if kind == "bcast":
        if m < BCAST_SHORT_BYTES or p < BCAST_MIN_PROCS:
            return lg, lg * m
        if m < BCAST_LONG_BYTES and p & (p - 1) == 0:
            return 2 * lg, 2 * (p - 1) / p * m
        return lg + p - 1, 2 * (p - 1) / p * m
    if kind == "reduce":
        if m <= REDUCE_SHORT_BYTES:
            return lg, lg * m
        return 2 * lg, 2 * (p - 1) / p * m
    if kind == "gatherv":
        return p - 1, (p - 1) * m
    if kind == "gather":
        return lg, (p - 1) * m
    raise ValueError(f"unknown collective {kind!r}; choose one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class CollectiveCost:
    """alpha (s per latency term) and beta (s per byte) of one collective; see module docstring."""

    kind: str
    alpha: float
    beta: float
    rel_rms: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown collective {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"{self.kind}: alpha and beta must be >= 0, got {self.alpha}, {self.beta}")

    def predict(self, ranks: int, nbytes: float) -> float:
        lat, width = terms(self.kind, ranks, nbytes)
        return self.alpha * lat + self.beta * width


@dataclass(frozen=True)
class CommModel:
    """One CollectiveCost per collective kind; the samples it was fitted from ride along."""

    costs: Mapping[str, CollectiveCost]
    samples: tuple[CollectiveSample, ...] = field(default=(), compare=False)

    def predict(self, kind: str, ranks: int, nbytes: float) -> float:
        """Seconds of `kind` on `ranks` ranks and `nbytes` bytes (see the module docstring)."""
        if kind not in self.costs:
            raise ValueError(f"the comm model has no {kind!r} cost (it has {', '.join(self.costs)}); "
                             "re-run `mpifed profile` so that it measures this collective")
        measured = self.interpolate(kind, ranks, nbytes)
        return self.costs[kind].predict(ranks, nbytes) if measured is None else measured

    def interpolate(self, kind: str, ranks: int, nbytes: float) -> float | None:
        """Log-log interpolation of the samples of `kind` at `ranks`; None outside their range."""
        rows = sorted((s.nbytes, s.seconds) for s in self.samples if s.kind == kind and s.ranks == ranks)
        if len(rows) < 2 or not rows[0][0] <= nbytes <= rows[-1][0]:
            return None
        m, t = np.log([r[0] for r in rows]), np.log([r[1] for r in rows])
        return float(np.exp(np.interp(np.log(nbytes), m, t)))

    def to_dict(self) -> dict:
        return {
            "costs": {k: {"alpha": c.alpha, "beta": c.beta, "rel_rms": c.rel_rms}
                      for k, c in self.costs.items()},
            "samples": [s.to_list() for s in self.samples],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "CommModel":
        costs = {k: CollectiveCost(k, float(v["alpha"]), float(v["beta"]), float(v.get("rel_rms", 0)))
                 for k, v in d["costs"].items()}
        return cls(costs, tuple(CollectiveSample.from_list(r) for r in d.get("samples", ())))


def fit_collective(samples: Iterable[CollectiveSample]) -> CommModel:
    """Fit alpha, beta >= 0 per kind by least relative squares on the (L, W) terms."""
    by_kind: dict[str, list[CollectiveSample]] = {}
    for s in samples:
        if not (s.seconds > 0 and math.isfinite(s.seconds)):
            raise ValueError(f"collective sample {s} has a non-positive or non-finite time")
        by_kind.setdefault(s.kind, []).append(s)
    if not by_kind:
        raise ValueError("no collective samples to fit; run measure_collectives first")
    costs = {}
    all_samples = []
    for kind, rows in by_kind.items():
        design = np.array([terms(kind, s.ranks, s.nbytes) for s in rows], dtype=float)
        t = np.array([s.seconds for s in rows])
        alpha, beta, rms = _nonneg_relative_lstsq(design, t)
        costs[kind] = CollectiveCost(kind, alpha, beta, rms)
        all_samples += rows
    return CommModel(costs, tuple(all_samples))


def _nonneg_relative_lstsq(x: np.ndarray, t: np.ndarray) -> tuple[float, float, float]:
    """min sum(((x @ [alpha, beta]) - t) / t)^2 with alpha, beta >= 0 (two-variable NNLS)."""
    xs = x / t[:, None]
    ones = np.ones(len(t))
    candidates = []
    coef, *_ = np.linalg.lstsq(xs, ones, rcond=None)
    if np.all(coef >= 0):
        candidates.append(coef)
    for j in range(2):  # one coefficient pinned at 0: the other is a 1-D least-squares solution
        col = xs[:, j]
        denom = float(col @ col)
        coef = np.zeros(2)
        coef[j] = float(col @ ones) / denom if denom > 0 else 0.0
        candidates.append(np.maximum(coef, 0))
    best = min(candidates, key=lambda c: float(np.sum((xs @ c - ones) ** 2)))
    rms = math.sqrt(float(np.mean((xs @ best - ones) ** 2)))
    return float(best[0]), float(best[1]), rms


def measure_collectives(comm, sizes: Mapping[str, Sequence[int]] | Sequence[int], repeats: int = 5,
                        warmup: int = 1) -> list[CollectiveSample]:
    """Time each collective at each size on `comm`; every rank calls it with the same arguments.

    sizes: bytes per kind ({"bcast": [...], ...}) or one list for all four kinds. For bcast and
    reduce the size is the message; for gatherv and gather it is what each contributing rank sends
    (the root sends nothing to gatherv, as the server does in a round). Buffers are float32, so a
    size is rounded up to a multiple of 4 bytes. Each repeat starts after a Barrier and counts the
    slowest rank (a round waits for it); the sample is the median over repeats. Uses only the
    uppercase buffer methods. Returns the samples on rank 0 and [] elsewhere.
    """
    from mpi4py import MPI

    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    plan = dict(sizes) if isinstance(sizes, Mapping) else {k: list(sizes) for k in KINDS}
    rank, p = comm.Get_rank(), comm.Get_size()
    if p < 2:
        raise ValueError(f"measuring collectives needs >= 2 ranks, got {p}")
    out = []
    for kind in KINDS:
        for nbytes in plan.get(kind, ()):
            n = max(1, -(-int(nbytes) // 4))
            run = _collective(comm, kind, n, rank, p, MPI)
            times = np.empty(repeats)
            for i in range(warmup + repeats):
                comm.Barrier()
                start = MPI.Wtime()
                run()
                if i >= warmup:
                    times[i - warmup] = MPI.Wtime() - start
            slowest = np.empty_like(times)
            comm.Allreduce(times, slowest, op=MPI.MAX)
            if rank == 0:
                out.append(CollectiveSample(kind, p, 4 * n, float(np.median(slowest))))
    return out


def _collective(comm, kind: str, n: int, rank: int, p: int, MPI):
    """A zero-argument closure that runs one `kind` collective on preallocated float32 buffers."""
    buf = np.ones(n, dtype=np.float32)
    if kind == "bcast":
        return lambda: comm.Bcast(buf, root=0)
    if kind == "reduce":
        recv = np.empty_like(buf) if rank == 0 else None
        return lambda: comm.Reduce(buf, recv, op=MPI.SUM, root=0)
    if kind == "gather":
        recv = np.empty(n * p, dtype=np.float32) if rank == 0 else None
        return lambda: comm.Gather(buf, recv, root=0)
    if kind == "gatherv":
        counts = [0] + [n] * (p - 1)
        displs = [0] + [n * i for i in range(p - 1)]
        send = buf[:0] if rank == 0 else buf
        recv = [np.empty(n * (p - 1), dtype=np.float32), (counts, displs), MPI.FLOAT] if rank == 0 else None
        return lambda: comm.Gatherv(send, recv, root=0)
    raise ValueError(f"unknown collective {kind!r}; choose one of {', '.join(KINDS)}")
