"""Scaling math without MPI: detector, step scaling, teacher noise, noise-scale estimators.

Statistical tests draw many synthetic rounds from a fixed seed with a known per-sample mean G and
diagonal covariance Sigma. Per-sample gradients are G + sqrt(Sigma) * (Exp(1) - 1), skewed on
purpose: the estimators claim unbiasedness without a Gaussian assumption. Tolerances are multiples
of the standard error measured from the same draws.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mpifed.scaling import (BatchController, ClientRound, CriticalPhaseDetector, NoiseEstimate,
                            NoiseScaleTracker, ScalingConfig, ServerScalingPolicy, STATS_KEYS,
                            estimate_from_gradients, estimate_from_norms, split_batch)
from mpifed.scaling.noisescale import estimate_from_coordinate_squares
from mpifed.scaling.teacher import coordinate_variance, teacher_coefficient, teacher_generator, teacher_noise

G = torch.tensor([0.3, -1.0, 0.0, 2.0, 0.5, -0.2], dtype=torch.float64)
SIGMA = torch.tensor([1.0, 4.0, 0.25, 2.0, 9.0, 0.5], dtype=torch.float64)
LAYERS = [2, 4]
BATCHES = [2, 3, 5, 10]  # unequal on purpose; B = 20


def synthetic_rounds(trials: int, batches: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(trials, K, d) client mean gradients and (trials, d) aggregates sum_k (b_k/B) g_k."""
    gen = torch.Generator().manual_seed(seed)
    big = sum(batches)
    z = torch.empty(trials, big, G.numel(), dtype=torch.float64).exponential_(generator=gen) - 1.0
    samples = G + SIGMA.sqrt() * z
    clients = torch.stack([part.mean(1) for part in torch.split(samples, batches, dim=1)], dim=1)
    weights = torch.tensor(batches, dtype=torch.float64) / big
    return clients, torch.einsum("k,tkd->td", weights, clients)


def assert_mean(values: torch.Tensor, truth: torch.Tensor | float, z_max: float = 4.5) -> None:
    """Mean over dim 0 equals `truth` within z_max standard errors, coordinate by coordinate."""
    values = values.double()
    se = values.std(0) / math.sqrt(values.shape[0])
    z = (values.mean(0) - torch.as_tensor(truth, dtype=torch.float64)) / se
    assert z.abs().max() < z_max, f"mean {values.mean(0)} vs truth {truth}: z = {z}"


def z_score(values: torch.Tensor, truth: torch.Tensor | float) -> torch.Tensor:
    values = values.double()
    se = values.std(0) / math.sqrt(values.shape[0])
    return (values.mean(0) - torch.as_tensor(truth, dtype=torch.float64)) / se


# ---------------------------------------------------------------------------- noise-scale estimators

def test_gradient_route_is_unbiased_for_unequal_batches():
    clients, agg = synthetic_rounds(4000, BATCHES, seed=1)
    ests = [estimate_from_gradients(list(c), BATCHES, a, LAYERS) for c, a in zip(clients, agg)]
    diag = torch.stack([e.sigma_diag for e in ests])
    assert_mean(diag, SIGMA)
    assert_mean(torch.tensor([e.trace for e in ests]), SIGMA.sum())
    assert_mean(torch.stack([e.layer_trace for e in ests]), torch.stack([SIGMA[:2].sum(), SIGMA[2:].sum()]))
    assert_mean(torch.tensor([e.signal_sq for e in ests]), G.square().sum())
    # The test has power: dividing by K instead of K - 1 is a 25% bias and must be caught.
    assert z_score(diag * 3 / 4, SIGMA).abs().max() > 6


