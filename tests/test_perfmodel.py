"""Performance model and planner: fits recover known parameters, the planner keeps its promises,
re-planning settles. Pure tests run in-process; one test runs the MPI measurement under mpirun."""

from __future__ import annotations

import dataclasses

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mpifed.commands.plan import plan as plan_command
from mpifed.perf import (Calibration, CollectiveSample, CommModel, ComputeCurve, OnlineModel, Profile, ClientProfile,
                         Replanner, fit_collective, load_profile, mdape, plan_batches, plan_throughput,
                         predict_round, save_profile, uniform_split)
from mpifed.perf.comm import CollectiveCost, terms
from mpifed.perf.straggler import slowest_median, spreads

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = Path(sys.executable).parent / "mpirun"


def noisy(curve: ComputeCurve, batches, repeats: int, sigma: float, rng) -> list[tuple[int, float]]:
    return [(b, float(curve.predict(b)) * rng.lognormal(0, sigma)) for b in batches for _ in range(repeats)]


# ---- compute curves ---------------------------------------------------------------------------

def test_curve_fit_recovers_plateau_and_line():
    rng = np.random.default_rng(1)
    true = ComputeCurve(a=0.005, c=1e-4, t_floor=0.02)  # knee at b = 150
    fit = ComputeCurve.fit(noisy(true, [1 << i for i in range(11)], 5, 0.03, rng))
    assert fit.c == pytest.approx(true.c, rel=0.05)
    assert fit.t_floor == pytest.approx(true.t_floor, rel=0.05)
    assert fit.a == pytest.approx(true.a, abs=0.002)
    assert fit.knee == pytest.approx(true.knee, rel=0.15)
    assert 0.01 < fit.rel_rms < 0.06  # the 3% noise, seen through the residual


def test_curve_fit_affine_device_has_no_plateau():
    rng = np.random.default_rng(2)
    true = ComputeCurve(a=0.003, c=2e-5)
    fit = ComputeCurve.fit(noisy(true, [1 << i for i in range(10)], 5, 0.02, rng))
    assert fit.a == pytest.approx(true.a, rel=0.1)
    assert fit.c == pytest.approx(true.c, rel=0.05)
    b = np.arange(1, 513)
    assert np.max(np.abs(fit.predict(b) / true.predict(b) - 1)) < 0.05


def test_curve_fit_exact_on_clean_data_and_round_trips():
    true = ComputeCurve(a=-0.01, c=1e-3, t_floor=0.05)  # a < 0 is fine when a plateau holds it up
    fit = ComputeCurve.fit([(b, float(true.predict(b))) for b in (1, 4, 16, 32, 64, 128, 256)])
    assert (fit.a, fit.c, fit.t_floor) == pytest.approx((true.a, true.c, true.t_floor), rel=1e-9)
    assert ComputeCurve.from_dict(json.loads(json.dumps(fit.to_dict()))) == fit


def test_curve_rejects_bad_input():
    with pytest.raises(ValueError, match="2 distinct batch sizes"):
        ComputeCurve.fit([(8, 0.1), (8, 0.11)])
    with pytest.raises(ValueError, match="seconds > 0"):
        ComputeCurve.fit([(1, 0.1), (2, -1.0)])
    with pytest.raises(ValueError, match="positive time"):
        ComputeCurve(a=-1.0, c=0.1)
    with pytest.raises(ValueError, match="lacks"):
        ComputeCurve.from_dict({"a": 1.0})


def test_max_batch_within_inverts_predict():
    curve = ComputeCurve(a=0.002, c=3e-4, t_floor=0.01)
    for seconds in (0.005, 0.01, 0.0101, 0.05, 0.3):
        b = curve.max_batch_within(seconds, cap=500)
        assert b == max([0] + [x for x in range(1, 501) if curve.predict(x) <= seconds])


# ---- collectives ------------------------------------------------------------------------------

def test_alpha_beta_fit_recovers_known_costs():
    rng = np.random.default_rng(3)
    true = {"bcast": (5e-6, 2e-10), "reduce": (8e-6, 6e-10), "gatherv": (4e-6, 3e-10), "gather": (3e-6, 1e-9)}
    samples = []
    for kind, (alpha, beta) in true.items():
        cost = CollectiveCost(kind, alpha, beta)
        for p in (3, 4, 8, 16):
            for m in np.geomspace(64, 64 << 20, 10).astype(int):
                samples += [CollectiveSample(kind, p, int(m), cost.predict(p, m) * rng.lognormal(0, 0.03))]
    model = fit_collective(samples)
    for kind, (alpha, beta) in true.items():
        assert model.costs[kind].alpha == pytest.approx(alpha, rel=0.1), kind
        assert model.costs[kind].beta == pytest.approx(beta, rel=0.05), kind
    assert CommModel.from_dict(json.loads(json.dumps(model.to_dict()))).costs == model.costs


