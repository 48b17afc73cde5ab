"""Per-sample gradient covariance and the gradient noise scale, from what the server already has.

Model (McCandlish et al. 2018, "An empirical model of large-batch training", sec. 2 and app. A):
per-sample gradients are i.i.d. with mean G and covariance Sigma (only its diagonal is used here).
Client k averages b_k of them, so g_k has mean G and per-coordinate variance Sigma_ii / b_k; the
server's aggregate g = sum_k (b_k/B) g_k, B = sum_k b_k, has variance Sigma_ii / B.

Unbiased diagonal, unequal batches (route "gradients": the server holds every decoded g_k).
g_k - g = (1 - b_k/B) e_k - sum_{j != k} (b_j/B) e_j with e_k = g_k - G, so per coordinate

    Var(g_k - g) = Var g_k - 2 Cov(g_k, g) + Var g = S/b_k - 2 S/B + S/B = S (1/b_k - 1/B)

because Cov(g_k, g) = (b_k/B) Var g_k = S/B. Weighting by b_k cancels the batch:
E[b_k (g_k - g)^2] = S (1 - b_k/B), and summing over the K clients gives S (K - 1). Hence

    Sigma_ii_hat = sum_k b_k (g_k - g)_i^2 / (K - 1)

is unbiased for any batches b_k (K >= 2), with no distributional assumption beyond finite variance.

Same estimate from scalars (route "norms": summable codecs, the server only has the sum). Because
sum_k b_k g_k = B g,  sum_k b_k |g_k - g|^2 = sum_k b_k |g_k|^2 - B |g|^2, so the trace follows from
the aggregate and one scalar |g_k|^2 per client (per layer, if clients send one per layer):

    tr(Sigma)_hat = (sum_k b_k |g_k|^2 - B |g|^2) / (K - 1)

This is McCandlish et al.'s small-batch/big-batch comparison (app. A) with the K clients as the
small batches; it equals the trace of the gradient route exactly, and it is unbiased on its own.
The signal follows from E|g|^2 = |G|^2 + tr(Sigma)/B:  |G|^2_hat = |g|^2 - tr(Sigma)_hat / B
(unbiased, and may come out negative when the signal is buried in noise).

The same identity holds per coordinate (route "coordinates"): with the (d,) sum sum_k b_k g_k^2 the
server gets the full diagonal, Sigma_ii_hat = (sum_k b_k g_k,i^2 - B g_i^2) / (K - 1), without ever
holding the K gradients. The per-coordinate teacher uses it.

B_simple = tr(Sigma) / |G|^2 is a ratio, and a ratio of unbiased estimates is not unbiased, so (as
McCandlish et al. do) numerator and denominator are smoothed separately and divided afterwards.

Where the model bends (say so when interpreting the logs):
- non-i.i.d. clients: if client k's mean is G_k, the estimate gains sum_k b_k |G_k - G|^2 / (K - 1),
  the between-client spread. With fixed clients that is client drift, not sampling noise.
- E > 1 local steps: the g_k are model deltas; Sigma is then the covariance of those updates.
- compression: the server only sees decoded updates, see `mpifed.scaling.teacher`.
- precision: the norms route subtracts two large numbers, and the clients' squared norms travel in
  the float32 tail of the update reduce: expect cancellation error of about eps(float32) * B |g|^2
  / (K - 1) in the trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class NoiseEstimate:
    """One round's estimates. Traces are sums over coordinates of per-sample variances.

    sigma_diag: (d,) per-coordinate variance estimate (gradient and coordinate routes, else None).
    layer_trace: (L,) float64 trace of Sigma per layer (one entry when no layer split is known).
    trace: tr(Sigma) estimate (per-sample, units of gradient^2).
    signal_sq: |G|^2 estimate (units of gradient^2); may be negative.
    global_batch: B, samples behind the aggregate.
    """

    sigma_diag: torch.Tensor | None
    layer_trace: torch.Tensor
    trace: float
    signal_sq: float
    global_batch: int


def check_batches(batches: Sequence[int]) -> list[int]:
    """The clients' batch sizes as ints; at least two clients, each with >= 1 sample."""
    out = [int(b) for b in batches]
    if len(out) < 2:
        raise ValueError(f"noise estimation needs the batches of >= 2 clients, got {len(out)}: one client "
                         f"gives no spread to measure; run with more clients or set scaling.method = none")
    if any(b < 1 or b != float(bb) for b, bb in zip(out, batches)):
        raise ValueError(f"client batches {list(batches)}: each must be an integer >= 1 (samples)")
    return out


