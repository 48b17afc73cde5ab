"""The performance model with pooled clients (plan.mode = "predict"): a curve per device profile, and
each round predicted from its placement.

Start-up, one collective step after the batches are agreed (start_pool_model):
  1. every rank times the round's two large collectives bare, at their sizes (the model's broadcast;
     the update's reduce, or a worker's share of the gathered payloads: mpifed.perf.measure_collectives);
  2. every worker times every profile's local step (E steps, its emulated speed included:
     probes.profile_step) at plan.points + 1 batch sizes up to the profile's batch (or plan.profile_max),
     plan.repeats times after one warm-up, all workers at once as in a round; the server times its own
     step (probes.server_step) meanwhile;
  3. rank 0 fits one curve per profile to the medians over workers and repeats (perf.ComputeCurve): the
     memory model and the performance model see a profile once, not each of its clients.

A client's predicted time is its profile's curve at its batch plus its emulated link (down and up).
The balanced placement uses these times (sampling.place_clients); a checkpoint keeps them, so a resumed
run places its clients as the uninterrupted one did. Each round r the server predicts, before the round,

    t_round = f_fixed (t_bcast + t_up + t_server) + max_w sum_{k on w} (f_p(k) t_p(k)(b_k) + link_k)

(the busiest worker, since a worker trains its clients one after another), with f_p and f_fixed
geometric moving averages of measured / predicted (perf.online.Calibration): f_p from the /clients
t_compute of profile p's clients, f_fixed from the round less its busiest worker's clients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from mpifed import probes, profiles
from mpifed.config import JobError
from mpifed.perf import ComputeCurve, measure_collectives
from mpifed.perf.online import Calibration
from mpifed.planning import WARMUP_STEPS, probe_grid
from mpifed.runlog import CLIENT_FIELDS
from mpifed.session import Session

T_COMPUTE, RANK = CLIENT_FIELDS.index("t_compute"), CLIENT_FIELDS.index("rank")


@dataclass
class PoolModel:
    """Rank 0's model of a pooled round: the profiles' curves, each client's profile and link, the
    round's fixed terms, and the factors that the rounds calibrate."""

    names: list[str]                # profile names, sorted
    curves: list[ComputeCurve]      # per profile: seconds of a client's E local steps at batch b
    samples: list[tuple]            # per profile: (batch, median seconds) it was fitted to
    profile_of: np.ndarray          # per client: index into names
    batches: np.ndarray             # per client
    links: np.ndarray               # per client: emulated link seconds (download + upload)
    t_bcast: float
    t_up: float
    t_server: float
    seconds: float                  # wall time of the start-up step
    calibration: Calibration = field(init=False)

    def __post_init__(self) -> None:
        self.calibration = Calibration(len(self.names) + 1)

    @property
    def fixed(self) -> float:
        """The round's seconds besides its clients' steps, uncorrected."""
        return self.t_bcast + self.t_up + self.t_server

    def steps(self, ids: np.ndarray, corrected: bool = True) -> np.ndarray:
        """Predicted seconds of clients `ids`' local steps at their batches, without their links."""
        factors = np.array(self.calibration.factors[:-1] if corrected else [1.0] * len(self.names))
        which, out = self.profile_of[ids], np.empty(len(ids))
        for i, curve in enumerate(self.curves):
            mine = which == i
            out[mine] = factors[i] * np.atleast_1d(curve.predict(self.batches[ids][mine]))
        return out

    def rebatch(self, batches) -> None:
        """The clients' batches from now on (grown by scaling.grow_batch, or a resumed run's)."""
        self.batches = np.asarray(batches, dtype=np.int64).copy()

    def client_seconds(self) -> np.ndarray:
        """Every client's predicted time at start-up (its steps and its link): what placement balances."""
        return self.steps(np.arange(len(self.batches)), corrected=False) + self.links

    def predict(self, assignment: np.ndarray) -> float:
        """The round of a (4, K) assignment (ids; ranks), with the factors so far."""
        ids, ranks = assignment[0], assignment[1]
        busy = np.bincount(ranks, self.steps(ids) + self.links[ids])
        return self.calibration.factors[-1] * self.fixed + float(busy.max())

    def observe(self, clients: np.ndarray, t_round: float) -> None:
        """One round as measured: the /clients table (ids, ranks, t_compute without links) and the
        round's time less its evaluation. A profile not in the round keeps its factor."""
        ids = clients[:, CLIENT_FIELDS.index("id")].astype(np.int64)
        measured, predicted = clients[:, T_COMPUTE], self.steps(ids, corrected=False)
        which = self.profile_of[ids]
        m, p = np.full(len(self.names) + 1, math.nan), np.full(len(self.names) + 1, math.nan)
        for i in np.unique(which):
            mine = (which == i) & (measured > 0)
            if mine.any():  # geometric means: the ratio of the two is the clients' mean log ratio
                m[i], p[i] = np.exp(np.log(measured[mine]).mean()), np.exp(np.log(predicted[mine]).mean())
        busy = np.bincount(clients[:, RANK].astype(np.int64), measured + self.links[ids]).max()
        m[-1], p[-1] = t_round - busy, self.fixed
        self.calibration.update(m, p)

    def _profile_batches(self) -> list[int]:
        return [int(self.batches[np.flatnonzero(self.profile_of == i)[0]]) for i in range(len(self.names))]

    def model_attrs(self) -> dict[str, dict]:
        """/models attributes: perf.profile.<name> (its curve, batch, samples) and perf.round."""
        out = {}
        for i, (name, curve, samples, b) in enumerate(zip(self.names, self.curves, self.samples,
                                                          self._profile_batches())):
            out[f"perf.profile.{name}"] = dict(curve.to_dict(), batch=b,
                                              clients=int((self.profile_of == i).sum()),
                                              profile_batches=np.array([b for b, _ in samples], dtype=np.int64),
                                              profile_seconds=np.array([t for _, t in samples]))
        out["perf.round"] = dict(mode="predict", pooled=True, bcast_seconds=self.t_bcast, up_seconds=self.t_up,
                                 t_server=self.t_server, startup_seconds=self.seconds)
        return out

    def record(self, writer, run_dir) -> None:
        """Rank 0, new logs only: the /models attributes, before the log turns SWMR."""
        for name, values in self.model_attrs().items():
            writer.set_model_attrs(name, values)

    def describe(self) -> list[str]:
        """Rank 0's start-up report: the fixed terms and each profile's curve."""
        ms = lambda t: f"{1e3 * t:.1f}"  # noqa: E731
        lines = [f"plan (predict, pooled clients; start-up profile {self.seconds:.1f} s): a round = broadcast "
                 f"{ms(self.t_bcast)} + update {ms(self.t_up)} + server {ms(self.t_server)} ms + the busiest "
                 f"worker's clients"]
        for name, curve, b in zip(self.names, self.curves, self._profile_batches()):
            lines.append(f"  profile {name}: t(b) = max({ms(curve.t_floor)}, {ms(curve.a)} + {1e3 * curve.c:.3f} b) "
                         f"ms (fit rms {100 * curve.rel_rms:.1f}%), a client at b={b}: {ms(curve.predict(b))} ms")
        return lines


