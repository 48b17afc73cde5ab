"""What `mpifed plan` prints, as plain numbers: the plan and the baselines it is compared with.

Speedups are ratios of predicted throughput (samples/s) at the same comm model:
  vs uniform:     the same global batch split evenly (respecting caps);
  vs one client:  the fastest single client training alone (a 2-rank job) at min(B, its cap);
  vs small batch: every client at the small per-client batch (min(small_batch, cap)).
"""

from __future__ import annotations

from dataclasses import dataclass

from mpifed.perf.planner import Plan, plan_batches, plan_throughput, uniform_split
from mpifed.perf.profile_file import Profile
from mpifed.perf.round import RoundPrediction, predict_round

SMALL_BATCH = 32
"""Per-client batch of the small-batch baseline, samples. 32 is the common per-device minibatch of
the CIFAR/ResNet recipes mpifed's jobs start from; pass the one your own baseline uses."""


def predict_for(profile: Profile, batches: list[int], clients: list[int] | None = None) -> RoundPrediction:
    """Predict a round of `profile` with the given batches (for a subset of clients if given)."""
    idx = list(range(len(profile.clients))) if clients is None else clients
    return predict_round([profile.clients[k].curve for k in idx], batches, profile.comm,
                         profile.model_bytes, profile.payload_bytes, len(idx) + 1,
                         profile.server_seconds, up=profile.up, metrics_bytes=profile.metrics_bytes)


@dataclass(frozen=True)
class PlanReport:
    plan: Plan
    caps: list[int]
    uniform: RoundPrediction
    uniform_batches: list[int]
    one_client: RoundPrediction
    one_client_id: int
    small_batch: RoundPrediction

    @property
    def speedup_vs_uniform(self) -> float:
        return self.plan.prediction.throughput / self.uniform.throughput

    @property
    def speedup_vs_one_client(self) -> float:
        return self.plan.prediction.throughput / self.one_client.throughput

    @property
    def speedup_vs_small_batch(self) -> float:
        return self.plan.prediction.throughput / self.small_batch.throughput


def plan_report(profile: Profile, global_batch: int | None = None, min_fraction: float | None = None,
                small_batch: int = SMALL_BATCH) -> PlanReport:
    """Plan `global_batch`, or (global_batch=None) the throughput-maximising global batch, the
    smallest within `min_fraction` of the best when given; then predict the three baselines."""
    curves, caps = profile.curves, profile.max_batches
    if small_batch < 1:
        raise ValueError(f"small batch must be >= 1, got {small_batch}")
    if global_batch is None:
        plan = plan_throughput(curves, caps, lambda b: predict_for(profile, b),
                               min_fraction=1.0 if min_fraction is None else min_fraction)
    else:
        split = plan_batches(curves, caps, global_batch)
        plan = Plan(global_batch, split, predict_for(profile, split))
    uniform = uniform_split(plan.global_batch, len(caps), caps)
    singles = [predict_for(profile, [min(plan.global_batch, caps[k])], [k]) for k in range(len(caps))]
    best_single = max(range(len(caps)), key=lambda k: singles[k].throughput)
    small = predict_for(profile, [min(small_batch, cap) for cap in caps])
    return PlanReport(plan, caps, predict_for(profile, uniform), uniform, singles[best_single],
                      best_single, small)
