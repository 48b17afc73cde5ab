"""Batch planner: split a global batch so that every client finishes its step at the same time.

A synchronous round waits for its slowest client, so the best split of a global batch B minimises
max_k t_k(b_k) subject to sum b_k = B and 1 <= b_k <= cap_k (cap_k from the memory model). Faster
clients therefore take larger batches; the server weights updates by b_k / B, so the aggregate is
still the mean gradient over B samples. The solution is exact on integers: bisect the finish time
T for the continuous water level, take for each client the largest batch that finishes by T, then
hand out the last few samples one at a time to whichever client's next sample finishes earliest
(greedy is optimal for a min-max of non-decreasing per-client costs).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from mpifed.perf.curves import ComputeCurve
from mpifed.perf.round import RoundPrediction


def _check(curves: Sequence[ComputeCurve], caps: Sequence[int], global_batch: int) -> None:
    if len(curves) != len(caps) or not curves:
        raise ValueError(f"need one max batch per client curve, got {len(caps)} caps "
                         f"for {len(curves)} curves")
    bad = [k for k, c in enumerate(caps) if int(c) < 1]
    if bad:
        raise ValueError(f"clients {bad} have a max batch below 1 (memory model cap {[caps[k] for k in bad]}); "
                         "give them more memory or leave them out of the round")
    if global_batch < len(caps):
        raise ValueError(f"global batch {global_batch} is smaller than the {len(caps)} clients; "
                         "every client needs at least one sample: raise the global batch")
    if global_batch > sum(caps):
        raise ValueError(f"global batch {global_batch} exceeds the sum of the clients' max batches "
                         f"({sum(caps)} = {' + '.join(str(c) for c in caps)}); lower the global batch "
                         "or add clients/memory")


def plan_batches(curves: Sequence[ComputeCurve], max_batches: Sequence[int], global_batch: int) -> list[int]:
    """Per-client batches that sum to `global_batch`, respect 1 <= b_k <= cap_k, and minimise the
    slowest client's step time. Raises ValueError when no such split exists."""
    caps = [int(c) for c in max_batches]
    _check(curves, caps, global_batch)

    def level(seconds: float) -> list[int]:
        return [max(1, c.max_batch_within(seconds, cap)) for c, cap in zip(curves, caps)]

    lo = 0.0
    hi = max(float(c.predict(cap)) for c, cap in zip(curves, caps))
    if sum(level(hi)) == global_batch:
        lo = hi
    for _ in range(100):  # level(lo) sums <= B < level(hi)'s sum; halve until the gap is tiny
        mid = 0.5 * (lo + hi)
        if sum(level(mid)) <= global_batch:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    batches = level(lo)
    heap = [(float(c.predict(b + 1)), k) for k, (c, b, cap) in enumerate(zip(curves, batches, caps))
            if b < cap]
    heapq.heapify(heap)
    for _ in range(global_batch - sum(batches)):
        _, k = heapq.heappop(heap)
        batches[k] += 1
        if batches[k] < caps[k]:
            heapq.heappush(heap, (float(curves[k].predict(batches[k] + 1)), k))
    return batches


def uniform_split(global_batch: int, n_clients: int, max_batches: Sequence[int] | None = None) -> list[int]:
    """Split B as evenly as possible over K clients (the baseline a planner is compared with).

    With caps, a capped client keeps its cap and the rest is shared evenly by the others; the
    first clients take the remainder of an uneven division.
    """
    caps = [int(c) for c in max_batches] if max_batches is not None else [global_batch] * n_clients
    if len(caps) != n_clients:
        raise ValueError(f"need {n_clients} max batches, got {len(caps)}")
    if global_batch < n_clients or global_batch > sum(caps):
        raise ValueError(f"cannot split global batch {global_batch} over {n_clients} clients with "
                         f"max batches {caps}: need {n_clients} <= B <= {sum(caps)}")
    batches = [0] * n_clients
    open_ = sorted(range(n_clients), key=lambda k: caps[k])  # water-fill, smallest cap first
    left = global_batch
    while open_ and caps[open_[0]] <= left // len(open_):
        k = open_.pop(0)
        batches[k] = caps[k]
        left -= caps[k]
    share, extra = divmod(left, len(open_)) if open_ else (0, 0)
    for i, k in enumerate(sorted(open_)):
        batches[k] = share + (1 if i < extra else 0)
    return batches


@dataclass(frozen=True)
class Plan:
    """A global batch, its per-client split and the predicted round."""

    global_batch: int
    batches: list[int]
    prediction: RoundPrediction


def plan_throughput(curves: Sequence[ComputeCurve], max_batches: Sequence[int],
                    predict: Callable[[list[int]], RoundPrediction],
                    candidates: Iterable[int] | None = None, min_fraction: float = 1.0) -> Plan:
    """Choose the global batch with the best predicted throughput, split by plan_batches.

    predict: batches -> RoundPrediction, e.g. functools.partial(predict_round, curves, comm_model=..).
    candidates: global batches to try (default: powers of two from K to sum of caps, plus the sum).
    min_fraction: return the *smallest* candidate reaching this fraction of the best throughput.
    Throughput grows with B until caps bind (then slow clients must take the rest and it can
    fall), so 1.0 often means "nearly every cap"; 0.9 finds where larger batches stop paying, which
    matters because larger batches cost generalization.
    """
    caps = [int(c) for c in max_batches]
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    k, total = len(caps), sum(caps)
    if candidates is None:
        candidates = [1 << i for i in range(total.bit_length()) if k <= (1 << i) < total] + [total]
    feasible = sorted({int(b) for b in candidates if k <= int(b) <= total})
    if not feasible:
        raise ValueError(f"no candidate global batch lies in [{k}, {total}] (clients .. sum of caps)")
    plans = []
    for b in feasible:
        split = plan_batches(curves, caps, b)
        plans.append(Plan(b, split, predict(split)))
    best = max(p.prediction.throughput for p in plans)
    return next(p for p in plans if p.prediction.throughput >= min_fraction * best)