def test_norm_route_equals_gradient_route_and_is_unbiased():
    clients, agg = synthetic_rounds(2000, BATCHES, seed=2)
    traces, signals = [], []
    for c, a in zip(clients, agg):
        full = estimate_from_gradients(list(c.float()), BATCHES, a.float(), LAYERS)
        whole = estimate_from_norms(c.square().sum(1), BATCHES, a.float())
        per_layer = torch.stack([c[:, :2].square().sum(1), c[:, 2:].square().sum(1)], dim=1)
        layered = estimate_from_norms(per_layer, BATCHES, a.float(), LAYERS)
        assert whole.trace == pytest.approx(full.trace, rel=1e-4, abs=1e-4)
        assert torch.allclose(layered.layer_trace, full.layer_trace, rtol=1e-4, atol=1e-4)
        assert whole.sigma_diag is None and whole.layer_trace.numel() == 1
        traces.append(whole.trace)
        signals.append(whole.signal_sq)
    assert_mean(torch.tensor(traces), SIGMA.sum())
    assert_mean(torch.tensor(signals), G.square().sum())


def coordinate_squares(clients: torch.Tensor, batches: list[int]) -> torch.Tensor:
    """sum_k (b_k / B) g_k^2 per coordinate: what the reduce (or the server's decoding) delivers."""
    weights = torch.tensor(batches, dtype=clients.dtype) / sum(batches)
    return torch.einsum("k,kd->d", weights, clients.square())


def test_coordinate_route_equals_gradient_route():
    clients, agg = synthetic_rounds(200, BATCHES, seed=12)
    for c, a in zip(clients.float(), agg.float()):
        full = estimate_from_gradients(list(c), BATCHES, a, LAYERS)
        coords = estimate_from_coordinate_squares(coordinate_squares(c, BATCHES), BATCHES, a, LAYERS)
        assert torch.allclose(coords.sigma_diag, full.sigma_diag, rtol=1e-4, atol=1e-4)
        assert torch.allclose(coords.layer_trace, full.layer_trace, rtol=1e-4, atol=1e-4)
        assert coords.signal_sq == pytest.approx(full.signal_sq, rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="one square per parameter"):
        estimate_from_coordinate_squares(torch.zeros(5), BATCHES, agg[0])


def test_server_squares_from_gathered_payloads_feed_the_coordinate_route():
    """Gather codecs: `aggregate` squares what it decodes; with a client rejected, the statistic and
    the total both cover the accepted clients, and the estimate uses their batches."""
    import numpy as np

    from mpifed.compress import RoundContext, make_codec
    from mpifed.compress.aggregate import aggregate

    codec = make_codec("qsgd", levels=127)
    clients, agg = synthetic_rounds(1, BATCHES, seed=13)
    weights = np.array(BATCHES, np.float32) / sum(BATCHES)
    weighted = [np.ascontiguousarray((g * w).float().numpy()) for g, w in zip(clients[0], weights)]
    payloads = [codec.encode(x, RoundContext(5, 0, k)) for k, x in enumerate(weighted)]
    decoded = torch.stack([torch.from_numpy(codec.decode(p, 6, RoundContext(5, 0, k)) / w)
                           for k, (p, w) in enumerate(zip(payloads, weights))])
    squares = np.empty(6, np.float32)
    result = aggregate(codec, payloads, range(4), 6, 5, 0, weights=weights, squares=squares)
    assert np.allclose(squares, coordinate_squares(decoded, BATCHES).numpy(), rtol=1e-5)
    got = estimate_from_coordinate_squares(torch.from_numpy(squares), BATCHES, torch.from_numpy(result.total))
    want = estimate_from_gradients(list(decoded), BATCHES, torch.from_numpy(result.total))
    assert torch.allclose(got.sigma_diag, want.sigma_diag, rtol=1e-4, atol=1e-5)

    payloads[1] = payloads[1][:-1]  # truncated: rejected
    result = aggregate(codec, payloads, range(4), 6, 5, 0, weights=weights, squares=squares)
    kept = [0, 2, 3]
    batches = [BATCHES[k] for k in kept]
    assert result.accepted == kept
    assert np.allclose(squares, coordinate_squares(decoded[kept], batches).numpy(), rtol=1e-5)
    want = estimate_from_gradients(list(decoded[kept]), batches, torch.from_numpy(result.total))
    got = estimate_from_coordinate_squares(torch.from_numpy(squares), batches, torch.from_numpy(result.total))
    assert torch.allclose(got.sigma_diag, want.sigma_diag, rtol=1e-4, atol=1e-5)


