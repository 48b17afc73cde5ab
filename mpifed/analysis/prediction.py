"""How well the performance model ([plan], mpifed.planning) predicted a run's rounds, from the log
alone: the error of the logged prediction t_iter_pred (the start-up fit, corrected online by the
rounds before each one: mpifed.perf.online), of the start-up prediction alone, and of two baselines
that need no model (the last round's time; the run's own median in hindsight), and each start-up
term beside its measured counterpart so that a bad prediction says which term is off. Pure
functions of a loaded Run; no MPI, no torch.

Which rounds count ("steady" rounds): the first `skip` rounds are left out (round 0 includes every
rank arriving from start-up, the next ones the allocator and caches warming; default 3), and so are
rounds with an evaluation (the model predicts training rounds; evaluation is logged apart as t_eval).
The error is measured on the server's t_iter, the round as the server saw it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mpifed.analysis.load import Run
from mpifed.analysis.summary import perf_model_error, samples_per_round, server_rank
from mpifed.perf import OnlineModel, Profile

WARMUP_ROUNDS = 3
"""Default leading rounds left out of every comparison (see the module docstring)."""


def steady_rounds(run: Run, skip: int = WARMUP_ROUNDS) -> np.ndarray:
    """Indices of the rounds compared: after the first `skip`, without evaluations."""
    rounds = np.arange(run.rounds)
    evaluated = np.asarray(run.eval.get("round", []), dtype=float) - 1  # /eval/round is 1-based
    return rounds[(rounds >= skip) & ~np.isin(rounds, evaluated)]


def round_time_error(run: Run, skip: int = WARMUP_ROUNDS) -> tuple[float, int]:
    """MdAPE (%) of the predicted against the measured server round time over the steady rounds,
    and how many rounds had a prediction; (NaN, 0) when the run made none."""
    rows, r = steady_rounds(run, skip), server_rank(run)
    server_only = dataclasses.replace(run, iter={k: v[rows][:, [r]] for k, v in run.iter.items()})
    return perf_model_error(server_only)


def replay_online(run: Run, profile: Profile) -> np.ndarray:
    """Every round's prediction as the server's online model (mpifed.perf.online) makes it,
    recomputed from the log and the run's profile.json: equal to t_iter_pred for a run that was not
    resumed, and for logs written by an older model what the current one would have predicted (the
    prediction of round t uses rounds 1 .. t-1; round 0 holds every rank's arrival)."""
    r, c, it = server_rank(run), run.clients, run.iter
    steps = int(run.job.get("train", {}).get("local_steps", 1))
    batches = np.rint(it["batch"][:, c] / steps).astype(int)
    model = OnlineModel(profile, [float(run.models.get(f"perf.client{k}.link", 0.0)) for k in range(len(c))])
    t_eval = np.nan_to_num(it["t_eval"][:, r])
    predicted = np.empty(run.rounds)
    for rnd in range(run.rounds):
        if rnd >= 2:
            t = rnd - 1
            model.observe(batches[t], it["t_compute"][t, c], it["t_down"][t, r], it["t_up"][t, r],
                          it["t_decode"][t, r], it["t_iter"][t, r] - t_eval[t])
        predicted[rnd] = model.predict(batches[rnd]).t_round
    return predicted


def startup_error(run: Run, skip: int = WARMUP_ROUNDS) -> float:
    """MdAPE (%) of the start-up prediction alone (/models perf.round.t_round, before any round
    corrected it) over the steady rounds; NaN without a plan. Meaningful while the batches are the
    plan's (plan.mode = "predict" or "balance" without re-planning)."""
    if "perf.round.t_round" not in run.models:
        return math.nan
    times = run.iter["t_iter"][steady_rounds(run, skip), server_rank(run)]
    return float(100.0 * np.median(np.abs(float(run.models["perf.round.t_round"]) - times) / times))


def last_round_error(run: Run, skip: int = WARMUP_ROUNDS) -> float:
    """MdAPE (%) of the naive forecast "the next round takes as long as the last": the baseline an
    online model must beat to be more than an echo of the previous round."""
    rows, r = steady_rounds(run, skip), server_rank(run)
    rows = rows[np.isin(rows - 1, rows)]  # the previous round is a steady one too
    if rows.size == 0:
        return math.nan
    t = run.iter["t_iter"][:, r]
    return float(100.0 * np.median(np.abs(t[rows - 1] - t[rows]) / t[rows]))


def noise_floor(run: Run, skip: int = WARMUP_ROUNDS) -> float:
    """MdAPE (%) of the best constant prediction in hindsight, the run's own median round time: what
    round-to-round jitter and drift (e.g. other jobs on shared cores) alone cost any prediction
    made once at start-up. A model error near it is as good as such a prediction can be."""
    times = run.iter["t_iter"][steady_rounds(run, skip), server_rank(run)]
    times = times[np.isfinite(times) & (times > 0)]
    if times.size == 0:
        return math.nan
    return float(100.0 * np.median(np.abs(np.median(times) - times) / times))


def steady_throughput(run: Run, skip: int = WARMUP_ROUNDS) -> float:
    """Samples/s over the steady rounds: their samples over the sum of the server's round times."""
    rows = steady_rounds(run, skip)
    seconds = float(np.nansum(run.iter["t_iter"][rows, server_rank(run)]))
    return float(samples_per_round(run)[rows].sum() / seconds) if seconds > 0 else math.nan


@dataclasses.dataclass(frozen=True)
class Term:
    """One part of the round: predicted seconds and the median measured seconds over steady rounds."""

    name: str
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        """Relative error of the prediction, in percent of the measurement."""
        return 100.0 * (self.predicted - self.measured) / self.measured if self.measured > 0 else math.nan


def terms(run: Run, skip: int = WARMUP_ROUNDS) -> list[Term]:
    """The model's terms beside what the log measured ([] when the run fitted no model):
    broadcast (server t_down), slowest client (max over clients of t_compute), update (server t_up
    minus that slowest t_compute: encode, collectives and decode, which the model times together),
    server (t_decode), round (server t_iter)."""
    m = run.models
    if "perf.round.t_round" not in m:
        return []
    rows, r, c = steady_rounds(run, skip), server_rank(run), run.clients
    it = {k: v[rows] for k, v in run.iter.items()}
    slowest = np.nanmax(it["t_compute"][:, c], axis=1)
    med = lambda x: float(np.nanmedian(x))  # noqa: E731
    return [Term("broadcast", float(m["perf.comm.bcast_seconds"]), med(it["t_down"][:, r])),
            Term("slowest client", float(m["perf.round.t_compute_max"]), med(slowest)),
            Term("update", float(m["perf.comm.up_seconds"]), med(it["t_up"][:, r] - slowest)),
            Term("server", float(m["perf.round.t_server"]), med(it["t_decode"][:, r])),
            Term("round", float(m["perf.round.t_round"]), med(it["t_iter"][:, r]))]
