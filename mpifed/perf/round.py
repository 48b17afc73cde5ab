"""Predicted time of one synchronous round, and the error measure the predictions are judged by.

    t_round = t_bcast(model) + M + t_up(payloads) + t_gather(metrics) + t_server
    M = median of max_k t_k(b_k) exp(s_k Z_k)       (mpifed.perf.straggler)

The clients run in parallel, so only the slowest one counts; everything else is serial on the
round's critical path. The slowest is an order statistic: each client's step jitters (spread s_k of
its curve) and the round waits for the largest draw, so M is above max_k t_k(b_k) by about
s * Phi^-1(2^(-1/K)) for K comparable clients. t_k covers what the client does between receiving the
model and entering the upload (forward/backward, emulated slow-down, emulated link via
ComputeCurve.shifted()); what follows (encoding, collectives, decoding) is in t_up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mpifed.perf.comm import CommModel
from mpifed.perf.curves import ComputeCurve
from mpifed.perf.straggler import slowest_median


@dataclass(frozen=True)
class RoundPrediction:
    """Seconds of each part of a round, the part that bounds it, and samples per second."""

    t_round: float
    t_compute_max: float
    """Median of the slowest client's step (the order statistic M), >= max(t_clients)."""
    t_comm: float
    t_server: float
    t_clients: tuple[float, ...]
    t_collectives: dict
    slowest_client: int
    bound_by: str
    """'client K' (index into the curves), 'link (<collective>)' or 'server': the largest part."""
    global_batch: int

    @property
    def throughput(self) -> float:
        """Samples per second: global batch / round time."""
        return self.global_batch / self.t_round

    def idle(self) -> tuple[float, ...]:
        """Seconds each client's planned step is shorter than the slowest planned step."""
        top = max(self.t_clients)
        return tuple(top - t for t in self.t_clients)


def predict_round(curves: Sequence[ComputeCurve], batches: Sequence[int], comm_model: CommModel,
                  model_bytes: int, payload_bytes: int | Sequence[int], n_ranks: int,
                  server_seconds: float = 0.0, *, up: str = "reduce",
                  metrics_bytes: int = 0) -> RoundPrediction:
    """Predict one round with client k (curves[k]) at batch batches[k].

    model_bytes: the broadcast flat buffer. payload_bytes: what each client uploads (the codec's
    byte count; one number or one per client). up: "reduce" for summable payloads, "gatherv" for
    sparse/quantized ones. metrics_bytes: per-rank row of the metrics gather (0 leaves the gather
    out, for when it is timed outside the iteration). server_seconds: decode + aggregate + step.
    """
    if len(curves) != len(batches) or not curves:
        raise ValueError(f"need one batch per client curve, got {len(batches)} batches "
                         f"for {len(curves)} curves")
    if n_ranks < 2:
        raise ValueError(f"a round needs >= 2 ranks (server + client), got n_ranks={n_ranks}")
    if up not in ("reduce", "gatherv"):
        raise ValueError(f"up must be 'reduce' or 'gatherv', got {up!r}")
    t_clients = tuple(float(c.predict(b)) for c, b in zip(curves, batches))
    slowest = int(np.argmax(t_clients))
    parts = round_collectives(comm_model, model_bytes, payload_bytes, len(curves), n_ranks, up)
    if metrics_bytes > 0:
        parts["gather"] = comm_model.predict("gather", n_ranks, metrics_bytes)
    t_comm = float(sum(parts.values()))
    t_compute = slowest_median(t_clients, [c.spread for c in curves])
    t_round = t_compute + t_comm + server_seconds
    worst = max(("client", t_compute), ("link", t_comm), ("server", server_seconds),
                key=lambda kv: kv[1])[0]
    bound = {"client": f"client {slowest}", "server": "server",
             "link": f"link ({max(parts, key=parts.get)})"}[worst]
    return RoundPrediction(t_round, t_compute, t_comm, float(server_seconds), t_clients, parts,
                           slowest, bound, int(sum(batches)))


def round_collectives(comm_model: CommModel, model_bytes: int, payload_bytes: int | Sequence[int],
                      n_clients: int, n_ranks: int, up: str) -> dict[str, float]:
    """Seconds of the round's model broadcast and update collective: {"bcast": .., up: ..}. A reduce
    moves the largest payload, a gatherv each client's in turn (their mean per client)."""
    payload = np.broadcast_to(np.asarray(payload_bytes, dtype=float), (n_clients,))
    up_bytes = float(payload.max()) if up == "reduce" else float(payload.mean())
    return {"bcast": comm_model.predict("bcast", n_ranks, model_bytes), up: comm_model.predict(up, n_ranks, up_bytes)}


def mdape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Median absolute percentage error, in percent: how the round model is judged (target <= 10%)."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if p.shape != m.shape or p.size == 0:
        raise ValueError(f"need equal, non-empty predicted and measured, got {p.shape} and {m.shape}")
    if np.any(m <= 0):
        raise ValueError("measured times must be > 0")
    return float(100 * np.median(np.abs(p - m) / m))
