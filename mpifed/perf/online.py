"""The start-up model kept calibrated by the rounds it predicts.

A start-up profile sees the machine for a few seconds; a run lasts minutes to days. On shared cores
a client's step moves by tens of percent for seconds to whole runs (measured here: two plain
processes stepping the same CNN drifted between 9 and 15 ms in 2-second windows, pinned or not),
and a GPU slows down under a neighbour's job or heat. So each term of the round model carries a
correction factor, a geometric moving average of measured / predicted:

    client k:      t_k(b) -> f_k t_k(b)       measured: the client's step (+ its emulated link)
    collectives:   t_bcast + t_up -> f_comm (t_bcast + t_up)
                                              measured: the server's broadcast and wait for the
                                              update (t_down + t_up) less the slowest step
    server:        t_server -> f_server t_server   measured: the server's t_decode

and the round is predicted from the corrected terms as at start-up (mpifed.perf.round), times one
more factor, f_round, the same average of the measured round over what the corrected terms
predicted for it: the model's own bias (e.g. the order statistic of the slowest client set from a
few probe rounds). The shape
of the model (curves in the batch, the slowest of K jittering clients, the collectives' bytes) stays
the start-up fit, only the levels follow the machine. The broadcast and the update share one factor
because only their sum is seen: with more ranks than cores the server's broadcast often completes
while the clients already compute (measured here with 4 clients: t_down 8 ms against 0.5 ms in the
probe rounds, and the update path as much shorter), so the split between the two moves while the sum
does not. The prediction for round t uses rounds < t
only. Geometric, not arithmetic, averages: one round slowed 3x by the scheduler moves a factor by
1.25x, not 1.4x (smoothing 0.2).

The re-planner (mpifed.perf.replan) splits the batch over the corrected curves, so a split it picks
is predicted with the same factors that chose it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mpifed.perf.comm import CommModel
from mpifed.perf.curves import ComputeCurve
from mpifed.perf.profile_file import Profile
from mpifed.perf.round import RoundPrediction, predict_round, round_collectives

SHARED = ("comm", "server")
"""The round's terms that are not one client's step, in the order observe() takes them."""


@dataclass
class Calibration:
    """Geometric EWMAs of measured / predicted, one per term (1.0 = as predicted)."""

    size: int
    smoothing: float = 0.2
    """Weight of the newest round, in (0, 1]. 0.2: about 5 rounds of memory, enough to average a few
    percent of round-to-round jitter and to follow a step change within ~10 rounds."""
    log_factors: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.log_factors is None:
            self.log_factors = np.zeros(self.size)

    @property
    def factors(self) -> list[float]:
        return [float(f) for f in np.exp(self.log_factors)]

    def update(self, measured: Sequence[float], predicted: Sequence[float]) -> None:
        """One round's measurements beside what the uncorrected model predicted for them. A pair that
        is not two finite times > 0 (a gap in the log, a term the model has no level for) leaves its
        factor as it was; the others move."""
        m, p = np.asarray(measured, dtype=float), np.asarray(predicted, dtype=float)
        if m.shape != (self.size,) or p.shape != (self.size,):
            raise ValueError(f"need {self.size} measured and predicted times, got {m.shape} and {p.shape}")
        seen = np.isfinite(m) & np.isfinite(p) & (m > 0) & (p > 0)
        step = np.log(np.where(seen, m, 1.0) / np.where(seen, p, 1.0)) - self.log_factors
        self.log_factors += self.smoothing * np.where(seen, step, 0.0)


class _ScaledComm:
    """A CommModel whose predictions are multiplied per collective (the factors' view of comm)."""

    def __init__(self, base: CommModel, factors: dict[str, float]):
        self.base, self.factors = base, factors

    def predict(self, kind: str, ranks: int, nbytes: float) -> float:
        return self.factors.get(kind, 1.0) * self.base.predict(kind, ranks, nbytes)


@dataclass
class OnlineModel:
    """A start-up Profile with per-term correction factors (see the module docstring).

    links: per client, the emulated link seconds its curve includes; observe() adds them to the
    measured step, which the log times without them."""

    profile: Profile
    links: Sequence[float] = ()
    smoothing: float = 0.2
    clients: Calibration = field(init=False)
    shared: Calibration = field(init=False)
    round: Calibration = field(init=False)
    _last: tuple | None = field(init=False, default=None, repr=False)
    """(batches, corrected terms) of the last prediction, valid until the factors move."""

    def __post_init__(self) -> None:
        k = len(self.profile.clients)
        self.links = tuple(float(x) for x in self.links) or (0.0,) * k
        if len(self.links) != k:
            raise ValueError(f"need one link time per client ({k}), got {len(self.links)}")
        self.clients = Calibration(k, self.smoothing)
        self.shared = Calibration(len(SHARED), self.smoothing)
        self.round = Calibration(1, self.smoothing)

    @property
    def bias(self) -> float:
        """f_round: measured round / the corrected terms' prediction of it (1.0 = no bias)."""
        return self.round.factors[0]

    @property
    def speed(self) -> list[float]:
        """f_k: measured / predicted step per client (1.0 = as profiled, 2.0 = twice as slow)."""
        return self.clients.factors

    def curves(self) -> list[ComputeCurve]:
        """The clients' curves, corrected."""
        return [c.scaled(f) for c, f in zip(self.profile.curves, self.speed)]

    def predict(self, batches: Sequence[int], *, corrected: bool = True) -> RoundPrediction:
        """The round at `batches` (one per client), with the corrections or as at start-up. With them,
        t_round carries f_round as well; the parts are the corrected terms."""
        terms = self._terms(batches, corrected)
        return dataclasses.replace(terms, t_round=self.bias * terms.t_round) if corrected else terms

    def _terms(self, batches: Sequence[int], corrected: bool) -> RoundPrediction:
        p = self.profile
        if not corrected:
            return predict_round(p.curves, batches, p.comm, p.model_bytes, p.payload_bytes, p.n_ranks,
                                 p.server_seconds, up=p.up, metrics_bytes=p.metrics_bytes)
        key = tuple(int(b) for b in batches)
        if self._last is not None and self._last[0] == key:  # the factors have not moved since
            return self._last[1]
        f = dict(zip(SHARED, self.shared.factors))
        comm = _ScaledComm(p.comm, {"bcast": f["comm"], p.up: f["comm"]})
        terms = predict_round(self.curves(), batches, comm, p.model_bytes, p.payload_bytes, p.n_ranks,
                              f["server"] * p.server_seconds, up=p.up, metrics_bytes=p.metrics_bytes)
        self._last = (key, terms)
        return terms

    def observe(self, batches: Sequence[int], steps: Sequence[float], t_down: float, t_up: float,
                t_decode: float, t_iter: float) -> None:
        """One round as the log measured it: each client's step (t_compute, without links) at
        `batches`, and the server's t_down, t_up (the wait for the update), t_decode and t_iter.
        A time that is not a positive number leaves its factor as it was: a log gap, not a measurement
        (a client's gap also leaves the collectives', which are measured net of the slowest step).

        Cheap on the server's path between rounds: the corrected round for these batches is the one
        predict() made for this round (remembered), and the uncorrected terms need no order statistic."""
        self.round.update([t_iter], [self._terms(batches, True).t_round])
        self._last = None  # the factors move below
        p = self.profile
        full = np.asarray(steps, dtype=float) + np.asarray(self.links)
        self.clients.update(full, [float(c.predict(b)) for c, b in zip(p.curves, batches)])
        # the server's broadcast and wait for the update span the slowest step; the collectives are
        # the rest (floored: a path the overlap hid says nothing about the collectives' level)
        collectives = sum(round_collectives(p.comm, p.model_bytes, p.payload_bytes, len(p.clients), p.n_ranks,
                                            p.up).values())
        comm = max(t_down + t_up - float(full.max()), 1e-3 * collectives) if np.all(full > 0) else math.nan
        self.shared.update([comm, t_decode], [collectives, p.server_seconds])