def _layer_sums(values: torch.Tensor, layer_sizes: Sequence[int] | None) -> torch.Tensor:
    """Sum a (d,) tensor within each layer -> (L,) float64; one layer when sizes are None."""
    values = values.double()
    if layer_sizes is None:
        return values.sum().reshape(1)
    if sum(layer_sizes) != values.numel():
        raise ValueError(f"layer sizes add up to {sum(layer_sizes)} but the gradient has {values.numel()} "
                         f"entries; pass the numel of each parameter in flat-buffer order")
    return torch.stack([part.sum() for part in torch.split(values, list(layer_sizes))])


def layer_squares(aggregate: torch.Tensor, layer_sizes: Sequence[int] | None,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
    """|g|^2 within each layer, float64 (the noise estimate subtracts large numbers: float32 sums
    lose it). Computed once per round; the norm and the estimate both use it. `scratch`, a float64
    tensor shaped like `aggregate`, takes the squares in place of two new model-sized float64 tensors
    (resnet18: 2 x 88 MB of fresh pages, ~100 ms a round on the server's CPU)."""
    squares = aggregate.double().square() if scratch is None else scratch.copy_(aggregate).square_()
    return _layer_sums(squares, layer_sizes)


def estimate_from_gradients(client_grads: Sequence[torch.Tensor], batches: Sequence[int],
                            aggregate: torch.Tensor,
                            layer_sizes: Sequence[int] | None = None) -> NoiseEstimate:
    """Gradient route: unbiased diag(Sigma) from every client's (decoded) flat gradient.

    `aggregate` must be sum_k (b_k/B) client_grads[k]; clients are streamed, so a list of (d,)
    tensors costs one extra (d,) buffer, not K.
    """
    sizes = check_batches(batches)
    if len(client_grads) != len(sizes):
        raise ValueError(f"got {len(client_grads)} client gradients but {len(sizes)} batch sizes")
    acc = torch.zeros_like(aggregate, dtype=torch.float32)
    for grad, b in zip(client_grads, sizes):
        if grad.shape != aggregate.shape:
            raise ValueError(f"client gradient shape {tuple(grad.shape)} differs from the aggregate's "
                             f"{tuple(aggregate.shape)}")
        acc.add_((grad.float() - aggregate.float()).square_(), alpha=float(b))
    diag = acc.div_(len(sizes) - 1)
    layer_trace = _layer_sums(diag, layer_sizes)
    return _finish(diag, layer_trace, _layer_sums(aggregate.double().square(), None), sum(sizes))


def estimate_from_norms(client_sq_norms: torch.Tensor, batches: Sequence[int], aggregate: torch.Tensor,
                        layer_sizes: Sequence[int] | None = None) -> NoiseEstimate:
    """Norms route: unbiased per-layer trace from the aggregate and each client's |g_k|^2.

    client_sq_norms: (K,) squared norms of the whole flat gradient, or (K, L) one per layer in
    `layer_sizes` order. Each must be the squared norm of what the server sums for that client
    (after the codec's round trip), or the identity with the gradient route breaks.
    """
    sizes = check_batches(batches)
    sq = torch.as_tensor(client_sq_norms, dtype=torch.float64).cpu()
    if sq.dim() == 1:
        sq, layer_sizes = sq.unsqueeze(1), None
    if sq.dim() != 2 or sq.shape[0] != len(sizes):
        raise ValueError(f"client squared norms have shape {tuple(sq.shape)}; expected ({len(sizes)},) or "
                         f"({len(sizes)}, layers), one row per client")
    if sq.shape[1] > 1 and (layer_sizes is None or len(layer_sizes) != sq.shape[1]):
        raise ValueError(f"{sq.shape[1]} squared norms per client need as many layer sizes, got "
                         f"{None if layer_sizes is None else len(layer_sizes)}")
    if not torch.isfinite(sq).all() or (sq < 0).any():
        raise ValueError("client squared norms must be finite and >= 0; a client diverged")
    weights = torch.tensor(sizes, dtype=torch.float64)
    return estimate_from_weighted_norms(weights @ sq, sizes, aggregate, layer_sizes)


def estimate_from_weighted_norms(weighted_sq: torch.Tensor, batches: Sequence[int], aggregate: torch.Tensor,
                                 layer_sizes: Sequence[int] | None = None,
                                 aggregate_sq: torch.Tensor | None = None) -> NoiseEstimate:
    """Norms route when the reduction already summed them: weighted_sq = sum_k b_k |g_k|^2, (L,) or (1,).

    Clients append (b_k / B) |g_k|^2 per layer to the update they reduce anyway, so the server gets
    this sum (divided by B) with no extra communication and no per-client rows."""
    sizes = check_batches(batches)
    weighted_sq = torch.as_tensor(weighted_sq, dtype=torch.float64).cpu().reshape(-1)
    if weighted_sq.numel() == 1:
        layer_sizes = None
    elif layer_sizes is None or len(layer_sizes) != weighted_sq.numel():
        raise ValueError(f"{weighted_sq.numel()} weighted squared norms need as many layer sizes")
    if not torch.isfinite(weighted_sq).all() or (weighted_sq < 0).any():
        raise ValueError("client squared norms must be finite and >= 0; a client diverged")
    big = sum(sizes)
    if aggregate_sq is None or aggregate_sq.numel() != weighted_sq.numel():
        aggregate_sq = layer_squares(aggregate, layer_sizes)
    agg_sq = aggregate_sq.cpu()
    layer_trace = (weighted_sq - big * agg_sq) / (len(sizes) - 1)
    return _finish(None, layer_trace, agg_sq, big)


def estimate_from_coordinate_squares(weighted_sq: torch.Tensor, batches: Sequence[int], aggregate: torch.Tensor,
                                     layer_sizes: Sequence[int] | None = None,
                                     aggregate_sq: torch.Tensor | None = None) -> NoiseEstimate:
    """Diagonal route without the clients' gradients: weighted_sq = sum_k (b_k / B) g_k^2, per coordinate.

    The identity of the norms route holds coordinate by coordinate, sum_k b_k (g_k - g)_i^2 =
    B (weighted_sq_i - g_i^2), so the server needs one (d,) sum, not K gradients: clients add it to
    their reduce (summable codecs), or the server accumulates it while decoding (gather codecs).
    The result equals `estimate_from_gradients` up to float32 rounding of the subtraction.
    aggregate_sq: |g|^2 (whole or per layer, float64) when the caller already has it (`layer_squares`)."""
    sizes = check_batches(batches)
    weighted_sq = torch.as_tensor(weighted_sq)
    if weighted_sq.shape != aggregate.shape:
        raise ValueError(f"per-coordinate squares have shape {tuple(weighted_sq.shape)}, the aggregate "
                         f"{tuple(aggregate.shape)}: clients must send one square per parameter")
    big = sum(sizes)
    diag = (weighted_sq.float() - aggregate.float().square()).mul_(big / (len(sizes) - 1))
    if aggregate_sq is None:
        aggregate_sq = layer_squares(aggregate, None)
    return _finish(diag, _layer_sums(diag, layer_sizes), aggregate_sq.cpu(), big)


def _finish(diag: torch.Tensor | None, layer_trace: torch.Tensor, aggregate_sq: torch.Tensor,
            big: int) -> NoiseEstimate:
    """Add the totals; aggregate_sq holds |g|^2, whole or per layer."""
    trace = float(layer_trace.sum())  # CPU-GPU sync point: one scalar per round
    signal_sq = float(aggregate_sq.sum()) - trace / big
    return NoiseEstimate(diag, layer_trace.cpu(), trace, signal_sq, big)


class NoiseScaleTracker:
    """Smoothed B_simple = EMA(tr Sigma) / EMA(|G|^2), the McCandlish et al. app. A recipe.

    Args:
        decay: EMA decay per round in [0, 1); 0 = no smoothing. The paper smooths but gives no
            decay; 0.95 (about 20 rounds of memory) is this project's choice, because with a
            handful of clients a single round's trace estimate has a relative error near
            sqrt(2/(K-1)).
    The first estimate initialises both averages, so early values carry no zero-start bias.
    """

    def __init__(self, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"noise_ema = {decay!r}: must be in [0, 1) (EMA decay per round)")
        self.decay = float(decay)
        self.trace = math.nan
        self.signal_sq = math.nan

    def update(self, estimate: NoiseEstimate) -> float:
        """Fold in one round; return the smoothed noise scale (samples; inf if no signal is left)."""
        if math.isnan(self.trace):
            self.trace, self.signal_sq = estimate.trace, estimate.signal_sq
        else:
            a = self.decay
            self.trace = a * self.trace + (1 - a) * estimate.trace
            self.signal_sq = a * self.signal_sq + (1 - a) * estimate.signal_sq
        return self.noise_scale

    @property
    def noise_scale(self) -> float:
        if math.isnan(self.trace):
            return math.nan
        return self.trace / self.signal_sq if self.signal_sq > 0 else math.inf

    def state_dict(self) -> dict[str, float]:
        return {"trace": self.trace, "signal_sq": self.signal_sq}

    def load_state_dict(self, state: dict) -> None:
        self.trace, self.signal_sq = float(state["trace"]), float(state["signal_sq"])