def test_alpha_beta_terms_follow_mpich_switch_points():
    assert terms("bcast", 4, 1 << 20) == (2, 2 * (1 << 20))  # p < 8: binomial even for large messages
    assert terms("bcast", 16, 1 << 20) == (4 + 15, 2 * 15 / 16 * (1 << 20))
    assert terms("bcast", 16, 1 << 16) == (2 * 4, 2 * 15 / 16 * (1 << 16))  # medium, p = 2^k: recursive doubling
    assert terms("bcast", 12, 1 << 16) == (4 + 11, 2 * 11 / 12 * (1 << 16))  # medium, other p: ring
    assert terms("reduce", 4, 1024) == (2, 2048)
    assert terms("reduce", 4, 1 << 20) == (4, 2 * 3 / 4 * (1 << 20))
    with pytest.raises(ValueError, match="unknown collective"):
        terms("allreduce", 4, 8)


def test_alpha_beta_fit_never_negative():
    # Times below a pure bandwidth line: least squares alone would give alpha < 0 (a negative latency)
    samples = [CollectiveSample("reduce", 4, m, 1.5e-9 * m - 2e-6) for m in (4096, 1 << 16, 1 << 20)]
    cost = fit_collective(samples).costs["reduce"]
    assert cost.alpha == 0 and cost.beta > 0


# ---- round prediction and planner ---------------------------------------------------------------

def toy_comm() -> CommModel:
    return CommModel({k: CollectiveCost(k, 2e-5, 1e-9) for k in ("bcast", "reduce", "gatherv", "gather")})


def speeds_4x() -> list[ComputeCurve]:
    """Four clients; the fastest runs 4x the slowest (per-sample cost 1, 2, 3, 4 x 0.1 ms)."""
    return [ComputeCurve(a=0.004, c=f * 1e-4, t_floor=0.006) for f in (1, 2, 3, 4)]


def test_predict_round_sums_parts_and_names_bound():
    curves, comm = speeds_4x(), toy_comm()
    pred = predict_round(curves, [64, 64, 64, 64], comm, 4 << 20, 4 << 20, 5, server_seconds=0.001,
                         metrics_bytes=128)
    expected_comm = comm.predict("bcast", 5, 4 << 20) + comm.predict("reduce", 5, 4 << 20) + \
        comm.predict("gather", 5, 128)
    assert pred.t_comm == pytest.approx(expected_comm)
    assert pred.t_round == pytest.approx(float(curves[3].predict(64)) + expected_comm + 0.001)
    assert pred.slowest_client == 3 and pred.throughput == pytest.approx(256 / pred.t_round)
    linky = predict_round(curves, [1, 1, 1, 1], comm, 200 << 20, 200 << 20, 5)
    assert linky.bound_by.startswith("link")
    assert mdape([1.1, 0.9, 1.0], [1.0, 1.0, 1.0]) == pytest.approx(10.0)


def test_slowest_of_k_jittering_clients_matches_the_order_statistic():
    # K equal clients: the median of the max solves Phi(z)^K = 1/2, z = 0.545 / 0.819 / 1.005 for K = 2 / 3 / 4
    for k, z in ((1, 0.0), (2, 0.5449), (3, 0.8193), (4, 1.0048)):
        assert slowest_median([0.05] * k, [0.1] * k) == pytest.approx(0.05 * np.exp(0.1 * z), rel=1e-3)
    assert slowest_median([0.02, 0.05], [0.0, 0.0]) == 0.05            # no jitter: the plain max
    assert slowest_median([0.01, 0.05], [0.1, 0.1]) == pytest.approx(0.05, rel=1e-6)  # a fast client adds nothing
    # unequal clients: against a simulation of the max of lognormal steps
    t, s = np.array([0.03, 0.04, 0.045]), np.array([0.05, 0.15, 0.1])
    draws = (t * np.exp(s * np.random.default_rng(3).standard_normal((200_000, 3)))).max(axis=1)
    assert slowest_median(t.tolist(), s.tolist()) == pytest.approx(np.median(draws), rel=3e-3)
    with pytest.raises(ValueError, match="one spread per time"):
        slowest_median([0.1, 0.2], [0.1])