def test_compression_noise_enters_sigma_as_documented():
    """teacher.py: independent codec noise of variance v adds sum_k b_k v (1 - b_k/B) / (K-1)."""
    clients, agg = synthetic_rounds(4000, BATCHES, seed=3)
    v = 0.3
    gen = torch.Generator().manual_seed(30)
    decoded = clients + math.sqrt(v) * torch.randn(clients.shape, generator=gen, dtype=torch.float64)
    weights = torch.tensor(BATCHES, dtype=torch.float64) / sum(BATCHES)
    decoded_agg = torch.einsum("k,tkd->td", weights, decoded)
    diag = torch.stack([estimate_from_gradients(list(c), BATCHES, a).sigma_diag
                        for c, a in zip(decoded, decoded_agg)])
    big = sum(BATCHES)
    excess = sum(b * v * (1 - b / big) for b in BATCHES) / (len(BATCHES) - 1)
    assert_mean(diag, SIGMA + excess)
    assert z_score(diag, SIGMA).abs().max() > 6


def test_noise_scale_tracker_smooths_numerator_and_denominator_separately():
    def est(trace, signal):
        return NoiseEstimate(None, torch.tensor([trace], dtype=torch.float64), trace, signal, 10)

    tracker = NoiseScaleTracker(0.5)
    assert math.isnan(tracker.noise_scale)
    assert tracker.update(est(8.0, 2.0)) == pytest.approx(4.0)
    # EMA: trace 0.5*8 + 0.5*4 = 6, signal 0.5*2 + 0.5*0 = 1 -> 6 (not the mean of the ratios, inf).
    assert tracker.update(est(4.0, 0.0)) == pytest.approx(6.0)
    assert tracker.update(est(6.0, -3.0)) == math.inf
    with pytest.raises(ValueError, match="noise_ema"):
        NoiseScaleTracker(1.0)


def test_estimators_reject_bad_inputs():
    agg = torch.zeros(6)
    with pytest.raises(ValueError, match=">= 2 clients"):
        estimate_from_gradients([agg], [4], agg)
    with pytest.raises(ValueError, match="integer >= 1"):
        estimate_from_norms(torch.ones(2), [4, 0], agg)
    with pytest.raises(ValueError, match="layer sizes"):
        estimate_from_norms(torch.ones(2, 2), [4, 4], agg)
    with pytest.raises(ValueError, match="add up to"):
        estimate_from_gradients([agg, agg], [4, 4], agg, [2, 2])


# ---------------------------------------------------------------------------- detector and step scaling

def norm_sequence() -> tuple[list[float], set[int]]:
    """Window 3, threshold 0.5: window means 1,1,1,2,2,2,1.2,0.5,0.5 -> the critical iterations."""
    windows = [[0.5, 1.5, 1.0], [1.0] * 3, [1.0] * 3, [2.0] * 3, [2.0] * 3, [2.0] * 3, [1.2] * 3, [0.5] * 3,
               [0.5] * 3]
    # 1-5: fewer than two windows closed. 12-14: mean doubled (change 1.0). 21: change 0.4, not critical.
    # 24-26: change 0.58. A decision holds from the iteration that closes a window to the next close.
    critical = {1, 2, 3, 4, 5, 12, 13, 14, 24, 25, 26}
    return [x for w in windows for x in w], critical


def test_detector_flags_known_jumps():
    norms, expected = norm_sequence()
    det = CriticalPhaseDetector(window=3, threshold=0.5, warmup=0)
    flagged = {i for i, n in enumerate(norms, start=1) if det.update(n)}
    assert flagged == expected
    assert det.rel_change == pytest.approx(0.0)


def test_detector_warmup_and_first_windows_are_critical():
    det = CriticalPhaseDetector(window=2, threshold=0.5, warmup=7)
    assert [det.update(1.0) for _ in range(10)] == [True] * 7 + [False] * 3
    det = CriticalPhaseDetector(window=2, threshold=0.5, warmup=0)
    assert [det.update(1.0) for _ in range(6)] == [True] * 3 + [False] * 3
    assert math.isnan(CriticalPhaseDetector(2, 0.5, 0).rel_change)


