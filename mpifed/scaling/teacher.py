"""Teacher noise: give a large-batch gradient the per-coordinate variance of a small batch.

The aggregate g of B samples has variance Sigma_ii / B; a batch of b < B samples would have
Sigma_ii / b. Adding independent N(0, (1/b - 1/B) Sigma_ii_hat) tops the variance up to exactly
Sigma_ii / b in expectation, because the noise is independent of g and E[Sigma_hat] = Sigma
(see `noisescale`): Var(g + n) = Sigma/B + (1/b - 1/B) E[Sigma_hat] = Sigma / b. The mean is
untouched, so the step keeps the large batch's direction and gets the small batch's jitter, the
kind of noise that Keskar et al. (2017) and Smith & Le (2018) tie to flatter minima.

Per layer: Sigma_hat is replaced by its mean within each layer (tr_l / n_l). The per-layer trace is
a sum over many coordinates, so it is far less noisy than one coordinate's estimate, and it is all
the norms route provides; the price is that coordinates inside a layer get equal variance. Per coordinate (per_layer =
false): the full diagonal, from the per-coordinate squares of `noisescale`'s coordinate route.

Compression (documented approximation): with compressed uploads the server estimates Sigma from
decoded updates g_k + c_k. For an unbiased codec whose error c_k has per-coordinate variance v_k and
is independent of everything else, the algebra of `noisescale` (with v_k added to client k's
variance) gives

    E[Sigma_hat] = Sigma + sum_k b_k v_k (1 - b_k/B) / (K - 1)      (= Sigma + b v for equal b, v),

i.e. the codec's error is read as per-sample noise multiplied by the client batch. The teacher then
adds (1/b_small - 1/B) times that excess on top of the sum_k (b_k/B)^2 v_k of codec noise the
aggregate already carries, so the result is noisier than the small batch it imitates. The excess is
small when v_k << Sigma / b_k (gentle quantisation) and large for aggressive sparsifiers; biased
codecs with error feedback (top-k) break the independence assumption, and there the teacher is a
heuristic. Compare `sigma_trace` with and without compression in the logs to size the effect.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch

from mpifed.scaling.noisescale import NoiseEstimate

_PURPOSE = zlib.crc32(b"mpifed.scaling.teacher")


def teacher_coefficient(small_batch: int, global_batch: int) -> float:
    """1/b - 1/B: the per-sample variance the teacher adds, per unit of Sigma."""
    if small_batch < 1:
        raise ValueError(f"scaling.small_batch = {small_batch}: must be >= 1 (samples)")
    if small_batch >= global_batch:
        raise ValueError(f"scaling.small_batch = {small_batch} must be smaller than the global batch "
                         f"B = {global_batch}: the teacher can only add noise, not remove it; lower "
                         f"scaling.small_batch or raise the clients' batches")
    return 1.0 / small_batch - 1.0 / global_batch


def coordinate_variance(estimate: NoiseEstimate, layer_sizes: Sequence[int] | None, per_layer: bool,
                        numel: int, device: torch.device) -> torch.Tensor:
    """Per-coordinate Sigma for the teacher: the diagonal, or each layer's mean (float32, (d,))."""
    if not per_layer:
        if estimate.sigma_diag is None:
            raise ValueError("scaling.per_layer = false needs the per-coordinate diagonal: pass the clients' "
                             "gradients or their per-coordinate squares (ClientRound.coordinate_sq)")
        return estimate.sigma_diag.to(device=device, dtype=torch.float32)
    sizes = [numel] if layer_sizes is None else list(layer_sizes)
    if len(sizes) != estimate.layer_trace.numel():
        raise ValueError(f"the estimate has {estimate.layer_trace.numel()} layer traces but {len(sizes)} "
                         f"layer sizes were given; clients must send one squared norm per layer")
    means = (estimate.layer_trace / torch.tensor(sizes, dtype=torch.float64)).clamp_min(0)
    counts = torch.tensor(sizes, device=device)
    return torch.repeat_interleave(means.to(device=device, dtype=torch.float32), counts, output_size=numel)


def teacher_generator(seed: int, round_index: int, device: torch.device) -> torch.Generator:
    """A generator owned by (seed, round, 'teacher'): reruns and resumes draw the same noise."""
    words = np.random.SeedSequence([int(seed), int(round_index), _PURPOSE]).generate_state(2, np.uint32)
    gen = torch.Generator(device=device)
    gen.manual_seed((int(words[0]) << 31) ^ int(words[1]))
    return gen


def teacher_noise(variance: torch.Tensor, coefficient: float, generator: torch.Generator) -> torch.Tensor:
    """Draw N(0, coefficient * variance) per coordinate."""
    std = (variance.clamp_min(0) * coefficient).sqrt_()
    noise = torch.randn(variance.shape, generator=generator, device=variance.device, dtype=variance.dtype)
    return noise.mul_(std)
