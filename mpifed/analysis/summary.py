"""The numbers a researcher asks of a run first: where the time goes on each rank, how long clients
wait for stragglers, samples per second, bytes per round, accuracy, and how far the performance
model's predictions were from what was measured. Pure functions of a loaded Run; no I/O.

Conventions: a round's samples are the sum of the clients' `batch` columns (b_k times local steps,
so E > 1 counts every local step); throughput divides them by the server's t_iter, the round as the
server saw it. Shares are ratios of sums over rounds (sum t_wait / sum t_iter), so long rounds weigh
more than short ones, as they do in the wall time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from mpifed.analysis.clients import client_count
from mpifed.analysis.load import Run
from mpifed.perf.round import mdape

# Stacked parts of a round, in the order a round runs. comm is the update collective minus the
# straggler wait; other is what the logged phases leave unexplained (loop overhead, the row gather).
PHASES = ("down", "compute", "encode", "comm", "wait", "decode", "eval", "other")


def _field(run: Run, name: str) -> np.ndarray:
    """An /iter field with NaN (not measured on that rank, or absent from the log) read as 0 s."""
    values = run.iter.get(name)
    if values is None:
        return np.zeros_like(run.iter["t_iter"])
    return np.nan_to_num(values, nan=0.0)


def phase_times(run: Run) -> dict[str, np.ndarray]:
    """Each phase of PHASES as a (T, N) array of seconds; the phases add up to t_iter."""
    t_up, t_wait = _field(run, "t_up"), _field(run, "t_wait")
    parts = {"down": _field(run, "t_down"), "compute": _field(run, "t_compute"),
             "encode": _field(run, "t_encode"), "comm": np.clip(t_up - t_wait, 0.0, None),
             "wait": t_wait, "decode": _field(run, "t_decode"), "eval": _field(run, "t_eval")}
    parts["other"] = np.clip(_field(run, "t_iter") - sum(parts.values()), 0.0, None)
    return parts


def breakdown(run: Run, stat: str = "mean") -> dict[str, np.ndarray]:
    """Per-rank (N,) mean or median seconds of each phase over the rounds."""
    reduce = {"mean": np.mean, "median": np.median}[stat]
    if run.rounds == 0:
        return {p: np.full(run.world_size, np.nan) for p in PHASES}
    return {p: reduce(v, axis=0) for p, v in phase_times(run).items()}


def share(run: Run, name: str) -> np.ndarray:
    """Per-rank (N,) fraction of the round time spent in an /iter field: sum(field) / sum(t_iter)."""
    total = np.nansum(run.iter["t_iter"], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(_field(run, name), axis=0) / total


def client_share(run: Run, name: str) -> float:
    """The same fraction over all clients together."""
    c = run.clients
    total = np.nansum(run.iter["t_iter"][:, c])
    return float(np.nansum(_field(run, name)[:, c]) / total) if total > 0 else math.nan


def server_rank(run: Run) -> int:
    roles = list(run.ranks["role"])
    return roles.index("server") if "server" in roles else 0


def samples_per_round(run: Run) -> np.ndarray:
    """(T,) samples all clients processed in each round."""
    return np.nansum(run.iter["batch"][:, run.clients], axis=1)


def throughput_series(run: Run) -> np.ndarray:
    """(T,) samples/s of each round: its samples over the server's t_iter."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return samples_per_round(run) / run.iter["t_iter"][:, server_rank(run)]


def throughput(run: Run) -> float:
    """Samples/s over the whole run: all samples over the sum of the server's round times."""
    seconds = np.nansum(run.iter["t_iter"][:, server_rank(run)])
    return float(samples_per_round(run).sum() / seconds) if seconds > 0 else math.nan


def bytes_per_round(run: Run, name: str) -> float:
    """Mean bytes all clients sent (bytes_up) or received (bytes_down) per round."""
    values = run.iter.get(name)
    if values is None or run.rounds == 0:
        return math.nan
    return float(np.nanmean(np.nansum(values[:, run.clients], axis=1)))


