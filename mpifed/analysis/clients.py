"""Per-client views: how often each client trained and its loss, update norm, time and batch, as the
arrays the plots draw. Pure functions of a loaded Run; no I/O, no matplotlib.

Pooled runs (more clients than client ranks, or K of N sampled each round) log every client that trained
in /clients (its id, batch, loss, time, norm); with one client per rank, client k is rank k + 1's column
of /iter and trains every round. Both read as the same (N, T) grid: client by round, NaN where the client
did not train.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpifed.analysis.load import Run

FIELDS = ("batch", "loss", "grad_norm", "t_compute")


@dataclass(frozen=True)
class ClientGrid:
    """(N, T) per field of FIELDS: client k's value in round t (0-based), NaN where it did not train."""

    values: dict[str, np.ndarray]
    trained: np.ndarray             # (N, T) bool

    @property
    def clients(self) -> int:
        return self.trained.shape[0]

    @property
    def participation(self) -> np.ndarray:
        """(N,) rounds each client trained in."""
        return self.trained.sum(axis=1)

    def per_client(self, field: str, stat: str = "mean") -> np.ndarray:
        """(N,) one statistic (mean, median, min, max) over the rounds each client trained; NaN for a
        client that never trained."""
        values = self.values[field]
        out = np.full(self.clients, np.nan)
        seen = np.isfinite(values).any(axis=1)
        reduce = {"mean": np.nanmean, "median": np.nanmedian, "min": np.nanmin, "max": np.nanmax}[stat]
        out[seen] = reduce(values[seen], axis=1)
        return out


def client_count(run: Run) -> int:
    """N: the job's clients.count, else one client per client rank (count = 0), else as many as the log's
    /clients names."""
    count = int(run.job.get("clients", {}).get("count") or 0)
    if count:
        return count
    if run.pooled and "id" in run.pooled and run.pooled["id"].size:
        return max(len(run.clients), int(np.nanmax(run.pooled["id"])) + 1)
    return len(run.clients)


def client_grid(run: Run) -> ClientGrid:
    """Every client's values per round (see the module's docstring)."""
    n, rounds = client_count(run), run.rounds
    values = {f: np.full((n, rounds), np.nan) for f in FIELDS}
    if run.pooled:
        ids = run.pooled["id"]
        t, slot = np.nonzero(np.isfinite(ids))
        k = ids[t, slot].astype(int)
        for f in FIELDS:
            if f in run.pooled:
                values[f][k, t] = run.pooled[f][t, slot]
        trained = np.zeros((n, rounds), dtype=bool)
        trained[k, t] = True
    else:
        for f in FIELDS:
            if f in run.iter:
                values[f][:] = run.iter[f][:, run.clients].T
        trained = np.isfinite(values["batch"]) & (values["batch"] > 0)
    return ClientGrid(values=values, trained=trained)