def test_detector_edge_cases():
    det = CriticalPhaseDetector(window=1, threshold=0.5, warmup=0)
    assert [det.update(x) for x in (0.0, 0.0, 1.0, 1.0)] == [True, False, True, False]
    assert det.rel_change == 0.0
    with pytest.raises(ValueError, match="diverged"):
        det.update(float("nan"))
    for name, bad in [("window", 0), ("threshold", 0.0), ("warmup", -1)]:
        args = {"window": 3, "threshold": 0.5, "warmup": 0, name: bad}
        with pytest.raises(ValueError, match=name):
            CriticalPhaseDetector(**args)


def test_step_scaling_applied_exactly_where_detector_flags():
    norms, expected = norm_sequence()
    cfg = ScalingConfig(method="step", scale=3.0, window=3, threshold=0.5, warmup=0)
    policy = ServerScalingPolicy(cfg, layer_sizes=LAYERS, seed=0)
    unit = torch.ones(6) / math.sqrt(6)
    for i, n in enumerate(norms, start=1):
        grad = unit * n
        out, stats = policy.apply(i, grad, ClientRound(batches=[4, 4]))
        assert set(stats) == set(STATS_KEYS) and all(isinstance(v, float) for v in stats.values())
        assert stats["critical"] == float(i in expected)
        assert stats["grad_norm"] == pytest.approx(n)
        if i in expected:
            assert stats["scale"] == 1.0 and torch.equal(out, grad)
        else:
            assert stats["scale"] == 3.0 and torch.allclose(out, 3.0 * grad)
        assert torch.allclose(grad, unit * n)  # the caller's tensor is left alone
        assert math.isnan(stats["noise_scale"])  # no per-client information was given


def test_step_sqrt_rule_uses_global_batch():
    cfg = ScalingConfig(method="step", small_batch=8, window=1, threshold=0.5, warmup=0)
    policy = ServerScalingPolicy(cfg, layer_sizes=[6], seed=0)
    scales = [policy.apply(i, torch.ones(6), ClientRound(batches=[16, 16]))[1]["scale"] for i in range(3)]
    assert scales == [1.0, pytest.approx(2.0), pytest.approx(2.0)]  # sqrt(32 / 8)


def test_state_dict_round_trip():
    norms, _ = norm_sequence()
    cfg = ScalingConfig(method="step", scale=2.0, window=3, threshold=0.5, warmup=2)
    clients, agg = synthetic_rounds(len(norms), [4, 4], seed=4)
    first = ServerScalingPolicy(cfg, LAYERS, seed=0)
    rounds = [(agg[i].float() * n, ClientRound([4, 4], grads=list(clients[i].float() * n)))
              for i, n in enumerate(norms)]
    for i in range(13):  # stop inside a window
        first.apply(i, *rounds[i])
    state = first.state_dict()
    assert all(type(v) in (int, float, bool) for v in state.values())
    json.dumps(state)
    second = ServerScalingPolicy(cfg, LAYERS, seed=0)
    second.load_state_dict(json.loads(json.dumps(state)))
    for i in range(13, len(norms)):
        out1, s1 = first.apply(i, *rounds[i])
        out2, s2 = second.apply(i, *rounds[i])
        assert torch.equal(out1, out2)
        assert json.dumps(s1) == json.dumps(s2)


# ---------------------------------------------------------------------------- teacher

def test_teacher_noise_has_the_intended_variance():
    n = 20000
    sigma = torch.tensor([0.5, 1.0, 2.0, 4.0]).repeat_interleave(n)
    coef = teacher_coefficient(8, 64)
    assert coef == pytest.approx(1 / 8 - 1 / 64)
    noise = teacher_noise(sigma, coef, teacher_generator(7, 3, torch.device("cpu"))).double()
    for group, s in zip(noise.view(4, n), (0.5, 1.0, 2.0, 4.0)):
        # n * s2 / var ~ chi-square(n): the ratio has standard deviation sqrt(2 / n).
        assert abs(group.var().item() / (coef * s) - 1) < 5 * math.sqrt(2 / n)
        assert abs(group.mean().item()) < 5 * math.sqrt(coef * s / n)
    again = teacher_noise(sigma, coef, teacher_generator(7, 3, torch.device("cpu")))
    other = teacher_noise(sigma, coef, teacher_generator(7, 4, torch.device("cpu")))
    assert torch.equal(noise.float(), again) and not torch.equal(again, other)