WARMUP_ROUNDS = 3
"""Leading rounds left out of the performance model's error: round 0 includes every rank arriving
from start-up, the next ones the allocator and caches warming."""


def steady_rounds(run: Run, skip: int = WARMUP_ROUNDS) -> np.ndarray:
    """Indices of the rounds a prediction is judged on: after the first `skip`, without evaluations
    (the model predicts training rounds; evaluation is logged apart as t_eval)."""
    rounds = np.arange(run.rounds)
    evaluated = np.asarray(run.eval.get("round", []), dtype=float) - 1  # /eval/round r: after round index r - 1 (0: the initial model)
    return rounds[(rounds >= skip) & ~np.isin(rounds, evaluated)]


def perf_model_error(run: Run, skip: int = WARMUP_ROUNDS) -> tuple[float, int]:
    """MdAPE (%) of the predicted (t_iter_pred) against the measured round time (the server's t_iter)
    over the steady rounds, and how many rounds had a prediction; (NaN, 0) when no performance model
    ran (t_iter_pred all NaN or absent)."""
    pred = run.iter.get("t_iter_pred")
    if pred is None:
        return math.nan, 0
    rows, r = steady_rounds(run, skip), server_rank(run)
    pred, meas = pred[rows, r], run.iter["t_iter"][rows, r]
    ok = np.isfinite(pred) & np.isfinite(meas) & (meas > 0)
    if not ok.any():
        return math.nan, 0
    return mdape(pred[ok], meas[ok]), int(ok.sum())


def wall_time(run: Run) -> float:
    """Seconds from the first round's start to the last round's end (server clock); NaN without rounds."""
    if run.rounds == 0:
        return math.nan
    wall = run.server.get("wall")
    if wall is not None and len(wall) and np.isfinite(wall[-1]):
        return float(wall[-1])
    return float(np.nansum(run.iter["t_iter"][:, server_rank(run)]))


@dataclass(frozen=True)
class Accuracy:
    final: float          # test accuracy at the last evaluation
    best: float
    best_round: float     # round (1-based) of the best evaluation
    final_loss: float     # test loss at the last evaluation
    evals: int


def accuracy(run: Run) -> Accuracy:
    acc = run.eval.get("test_acc")
    if acc is None or not np.isfinite(acc).any():
        return Accuracy(math.nan, math.nan, math.nan, math.nan, 0)
    i = int(np.nanargmax(acc))
    loss = run.eval.get("test_loss", np.full_like(acc, np.nan))
    return Accuracy(float(acc[-1]), float(acc[i]), float(run.eval["round"][i]), float(loss[-1]), len(acc))


@dataclass(frozen=True)
class RankStats:
    rank: int
    role: str
    profile: str
    batch: float                    # mean samples per round
    t_iter_mean: float
    t_iter_median: float
    mean: dict[str, float]          # seconds per phase (PHASES)
    median: dict[str, float]
    wait_share: float               # sum t_wait / sum t_iter
    emul_share: float               # sum t_emul / sum t_iter: the part that emulated a slower device


@dataclass(frozen=True)
class Participation:
    """Pooled clients (/clients): how often each of the N clients trained, and its time per round."""

    clients: int                    # N
    trained: int                    # clients that trained at least once
    rounds_min: int                 # rounds per client: fewest, median, most
    rounds_median: float
    rounds_max: int
    t_compute_median: float         # seconds a client's round took, median over client-rounds
    t_compute_p95: float
    slowest: list[int]              # the clients with the longest median round, slowest first (up to 5)


def participation(run: Run) -> Participation | None:
    """Participation counts and per-client time, from the log's /clients; None with one client per rank."""
    if not run.pooled:
        return None
    n = client_count(run)
    ids = run.pooled["id"].astype(np.int64).ravel()
    seconds = run.pooled["t_compute"].ravel()
    counts = np.bincount(ids, minlength=n)
    per_client = [np.median(seconds[ids == k]) if counts[k] else -np.inf for k in range(n)]
    slowest = [int(k) for k in np.argsort(per_client)[::-1][:5] if counts[k]]
    return Participation(clients=n, trained=int((counts > 0).sum()), rounds_min=int(counts.min()),
                         rounds_median=float(np.median(counts)), rounds_max=int(counts.max()),
                         t_compute_median=_median(seconds), t_compute_p95=float(np.percentile(seconds, 95)),
                         slowest=slowest)