def test_spreads_recover_each_clients_own_jitter_but_not_the_shared_one():
    rng = np.random.default_rng(4)
    rounds, own = 3000, np.array([0.05, 0.1, 0.15])
    batches = np.tile([[8, 16, 16], [32, 64, 64]], (rounds // 2, 1))
    curve = ComputeCurve(a=0.003, c=2e-4)
    shared = rng.normal(0, 0.3, (rounds, 1))             # the whole machine slowing down together
    seconds = curve.predict(batches) * np.exp(shared + own * rng.standard_normal((rounds, 3)))
    assert spreads(seconds, batches) == pytest.approx(own.tolist(), abs=0.006)   # not the shared 0.3
    assert spreads(seconds[:, :1], batches[:, :1]) == [0.0]      # a lone client waits for no one
    with pytest.raises(ValueError, match="rounds, clients"):
        spreads(seconds[:, 0], batches[:, 0])
    curve = ComputeCurve(0.001, 1e-4).with_spread(0.08)
    assert ComputeCurve.from_dict(json.loads(json.dumps(curve.to_dict()))) == curve
    assert curve.shifted(0.01).spread == curve.scaled(2).spread == 0.08


def test_predict_round_waits_for_the_slowest_draw():
    comm = toy_comm()
    steady = predict_round(speeds_4x(), [64] * 4, comm, 1 << 20, 1 << 20, 5)
    jitter = predict_round([c.with_spread(0.1) for c in speeds_4x()], [64] * 4, comm, 1 << 20, 1 << 20, 5)
    slowest = float(speeds_4x()[3].predict(64))
    assert steady.t_compute_max == pytest.approx(slowest)
    assert slowest < jitter.t_compute_max < slowest * np.exp(0.1)   # above the curve, below +1 sd
    assert jitter.t_round - steady.t_round == pytest.approx(jitter.t_compute_max - slowest)
    assert jitter.idle()[3] == 0 and jitter.slowest_client == 3


@pytest.mark.parametrize("global_batch", [4, 5, 37, 400, 1000, 1500])
def test_planner_respects_caps_and_sum_and_optimum(global_batch):
    curves = speeds_4x()
    caps = [600, 300, 500, 100]
    batches = plan_batches(curves, caps, global_batch)
    assert sum(batches) == global_batch
    assert all(1 <= b <= cap for b, cap in zip(batches, caps))
    slowest = max(float(c.predict(b)) for c, b in zip(curves, batches))
    # No single move of one sample from one client to another makes the slowest client faster.
    for i in range(4):
        for j in range(4):
            if i != j and batches[i] > 1 and batches[j] < caps[j]:
                moved = list(batches)
                moved[i] -= 1
                moved[j] += 1
                assert max(float(c.predict(b)) for c, b in zip(curves, moved)) >= slowest - 1e-15


def test_planner_gives_faster_clients_more():
    batches = plan_batches(speeds_4x(), [10_000] * 4, 2000)
    assert batches == sorted(batches, reverse=True) and batches[0] > 3 * batches[3]


def test_planner_errors_are_clear():
    with pytest.raises(ValueError, match="exceeds the sum of the clients' max batches"):
        plan_batches(speeds_4x(), [10, 10, 10, 10], 41)
    with pytest.raises(ValueError, match="at least one sample"):
        plan_batches(speeds_4x(), [10, 10, 10, 10], 3)
    with pytest.raises(ValueError, match="max batch below 1"):
        plan_batches(speeds_4x(), [10, 0, 10, 10], 12)


def test_uniform_split_water_fills_caps():
    assert uniform_split(10, 3) == [4, 3, 3]
    assert uniform_split(100, 4, [10, 50, 50, 5]) == [10, 43, 42, 5]
    assert uniform_split(115, 4, [10, 50, 50, 5]) == [10, 50, 50, 5]
    with pytest.raises(ValueError, match="cannot split"):
        uniform_split(116, 4, [10, 50, 50, 5])


def test_planned_split_beats_uniform_by_1_5x_at_4x_speed_spread():
    curves, comm = speeds_4x(), toy_comm()
    caps, b_global = [4096] * 4, 2048

    def throughput(batches):
        return predict_round(curves, batches, comm, 1 << 20, 1 << 20, 5).throughput

    ratio = throughput(plan_batches(curves, caps, b_global)) / throughput(uniform_split(b_global, 4, caps))
    assert ratio >= 1.5


def test_plan_throughput_picks_best_candidate_or_knee():
    curves, comm = speeds_4x(), toy_comm()

    def predict(batches):
        return predict_round(curves, batches, comm, 1 << 20, 1 << 20, 5)

    uncapped = [1 << 14] * 4
    assert plan_throughput(curves, uncapped, predict, candidates=[256, 1024, 4096]).global_batch == 4096
    # With equal caps, filling them all puts 512 samples on the 4x slower client: worse than 1024.
    caps = [512] * 4
    best = plan_throughput(curves, caps, predict)
    by_b = {b: predict(plan_batches(curves, caps, b)).throughput for b in (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)}
    assert best.global_batch == max(by_b, key=by_b.get) and best.global_batch < 2048
    assert best.batches == plan_batches(curves, caps, best.global_batch)
    knee = plan_throughput(curves, caps, predict, min_fraction=0.8)
    assert knee.global_batch < best.global_batch
    assert knee.prediction.throughput >= 0.8 * best.prediction.throughput


# ---- re-planning ------------------------------------------------------------------------------

def run_replanner(rep: Replanner, model: list[ComputeCurve], true: list[ComputeCurve], rounds: int, sigma: float,
                  rng) -> tuple[list[int], Calibration]:
    """Feed noisy measured times from `true` curves through the clients' calibration of `model` into
    the re-planner; return the rounds at which batches changed, and the calibration."""
    changes, cal = [], Calibration(len(model))
    for r in range(rounds):
        measured = [float(c.predict(b)) * rng.lognormal(0, sigma) for c, b in zip(true, rep.batches)]
        cal.update(measured, [float(c.predict(b)) for c, b in zip(model, rep.batches)])
        if rep.observe([c.scaled(f) for c, f in zip(model, cal.factors)]):
            changes.append(r)
            assert sum(rep.batches) == 1024
            assert all(1 <= b <= cap for b, cap in zip(rep.batches, rep.max_batches))
    return changes, cal


def test_replanner_stays_put_under_stationary_noise():
    rng = np.random.default_rng(4)
    curves, caps = speeds_4x(), [1024] * 4
    rep = Replanner(caps, plan_batches(curves, caps, 1024))
    assert run_replanner(rep, curves, curves, 300, 0.05, rng)[0] == []


def test_replanner_adapts_to_step_change_then_settles():
    rng = np.random.default_rng(5)
    curves, caps = speeds_4x(), [1024] * 4
    rep = Replanner(caps, plan_batches(curves, caps, 1024))
    slowed = [curves[0].scaled(3.0)] + curves[1:]  # client 0 becomes 3x slower (a neighbour's job)
    changes, cal = run_replanner(rep, curves, slowed, 300, 0.05, rng)
    assert changes and changes[0] < 20 and changes[-1] < 60  # adapts quickly, then stops moving
    assert cal.factors[0] == pytest.approx(3.0, rel=0.1) and cal.factors[1] == pytest.approx(1.0, rel=0.1)
    ideal = plan_batches(slowed, caps, 1024)
    assert all(abs(b - i) <= 0.1 * i + 2 for b, i in zip(rep.batches, ideal))
    before = max(float(c.predict(b)) for c, b in zip(slowed, plan_batches(curves, caps, 1024)))
    after = max(float(c.predict(b)) for c, b in zip(slowed, rep.batches))
    assert after < 0.8 * before


def test_replanner_settles_when_curve_shape_is_wrong():
    """Drift in the intercept only (not a pure scaling) must still converge without flapping."""
    rng = np.random.default_rng(6)
    curves, caps = speeds_4x(), [1024] * 4
    true = [ComputeCurve(c.a + 0.02 * (k == 1), c.c, c.t_floor + 0.02 * (k == 1)) for k, c in enumerate(curves)]
    rep = Replanner(caps, plan_batches(curves, caps, 1024))
    changes, _ = run_replanner(rep, curves, true, 400, 0.03, rng)
    assert changes and changes[-1] < 100


# ---- the online model -----------------------------------------------------------------------------

def observe_level(model: OnlineModel, batches: list[int], client_factors: list[float], shared: float,
                  rounds: int, rng, sigma: float = 0.0, links: tuple[float, ...] = (0.0,) * 4) -> None:
    """Feed `rounds` rounds measured off the uncorrected model: client k's step times client_factors[k]
    (less its link, as the log times it), bcast, update path and server times `shared`."""
    base = model.predict(batches, corrected=False)
    for _ in range(rounds):
        noise = rng.lognormal(0, sigma, 4) if sigma else np.ones(4)
        full = np.array(base.t_clients) * np.array(client_factors) * noise
        t_up = shared * base.t_collectives[model.profile.up] + full.max()
        t_down, t_server = shared * base.t_collectives["bcast"], shared * base.t_server
        model.observe(batches, full - np.array(links), t_down, t_up, t_server, t_down + t_up + t_server)


def test_online_model_starts_at_the_startup_prediction_and_follows_a_level_shift():
    profile, batches = toy_profile(), [400, 250, 200, 150]
    model = OnlineModel(profile)
    start = model.predict(batches, corrected=False)
    assert model.predict(batches).t_round == pytest.approx(start.t_round, rel=1e-12)
    observe_level(model, batches, [1.3, 1.0, 1.0, 1.6], 2.0, 40, np.random.default_rng(0))
    assert model.speed == pytest.approx([1.3, 1.0, 1.0, 1.6], rel=1e-3)
    assert model.shared.factors == pytest.approx([2.0, 2.0], rel=1e-3)
    assert model.bias == pytest.approx(1.0, abs=1e-3)  # the corrected terms add up to the rounds
    after = model.predict(batches)
    # every term at its new level; the slowest client is now client 3 (1.6x)
    assert after.t_clients == pytest.approx([f * t for f, t in zip([1.3, 1, 1, 1.6], start.t_clients)], rel=1e-3)
    assert after.t_server == pytest.approx(2 * start.t_server, rel=1e-3)
    for kind in ("bcast", profile.up):
        assert after.t_collectives[kind] == pytest.approx(2 * start.t_collectives[kind], rel=1e-3)
    assert after.slowest_client == 3
    # other batches are predicted from the corrected curves, not from the last round's times
    other = [300, 300, 250, 174]
    assert model.predict(other).t_clients == pytest.approx(
        [f * float(c.predict(b)) for f, c, b in zip([1.3, 1, 1, 1.6], profile.curves, other)], rel=1e-3)


def test_online_model_is_robust_to_one_outlier_and_adds_the_links_back():
    profile, batches = toy_profile(), [400, 250, 200, 150]
    links = (0.002, 0.0, 0.0, 0.001)
    model = OnlineModel(profile, links)
    observe_level(model, batches, [1.0] * 4, 1.0, 5, np.random.default_rng(1), links=links)
    assert model.speed == pytest.approx([1.0] * 4, rel=1e-9)   # the log's steps exclude the links
    observe_level(model, batches, [3.0, 1.0, 1.0, 1.0], 1.0, 1, np.random.default_rng(2), links=links)
    assert model.speed[0] == pytest.approx(3.0 ** 0.2, rel=1e-6)  # geometric: 1.25x, not 1.4x
    before, shared = model.speed, model.shared.factors
    model.observe(batches, [np.nan, 0.01, 0.01, 0.01], 0.001, 0.05, 0.002, 0.06)  # a gap in the log
    assert model.speed[0] == before[0] and all(a != b for a, b in zip(model.speed[1:], before[1:]))
    # the collectives are measured net of the slowest step, unknown here; the server's are not
    assert model.shared.factors[0] == shared[0] and model.shared.factors[1] != shared[1]
    with pytest.raises(ValueError, match="one link time per client"):
        OnlineModel(profile, (0.0,))


def test_online_model_calibrates_the_collectives_without_a_server_time():
    """A hand-written profile may leave server_seconds at 0: the server's factor has no level to
    scale, but the collectives' must still follow the rounds, not hide in the round's bias."""
    profile = dataclasses.replace(toy_profile(), server_seconds=0.0)
    model, batches = OnlineModel(profile), [400, 250, 200, 150]
    observe_level(model, batches, [1.0] * 4, 3.0, 40, np.random.default_rng(3))
    assert model.shared.factors == pytest.approx([3.0, 1.0], rel=1e-3)
    assert model.bias == pytest.approx(1.0, abs=1e-3)


def test_online_model_learns_its_own_bias_from_the_rounds():
    """Rounds that take 20% longer than their measured terms add up to (work the model does not
    see) are predicted 20% longer; the terms themselves stay as measured."""
    profile, batches = toy_profile(), [400, 250, 200, 150]
    model = OnlineModel(profile)
    base = model.predict(batches, corrected=False)
    full = np.array(base.t_clients)
    t_down, t_up, t_server = base.t_collectives["bcast"], base.t_collectives[profile.up] + full.max(), base.t_server
    for _ in range(40):
        model.observe(batches, full, t_down, t_up, t_server, 1.2 * (t_down + t_up + t_server))
    assert model.bias == pytest.approx(1.2, rel=1e-3) and model.speed == pytest.approx([1.0] * 4)
    assert model.predict(batches).t_round == pytest.approx(1.2 * base.t_round, rel=1e-3)
    assert model.predict(batches).t_compute_max == pytest.approx(base.t_compute_max, rel=1e-9)


def test_online_model_tracks_within_a_jittering_run():
    """With 5% jitter and a 1.4x level shift, predictions after a dozen rounds are within a few percent
    of the new level, and the start-up prediction stays 40% off."""
    rng = np.random.default_rng(3)
    profile, batches = toy_profile(), [400, 250, 200, 150]
    model = OnlineModel(profile)
    observe_level(model, batches, [1.4] * 4, 1.4, 15, rng, sigma=0.05)
    truth = 1.4 * model.predict(batches, corrected=False).t_round
    assert model.predict(batches).t_round == pytest.approx(truth, rel=0.05)


# ---- profile file and the plan command ------------------------------------------------------------

def toy_profile(caps=(1200, 600, 400, 300)) -> Profile:
    clients = tuple(ClientProfile(k, k + 1, f"emulated {k}", cap, c)
                    for k, (c, cap) in enumerate(zip(speeds_4x(), caps)))
    return Profile(5, 1 << 20, 1 << 20, clients, toy_comm(), metrics_bytes=128, server_seconds=0.001)


def test_profile_file_round_trip_and_plan_command(tmp_path):
    path = tmp_path / "prof.json"
    save_profile(toy_profile(), path)
    assert load_profile(path) == toy_profile()
    result = CliRunner().invoke(plan_command, [str(path), "--global-batch", "1024"])
    assert result.exit_code == 0, result.output
    assert "global batch 1024" in result.output and "vs uniform split" in result.output
    result = CliRunner().invoke(plan_command, [str(path), "--maximize"])
    assert result.exit_code == 0 and "global batch 2500" in result.output
    result = CliRunner().invoke(plan_command, [str(path), "--global-batch", "5000"])
    assert result.exit_code != 0 and "exceeds the sum" in result.output
    result = CliRunner().invoke(plan_command, [str(path)])
    assert result.exit_code != 0 and "exactly one of" in result.output
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="mpifed-profile"):
        load_profile(path)


# ---- under MPI ------------------------------------------------------------------------------------

MPI_SCRIPT = textwrap.dedent("""
    import json
    from mpi4py import MPI
    from mpifed.perf import measure_collectives

    comm = MPI.COMM_WORLD
    samples = measure_collectives(comm, [64, 1 << 16, 1 << 22], repeats=3)
    if comm.Get_rank() == 0:
        print(json.dumps([s.to_list() for s in samples]))
    else:
        assert samples == []
""")


@pytest.mark.mpi
def test_measure_collectives_under_mpirun():
    if not MPIRUN.exists():
        pytest.skip(f"no mpirun next to {sys.executable}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([str(MPIRUN), "-n", "3", sys.executable, "-c", MPI_SCRIPT],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [CollectiveSample.from_list(r) for r in json.loads(out.stdout.strip().splitlines()[-1])]
    assert {r.kind for r in rows} == {"bcast", "reduce", "gatherv", "gather"}
    for kind in ("bcast", "reduce", "gatherv", "gather"):
        mine = sorted((r for r in rows if r.kind == kind), key=lambda r: r.nbytes)
        assert [r.nbytes for r in mine] == [64, 1 << 16, 1 << 22] and all(r.ranks == 3 for r in mine)
        assert all(r.seconds > 0 for r in mine)
        assert mine[-1].seconds > mine[0].seconds  # 4 MiB costs more than 64 B


def test_comm_model_reads_measurements_inside_their_range():
    samples = [CollectiveSample("bcast", 4, 1024, 1e-5), CollectiveSample("bcast", 4, 1 << 20, 4e-4),
               CollectiveSample("bcast", 4, 1 << 22, 3e-3)]  # a protocol switch alpha-beta cannot follow
    model = fit_collective(samples)
    assert model.predict("bcast", 4, 1 << 20) == pytest.approx(4e-4)
    assert 4e-4 < model.predict("bcast", 4, 2 << 20) < 3e-3
    assert model.predict("bcast", 8, 1 << 20) == pytest.approx(model.costs["bcast"].predict(8, 1 << 20))
    assert model.predict("bcast", 4, 1 << 24) == pytest.approx(model.costs["bcast"].predict(4, 1 << 24))