def _output_variance(cfg: ScalingConfig, batches: list[int], route: str, seed: int) -> torch.Tensor:
    clients, agg = synthetic_rounds(3000, batches, seed=seed)
    policy = ServerScalingPolicy(cfg, LAYERS, seed=11)
    outs = []
    for t, (c, a) in enumerate(zip(clients.float(), agg.float())):
        if route == "norms":
            per_layer = torch.stack([c[:, :2].square().sum(1), c[:, 2:].square().sum(1)], 1)
            info = ClientRound(batches, sq_norms=per_layer.double())
        elif route == "coordinates":
            info = ClientRound(batches, coordinate_sq=coordinate_squares(c, batches))
        else:
            info = ClientRound(batches, grads=list(c))
        outs.append(policy.apply(t, a, info)[0])
    return torch.stack(outs).double()


@pytest.mark.parametrize("route", ["gradients", "coordinates"])
def test_teacher_output_has_small_batch_variance(route):
    batches, small = [4, 4, 8, 16], 8
    cfg = ScalingConfig(method="teacher", small_batch=small, per_layer=False, only_outside_critical=False).for_rounds(100)
    out = _output_variance(cfg, batches, route, seed=5)
    sq_dev = (out - G).square()  # E = Sigma / b when the teacher tops the variance up
    assert_mean(sq_dev, SIGMA / small)
    assert z_score(sq_dev, SIGMA / sum(batches)).abs().max() > 6  # without the teacher: Sigma / B


def test_teacher_per_layer_uses_layer_mean_variance_from_norms():
    batches, small = [4, 4, 8, 16], 8
    cfg = ScalingConfig(method="teacher", small_batch=small, per_layer=True, only_outside_critical=False).for_rounds(100)
    out = _output_variance(cfg, batches, "norms", seed=6)
    coef = 1 / small - 1 / sum(batches)
    layer_mean = torch.cat([SIGMA[:2].mean().repeat(2), SIGMA[2:].mean().repeat(4)])
    assert_mean((out - G).square(), SIGMA / sum(batches) + coef * layer_mean)


def test_coordinate_variance_expands_layer_means():
    est = NoiseEstimate(None, torch.tensor([6.0, 4.0], dtype=torch.float64), 10.0, 1.0, 16)
    var = coordinate_variance(est, [2, 4], per_layer=True, numel=6, device=torch.device("cpu"))
    assert torch.equal(var, torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="per_layer"):
        coordinate_variance(est, [2, 4], per_layer=False, numel=6, device=torch.device("cpu"))


def test_teacher_only_outside_critical_phases():
    cfg = ScalingConfig(method="teacher", small_batch=2, window=1, threshold=0.5, warmup=3)
    policy = ServerScalingPolicy(cfg, LAYERS, seed=0)
    clients, agg = synthetic_rounds(6, [4, 4], seed=8)
    for t in range(6):
        out, stats = policy.apply(t, agg[t].float(), ClientRound([4, 4], grads=list(clients[t].float())))
        assert (stats["teacher_std"] > 0) == (stats["critical"] == 0.0)
        assert torch.equal(out, agg[t].float()) == (stats["critical"] == 1.0)


def test_teacher_rejects_small_batch_not_below_global_batch():
    with pytest.raises(ValueError, match="small_batch = 32 must be smaller"):
        teacher_coefficient(32, 32)