def clients_per_round(run: Run) -> int:
    """K: the job's clients.per_round, N where it samples all (0, or K >= N)."""
    n = client_count(run)
    k = int(run.job.get("clients", {}).get("per_round") or 0)
    return k if 0 < k < n else n


@dataclass(frozen=True)
class Skipped:
    """Rounds whose step the server skipped (no usable update: /server/skipped, mpifed.skipped)."""

    rounds: int                     # how many
    first: int                      # the first such round, 1-based; 0 when none
    diverged: bool                  # the log ends with train.max_skipped of them in a row: the run stopped there


def skipped_steps(run: Run) -> Skipped | None:
    """The skipped steps of a run; None for a log written before they were logged."""
    flags = run.server.get("skipped")
    if flags is None:
        return None
    hit = np.flatnonzero(flags == 1)
    tail = len(flags) - 1 - int(np.flatnonzero(flags != 1)[-1]) if (flags != 1).any() else len(flags)
    limit = int(run.job.get("train", {}).get("max_skipped", 0) or 0)
    return Skipped(rounds=len(hit), first=int(hit[0]) + 1 if len(hit) else 0,
                   diverged=bool(limit) and tail >= limit)


@dataclass(frozen=True)
class Summary:
    name: str
    path: str
    rounds: int
    world_size: int
    client_ranks: int               # ranks that train clients (all but the server)
    clients: int                    # N, the job's clients (several a rank when pooled)
    clients_per_round: int          # K of them sampled each round (N: all)
    wall_s: float
    samples_per_round: float
    throughput: float               # samples/s, whole run
    throughput_median: float        # samples/s, median round
    bytes_up_per_round: float
    bytes_down_per_round: float
    client_wait_share: float
    client_emul_share: float
    perf_mdape: float               # %, NaN when no performance model ran
    perf_points: int                # steady rounds with a prediction
    accuracy: Accuracy
    ranks: list[RankStats]
    participation: Participation | None = None
    skipped: Skipped | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready values: NaN becomes None."""
        return _json_ready(asdict(self))


def summarize(run: Run) -> Summary:
    mean, median = breakdown(run, "mean"), breakdown(run, "median")
    t_iter = run.iter["t_iter"]
    wait, emul = share(run, "t_wait"), share(run, "t_emul")
    profile = run.ranks.get("profile", np.full(run.world_size, "-", dtype=object))
    batch = run.iter["batch"]
    ranks = [RankStats(rank=r, role=str(run.ranks["role"][r]), profile=str(profile[r]),
                       batch=_mean(batch[:, r]), t_iter_mean=_mean(t_iter[:, r]),
                       t_iter_median=_median(t_iter[:, r]),
                       mean={p: float(v[r]) for p, v in mean.items()},
                       median={p: float(v[r]) for p, v in median.items()},
                       wait_share=float(wait[r]), emul_share=float(emul[r]))
             for r in range(run.world_size)]
    mdape, points = perf_model_error(run)
    per_round = samples_per_round(run)
    return Summary(name=run.name, path=str(run.path), rounds=run.rounds, world_size=run.world_size,
                   client_ranks=len(run.clients), clients=client_count(run),
                   clients_per_round=clients_per_round(run),
                   wall_s=wall_time(run),
                   samples_per_round=_mean(per_round), throughput=throughput(run),
                   throughput_median=_median(throughput_series(run)),
                   bytes_up_per_round=bytes_per_round(run, "bytes_up"),
                   bytes_down_per_round=bytes_per_round(run, "bytes_down"),
                   client_wait_share=client_share(run, "t_wait"), client_emul_share=client_share(run, "t_emul"),
                   perf_mdape=mdape, perf_points=points, accuracy=accuracy(run), ranks=ranks,
                   participation=participation(run), skipped=skipped_steps(run))


def _mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else math.nan


def _json_ready(value: object) -> object:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value