def start_pool_model(s: Session, setup) -> PoolModel | None:
    """The collective start-up step (see the module docstring); rank 0 gets the model, the workers None.
    `setup` is the worker's WorkerSetup (None on the server)."""
    cfg = s.job.plan
    if cfg.mode == "off":
        return None
    start = time.perf_counter()
    names, profile_of = list(s.profile_names.names), s.profile_names.codes.astype(np.int64)
    batches = [int(s.batches[np.flatnonzero(profile_of == i)[0]]) for i in range(len(names))]
    for name, b in zip(names, batches):
        if max(b, cfg.profile_max) < 2:
            raise JobError(f"profile {name}: the planner times at least two batch sizes, but its clients' batch "
                           f"is {b}; raise the profile's batch or set plan.profile_max >= 2")
    model_bytes, up_bytes = 4 * s.model.size, probes.update_bytes(s)
    up = probes.update_collective(s)
    per_worker = math.ceil(s.placement.round_size / s.placement.workers)
    s.exchange.arrive()
    bare = measure_collectives(s.world.comm, {"bcast": [model_bytes],
                                              up: [up_bytes * (per_worker if up == "gatherv" else 1)]}, cfg.repeats)
    grids = [probe_grid(cfg.profile_max or b, cfg.points, b) for b in batches]
    if setup is None:
        step = probes.server_step(s)
        table = np.array([_timed(step) for _ in range(WARMUP_STEPS + cfg.repeats)][WARMUP_STEPS:])
    else:
        rows = []
        for i, name in enumerate(names):
            step = probes.profile_step(s, s.job.profile(name), setup.samples, i)
            for b in grids[i]:
                for j in range(WARMUP_STEPS + cfg.repeats):
                    seconds = _timed(lambda: step(b))
                    if j >= WARMUP_STEPS:
                        rows.append((i, b, seconds))
        table = np.array(rows)
    s.exchange.arrive()  # the server waits politely while the workers time their steps
    gathered = s.world.comm.gather(table, root=0)  # once, at start-up: pickling is fine here
    if not s.world.is_server:
        return None
    steps = np.concatenate(gathered[1:])
    curves, samples = [], []
    for i in range(len(names)):
        mine = steps[steps[:, 0] == i]
        medians = tuple((int(b), float(np.median(mine[mine[:, 1] == b, 2]))) for b in np.unique(mine[:, 1]))
        curves.append(ComputeCurve.fit(medians))
        samples.append(medians)
    links = s.profile_names.per_client(np.array([  # per profile, spread to its clients
        profiles.link_seconds(s.job.profile(name), model_bytes) + profiles.link_seconds(s.job.profile(name), up_bytes)
        for name in names], dtype=np.float64))
    t_bcast, t_up = (next(c.seconds for c in bare if c.kind == kind) for kind in ("bcast", up))
    return PoolModel(names, curves, samples, profile_of, np.asarray(s.batches, dtype=np.int64), links, t_bcast, t_up,
                     float(np.median(gathered[0])), time.perf_counter() - start)


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start