@pytest.mark.parametrize("method", ["step", "teacher", "step+teacher"])
def test_a_round_with_rejected_payloads_is_left_unscaled_not_fatal(method):
    """The server drops rejected clients from ClientRound: the accepted batch may then be no larger
    than the small batch, or one client may remain (no covariance). Neither may end the run."""
    cfg = ScalingConfig(method=method, small_batch=16, window=1, threshold=0.5, warmup=0,
                        only_outside_critical=False)
    policy = ServerScalingPolicy(cfg, [6], seed=0)
    grads = [torch.arange(6.0), torch.arange(6.0).flip(0)]
    policy.apply(0, torch.ones(6), ClientRound([16, 16], grads=grads))  # round 0 is critical
    full, stats = policy.apply(1, torch.ones(6), ClientRound([16, 16], grads=grads))
    assert stats["critical"] == 0.0 and not torch.equal(full, torch.ones(6))
    assert stats["scale"] == (1.0 if method == "teacher" else 2 ** 0.5)
    for batches, kept in (([16], grads[:1]), ([8, 8], grads)):
        out, stats = policy.apply(2, torch.ones(6), ClientRound(batches, grads=kept))
        assert torch.equal(out, torch.ones(6)) and stats["scale"] == 1.0 and stats["teacher_std"] == 0.0


@pytest.mark.parametrize("field, value", [
    ("method", "scaled"), ("scale", -1.0), ("small_batch", -2), ("window", -1), ("threshold", 0.0),
    ("warmup", -2), ("noise_ema", 1.0), ("batch_rate", 0.0),
])
def test_bad_options_raise_naming_the_option(field, value):
    with pytest.raises(ValueError, match=f"scaling.{field}"):
        ServerScalingPolicy(ScalingConfig(**{field: value}), LAYERS, seed=0)


def test_methods_that_need_small_batch_say_so():
    for method in ("teacher", "step+teacher"):
        with pytest.raises(ValueError, match="scaling.small_batch is unset"):
            ServerScalingPolicy(ScalingConfig(method=method), LAYERS, seed=0)
    with pytest.raises(ValueError, match="scaling.small_batch is unset"):
        ServerScalingPolicy(ScalingConfig(method="step"), LAYERS, seed=0)
    ServerScalingPolicy(ScalingConfig(method="step", scale=2.0).for_rounds(300), LAYERS, seed=0)


def test_window_and_warmup_follow_the_run_unless_given():
    """Left unset, the detector's window and warmup scale with train.rounds, so the step can act in a
    run of any length (before: a warmup of 500 rounds outlasted the default 300-round run)."""
    cfg = ScalingConfig(method="step", scale=2.0)
    with pytest.raises(ValueError, match="scaling.window = 0 and scaling.warmup = -1 follow train.rounds"):
        ServerScalingPolicy(cfg, LAYERS, seed=0)
    for rounds, window, warmup in ((300, 6, 30), (30, 1, 5), (10, 1, 5), (5000, 100, 500)):
        resolved = cfg.for_rounds(rounds)
        assert (resolved.window, resolved.warmup) == (window, warmup)
        assert resolved.first_scaled_round() <= rounds
    given = ScalingConfig(method="step", scale=2.0, window=100, warmup=0).for_rounds(30)
    assert (given.window, given.warmup, given.first_scaled_round()) == (100, 0, 200)


# ---------------------------------------------------------------------------- batch controller

def test_batch_controller_is_smooth_monotone_and_capped():
    ctl = BatchController(start=64, cap=1000, rate=0.5)
    seq = [ctl.update(x) for x in (256.0, 100.0, math.nan, 5000.0, 5000.0, 5000.0, math.inf, 10.0)]
    # Half the gap per round: 64 -> 160 (target 256); a lower or missing noise scale never shrinks
    # the batch; 5000 and inf are capped at 1000: 160 -> 580 -> 790 -> 895 -> 947.5.
    assert seq == [160, 160, 160, 580, 790, 895, 947, 947]
    assert BatchController(64, 1000, 1.0).update(5000.0) == 1000
    with pytest.raises(ValueError, match="batch_rate"):
        BatchController(64, 1000, 0.0)
    with pytest.raises(ValueError, match="memory"):
        BatchController(64, 32, 0.5)


def test_split_batch_respects_memory_limits():
    caps = [100, 50, 10, 40]
    for total in (4, 37, 150, 199, 200):
        share = split_batch(total, caps)
        assert sum(share) == total
        assert all(1 <= s <= c for s, c in zip(share, caps))
    assert split_batch(100, caps) == [50, 25, 5, 20]
    with pytest.raises(ValueError, match="cannot be split"):
        split_batch(201, caps)
