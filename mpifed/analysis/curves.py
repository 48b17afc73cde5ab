"""Learning curves: train and test loss and accuracy against rounds, samples seen, bytes sent and wall
time, as the arrays the plots draw. Pure functions of a loaded Run; no I/O, no matplotlib.

Every point sits at the model it measures, counted in server updates (round 0 = the initial model):
- the train loss and accuracy logged in round r (1-based) are the clients' on their batches *before* that
  round's update, so they measure the model after r - 1 updates and are drawn at x = r - 1; the log's
  first train loss is the initial model's (a log written before train accuracy was logged has none);
- an evaluation logged at round e measures the model after e updates and is drawn at x = e (a log with an
  evaluation at round 0 shows the initial model's test loss and accuracy).
The other x axes are read at the same model: the samples the clients had trained on, the bytes they had
sent up (the compressed direction; the model broadcast down is the same for every codec), and the seconds
since the run started.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpifed.analysis.load import Run
from mpifed.analysis.summary import samples_per_round, server_rank

# The x axes of a learning curve: key, axis label.
AXES = (("round", "round (server updates)"), ("samples", "samples seen"),
        ("bytes", "bytes sent up by the clients"), ("wall", "wall time (s)"))


@dataclass(frozen=True)
class Curve:
    """One measured series at the models it measured: x per axis of AXES (same length as y)."""

    x: dict[str, np.ndarray]
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Curves:
    train_loss: Curve
    test_loss: Curve
    test_acc: Curve
    train_acc: Curve


def progress(run: Run) -> dict[str, np.ndarray]:
    """(T + 1,) per axis: where the run stood after 0, 1, ..., T updates (round, samples, bytes, seconds)."""
    rounds = np.arange(run.rounds + 1, dtype=float)
    up = run.iter.get("bytes_up")
    sent = (np.nansum(up[:, run.clients], axis=1) if up is not None and np.isfinite(up[:, run.clients]).any()
            else np.full(run.rounds, np.nan))
    wall = run.server.get("wall")
    if wall is None or not np.isfinite(wall).all():  # an older log: the server's round times, summed
        wall = np.cumsum(np.nan_to_num(run.iter["t_iter"][:, server_rank(run)]))
    return {"round": rounds, "samples": _from_zero(np.cumsum(samples_per_round(run))),
            "bytes": _from_zero(np.cumsum(sent)), "wall": _from_zero(wall)}


def _from_zero(after: np.ndarray) -> np.ndarray:
    return np.concatenate(([0.0], np.asarray(after, dtype=float)))


def learning_curves(run: Run) -> Curves:
    """The train loss and accuracy of every round and each evaluation's test loss and accuracy (see the
    module's docstring for where each point sits)."""
    at = progress(run)
    before = {k: v[np.arange(run.rounds)] for k, v in at.items()}  # round r's batches: the model after r - 1
    train = {name: Curve(before, np.asarray(run.server.get(name, np.full(run.rounds, np.nan)), dtype=float))
             for name in ("train_loss", "train_acc")}
    logged = np.asarray(run.eval.get("round", []), dtype=float)
    kept = logged <= run.rounds  # a live log's evaluation may be a round ahead of its cut series
    x = {k: v[logged[kept].astype(int)] for k, v in at.items()}
    if "wall" in run.eval:
        x["wall"] = run.eval["wall"][kept]  # measured after the evaluation itself
    empty = np.full(len(logged), np.nan)
    return Curves(test_loss=Curve(x, run.eval.get("test_loss", empty)[kept]),
                  test_acc=Curve(x, run.eval.get("test_acc", empty)[kept]), **train)
