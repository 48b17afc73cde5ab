"""Server-side aggregation of gathered payloads, and the in-process reference of a summable exchange.

`aggregate` is what rank 0 does after Gatherv: validate each client's payload, set aside the bad ones
with their reasons (the caller logs them), decode and sum the rest. Each client already multiplied
its update by its weight w_k = b_k / B, so the sum is the weighted mean; if some clients are
rejected, pass `weights` and the sum is divided by the accepted clients' share of the weight, so the
step keeps its size.

Under Reduce the server only ever sees the sum, so it cannot name a bad client: a sum that is not
finite is refused and that round's step is skipped (mpifed.updates.UpdateChannel.receive).

`reduce_in_process` runs a summable codec's phases for several clients and the server in lockstep,
adding the payloads with the codec's own `combine`: exactly what the MPI exchange computes, without
MPI. Tests use it as the reference the over-MPI exchange must equal.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from mpifed.compress.base import (
    F32, Exchanged, OneShot, PayloadError, ReduceCodec, RoundContext, as_flat_f32, check_count,
)


@dataclass(frozen=True)
class Rejection:
    """A client's payload that the server refused, and why. `round` counts from 0 (its run.h5 row); the
    message counts from 1, as the progress lines do."""

    round: int
    client: int
    reason: str

    def __str__(self) -> str:
        return f"round {self.round + 1}: rejected the update of client {self.client}: {self.reason}"


class Aggregate(NamedTuple):
    total: np.ndarray  # float32, n: sum of the accepted decoded updates (rescaled if weights given)
    accepted: list[int]  # client ids whose payloads were used
    rejections: list[Rejection]


def aggregate(codec: OneShot, payloads: Sequence[np.ndarray], clients: Sequence[int], n: int,
              seed: int, round: int, weights: Sequence[float] | None = None,
              squares: np.ndarray | None = None, out: np.ndarray | None = None) -> Aggregate:
    """Validate, decode and sum one round's client payloads.

    payloads[i] came from client clients[i]. weights[i], if given, is the w_k that client applied;
    the sum is then divided by the accepted clients' total weight over all clients' total weight.
    With no payload accepted the total is zeros and `accepted` is empty: skip the step.
    squares, if given (n float32, needs weights), receives sum_k decoded_k^2 / w_k = sum_k w_k g_k^2
    over the accepted clients, rescaled like the total: the teacher's per-coordinate statistic,
    taken from the decodes the server makes anyway.
    out, if given (n float32), is overwritten with the total and returned as it: no n-sized array
    per round on the server.
    """
    if not isinstance(codec, OneShot):
        raise ValueError(f"codec {codec.name!r} is multi-phase; run it with codec.exchange, not aggregate")
    n = check_count(n)
    if len(payloads) != len(clients) or (weights is not None and len(weights) != len(clients)):
        raise ValueError(f"aggregate got {len(payloads)} payloads for {len(clients)} clients"
                         + ("" if weights is None else f" and {len(weights)} weights"))
    if squares is not None and (weights is None or squares.shape != (n,)):
        raise ValueError(f"squares needs the clients' weights and shape ({n},)")
    if out is not None and (out.dtype != F32 or out.shape != (n,)):
        raise ValueError(f"out must be float32 of shape ({n},), got {out.dtype} {out.shape}")
    total = np.zeros(n, dtype=F32) if out is None else out
    total.fill(0.0)
    if squares is not None:
        squares.fill(0.0)
    accepted: list[int] = []
    rejections: list[Rejection] = []
    for i, (payload, client) in enumerate(zip(payloads, clients)):
        ctx = RoundContext(seed, round, client)
        try:
            codec.validate(payload, n, ctx)
        except PayloadError as err:
            rejections.append(Rejection(round, client, str(err)))
            continue
        codec.decode_add(payload, n, ctx, total, squares, weights[i] if squares is not None else 1.0)
        accepted.append(client)
    if weights is not None and rejections and accepted:
        kept = set(accepted)
        scale = np.float32(sum(weights) / sum(w for w, c in zip(weights, clients) if c in kept))
        total *= scale
        if squares is not None:
            squares *= scale
    return Aggregate(total, accepted, rejections)


def reduce_in_process(codec: ReduceCodec, updates: Sequence[np.ndarray], clients: Sequence[int],
                      seed: int, round: int, keep_own: bool = False) -> tuple[np.ndarray, list[Exchanged]]:
    """Run a summable codec for `updates` of `clients` plus a server contributing zeros, in one process.

    Returns (the server's decoded total, each client's Exchanged). Payloads are summed in rank order
    (server first) with codec.combine, as a linear reduction would.
    """
    if not updates:
        raise ValueError("reduce_in_process needs at least one client update")
    xs = [as_flat_f32(u) for u in updates]
    # One codec object per client, copied from the server's: stateful codecs (PowerSGD's warm start)
    # hold the same state on every rank, because every rank received the same sums.
    replicas = [copy.deepcopy(codec) for _ in xs]
    steps = [codec.phases(np.zeros_like(xs[0]), RoundContext(seed, round), False)]
    steps += [c.phases(x, RoundContext(seed, round, k), keep_own) for c, x, k in zip(replicas, xs, clients)]
    payloads = [next(s) for s in steps]
    while True:
        summed = payloads[0]
        for p in payloads[1:]:
            summed = codec.combine(summed, p)
        results, payloads = [], []
        for s in steps:
            try:
                payloads.append(s.send(summed.copy()))
            except StopIteration as done:
                results.append(done.value)
        if results:
            if len(results) != len(steps):
                raise RuntimeError(f"{codec.name}: ranks finished after different numbers of phases")
            return results[0].total, results[1:]

