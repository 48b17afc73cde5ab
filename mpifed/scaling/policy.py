"""The server's per-round scaling step: statistics -> detector -> teacher noise -> step scale.

The server calls `ServerScalingPolicy.apply` once per round, after aggregation and before its
optimizer step, with the flat aggregate and what it knows about the clients (`ClientRound`). It
gets back the gradient to hand to the optimizer and a fixed set of scalars (`STATS_KEYS`) for the
log's /server table. Order inside a round: noise statistics (always, for the log), detector on the
norm of the unmodified aggregate, teacher noise (if enabled and allowed in this phase), then the
step scale, so step+teacher gives s * (g + n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from mpifed.fields import field_problems
from mpifed.scaling.config import METHODS, STATS_KEYS, ScalingConfig, check_scaling  # noqa: F401 - re-exported
from mpifed.scaling.detector import CriticalPhaseDetector
from mpifed.scaling.noisescale import (NoiseEstimate, NoiseScaleTracker, estimate_from_coordinate_squares,
                                       estimate_from_gradients, estimate_from_norms,
                                       estimate_from_weighted_norms, layer_squares)
from mpifed.scaling.step import sqrt_rule, step_scale
from mpifed.scaling.teacher import (coordinate_variance, teacher_coefficient, teacher_generator,
                                    teacher_noise)

@dataclass(frozen=True)
class ClientRound:
    """What the server knows about this round's clients. Give one of the statistics below, or none
    for a round whose statistics are unusable (a diverged client): no estimate, no teacher noise.

    batches: b_k, samples per client (the weights of the aggregate).
    weighted_sq: sum_k b_k |g_k|^2, (L,) per layer or (1,): what the server gets when clients append
        (b_k / B) |g_k|^2 to the update they reduce (multiply the reduced values by B). Training's
        route, with every codec: the squares ride in the dense tail of the update reduce.
    coordinate_sq: sum_k (b_k / B) g_k^2 per coordinate, shaped like the aggregate: the full
        diagonal without the gradients (the per-coordinate teacher). Used before the others; training
        gets it from the server's decode (gather codecs) or the clients' reduce (summable ones).
    grads: decoded flat update of every client, each shaped like the aggregate; and
    sq_norms: |g_k|^2 of each client's decoded update, (K,) or (K, L) per layer: the routes for tests
        and offline use, where single updates are at hand. When both are given, grads is used.
    """

    batches: Sequence[int]
    grads: Sequence[torch.Tensor] | None = None
    sq_norms: torch.Tensor | Sequence[float] | None = None
    weighted_sq: torch.Tensor | None = None
    coordinate_sq: torch.Tensor | None = None


class ServerScalingPolicy:
    """Rank 0's scaling state: the detector, the noise-scale averages, the config.

    Args:
        cfg: the job's [scaling] table.
        layer_sizes: numel of each parameter, in flat-buffer order (per-layer statistics).
        seed: the job seed (run.seed); teacher noise comes from a generator seeded by
            (seed, round, 'teacher') and nothing else.
    """

    def __init__(self, cfg: ScalingConfig, layer_sizes: Sequence[int], seed: int):
        errors = field_problems(cfg, "scaling") + check_scaling(cfg)
        if not errors and (cfg.window == 0 or cfg.warmup < 0):
            errors = [f"scaling.window = {cfg.window} and scaling.warmup = {cfg.warmup} follow train.rounds: give "
                      f"cfg.for_rounds(rounds) (a loaded job's [scaling] already is)"]
        if errors:
            raise ValueError("; ".join(errors))
        if not layer_sizes or min(layer_sizes) < 1:
            raise ValueError(f"layer_sizes {list(layer_sizes)}: need the numel (>= 1) of every parameter")
        self.cfg, self.layer_sizes, self.seed = cfg, [int(n) for n in layer_sizes], int(seed)
        self.detector = CriticalPhaseDetector(cfg.window, cfg.threshold, cfg.warmup)
        self.tracker = NoiseScaleTracker(cfg.noise_ema)
        self._squares: torch.Tensor | None = None  # layer_squares' float64 scratch, made in the first round

    def estimate(self, grad: torch.Tensor, clients: ClientRound,
                 layer_sq: torch.Tensor | None = None) -> NoiseEstimate | None:
        """This round's covariance estimate, or None when it cannot be made (one client, no data)."""
        if len(clients.batches) < 2 or (clients.grads is None and clients.sq_norms is None
                                        and clients.weighted_sq is None and clients.coordinate_sq is None):
            return None
        if clients.coordinate_sq is not None:
            return estimate_from_coordinate_squares(clients.coordinate_sq, clients.batches, grad, self.layer_sizes,
                                                    layer_sq)
        if clients.grads is not None:
            return estimate_from_gradients(clients.grads, clients.batches, grad, self.layer_sizes)
        if clients.weighted_sq is not None:
            return estimate_from_weighted_norms(clients.weighted_sq, clients.batches, grad, self.layer_sizes,
                                                layer_sq)
        sq_norms = torch.as_tensor(clients.sq_norms)
        return estimate_from_norms(sq_norms, clients.batches, grad, self.layer_sizes)

    def apply(self, round_index: int, grad: torch.Tensor,
              clients: ClientRound) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (gradient for the optimizer, {key: float for key in STATS_KEYS}); `grad` is left as is."""
        if grad.dim() != 1 or grad.numel() != sum(self.layer_sizes):
            raise ValueError(f"expected the flat aggregate of {sum(self.layer_sizes)} entries, got shape "
                             f"{tuple(grad.shape)}")
        if self._squares is None or self._squares.device != grad.device:
            self._squares = torch.empty(grad.numel(), dtype=torch.float64, device=grad.device)
        layer_sq = layer_squares(grad, self.layer_sizes, self._squares)  # the norm and the estimate share it
        norm = math.sqrt(float(layer_sq.sum()))  # CPU-GPU sync point: the detector needs it
        critical = self.detector.update(norm)
        estimate = self.estimate(grad, clients, layer_sq)
        big = sum(int(b) for b in clients.batches)
        # The job's check keeps small_batch below the global batch; a round whose other payloads were
        # rejected can still hold no more than the small batch (or one client): it is left unscaled.
        large = big > self.cfg.small_batch
        noise_scale = self.tracker.update(estimate) if estimate is not None else self.tracker.noise_scale
        out, teacher_std = grad, 0.0
        teach = self.cfg.uses_teacher and large and not (self.cfg.only_outside_critical and critical)
        if teach and estimate is not None:  # None: one accepted client or no statistics this round
            coef = teacher_coefficient(self.cfg.small_batch, big)
            variance = coordinate_variance(estimate, self.layer_sizes, self.cfg.per_layer, grad.numel(),
                                           grad.device)
            gen = teacher_generator(self.seed, round_index, grad.device)
            out = grad + teacher_noise(variance, coef, gen).to(grad.dtype)
            teacher_std = math.sqrt(coef * max(float(variance.double().mean()), 0.0))
        scale = 1.0
        if self.cfg.uses_step:
            factor = self.cfg.scale or (sqrt_rule(big, self.cfg.small_batch) if large else 1.0)
            scale = step_scale(critical, factor)
            if scale != 1.0:
                out = out * scale
        stats = {"grad_norm": norm, "rel_change": self.detector.rel_change, "critical": float(critical),
                 "scale": scale, "noise_scale": noise_scale,
                 "sigma_trace": estimate.trace if estimate is not None else math.nan,
                 "signal_sq": estimate.signal_sq if estimate is not None else math.nan,
                 "teacher_std": teacher_std}
        return out, stats

    def state_dict(self) -> dict[str, float | int | bool]:
        """Plain numbers only, prefixed by owner, for the checkpoint's attributes."""
        state = {f"detector.{k}": v for k, v in self.detector.state_dict().items()}
        state.update({f"noise.{k}": v for k, v in self.tracker.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        def part(prefix: str) -> dict:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        self.detector.load_state_dict(part("detector."))
        self.tracker.load_state_dict(part("noise."))
