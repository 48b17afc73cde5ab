"""How well the performance model ([plan], mpifed.planning) predicted a run's rounds, from the log
alone: the error of the logged prediction t_iter_pred (the start-up fit, corrected online by the
rounds before each one: mpifed.perf.online), of the start-up prediction alone, and of two baselines
that need no model (the last round's time; the run's own median in hindsight), and each start-up
term beside its measured counterpart so that a bad prediction says which term is off. Pure
functions of a loaded Run; no MPI, no torch.

Which rounds count: mpifed.analysis.summary.steady_rounds (the first 3 and those with an evaluation
left out), and the error of the logged prediction is summary.perf_model_error, the figure
`mpifed analyze` prints. Errors are measured on the server's t_iter, the round as the server saw it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mpifed.analysis.load import Run
from mpifed.analysis.summary import WARMUP_ROUNDS, samples_per_round, server_rank, steady_rounds
from mpifed.perf import OnlineModel, Profile, mdape

__all__ = ["WARMUP_ROUNDS", "steady_rounds", "replay_online", "startup_error", "last_round_error", "noise_floor",
           "steady_throughput", "Term", "terms"]


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
    times = times[np.isfinite(times) & (times > 0)]
    if times.size == 0:
        return math.nan
    return mdape(np.full_like(times, float(run.models["perf.round.t_round"])), times)


def last_round_error(run: Run, skip: int = WARMUP_ROUNDS) -> float:
    """MdAPE (%) of the naive forecast "the next round takes as long as the last": the baseline an
    online model must beat to be more than an echo of the previous round."""
    rows, r = steady_rounds(run, skip), server_rank(run)
    rows = rows[np.isin(rows - 1, rows)]  # the previous round is a steady one too
    if rows.size == 0:
        return math.nan
    t = run.iter["t_iter"][:, r]
    return mdape(t[rows - 1], t[rows])


def noise_floor(run: Run, skip: int = WARMUP_ROUNDS) -> float:
    """MdAPE (%) of the best constant prediction in hindsight, the run's own median round time: what
    round-to-round jitter and drift (e.g. other jobs on shared cores) alone cost any prediction
    made once at start-up. A model error near it is as good as such a prediction can be."""
    times = run.iter["t_iter"][steady_rounds(run, skip), server_rank(run)]
    times = times[np.isfinite(times) & (times > 0)]
    if times.size == 0:
        return math.nan
    return mdape(np.full_like(times, np.median(times)), times)


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
    """The model's terms beside what the log measured ([] when the run fitted no model): slowest
    client (max over clients of t_compute), collectives (the server's t_down + t_up less that slowest
    step: the broadcast, the update path and its encode; one term, as the online model calibrates
    it, because with more ranks than cores the broadcast overlaps the clients' compute and only the
    sum is stable), server (t_decode: decode, aggregate, optimizer step), round (server t_iter)."""
    m = run.models
    if "perf.round.t_round" not in m:
        return []
    rows, r, c = steady_rounds(run, skip), server_rank(run), run.clients
    it = {k: v[rows] for k, v in run.iter.items()}
    slowest = np.nanmax(it["t_compute"][:, c], axis=1)
    med = lambda x: float(np.nanmedian(x))  # noqa: E731
    collectives = float(m["perf.comm.bcast_seconds"]) + float(m["perf.comm.up_seconds"])
    return [Term("slowest client", float(m["perf.round.t_compute_max"]), med(slowest)),
            Term("collectives", collectives, med(it["t_down"][:, r] + it["t_up"][:, r] - slowest)),
            Term("server", float(m["perf.round.t_server"]), med(it["t_decode"][:, r])),
            Term("round", float(m["perf.round.t_round"]), med(it["t_iter"][:, r]))]
