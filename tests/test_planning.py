"""The start-up planner's pure parts (mpifed.planning) and the prediction analysis, without MPI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mpifed.analysis.load import Run
from mpifed.analysis.prediction import steady_rounds, steady_throughput, terms
from mpifed.analysis.summary import perf_model_error
from mpifed.config import JobError, load_job
from mpifed.perf import ClientProfile, CollectiveSample, ComputeCurve, Profile, fit_collective, plan_batches
from mpifed.perf.report import predict_for
from mpifed.planning import choose_batches, fit_client, plan_cap, probe_grid, probe_terms, profile_cap


def _profile(curves, caps):
    comm = fit_collective([CollectiveSample("bcast", 3, 1000, 0.002), CollectiveSample("reduce", 3, 1000, 0.003)])
    clients = tuple(ClientProfile(k, k + 1, "cpu", cap, c) for k, (c, cap) in enumerate(zip(curves, caps)))
    return Profile(len(curves) + 1, 1000, 1000, clients, comm, "reduce", 0, 0.001)


def test_a_single_measured_size_is_reproduced_exactly_by_the_comm_model():
    comm = fit_collective([CollectiveSample("bcast", 4, 77864, 0.004), CollectiveSample("gatherv", 4, 9000, 0.02)])
    assert comm.predict("bcast", 4, 77864) == pytest.approx(0.004, rel=1e-9)
    assert comm.predict("gatherv", 4, 9000) == pytest.approx(0.02, rel=1e-9)


def test_choose_batches_by_mode():
    fast, slow = ComputeCurve(0.001, 0.001), ComputeCurve(0.004, 0.004)
    profile = _profile([fast, slow], [96, 96])
    assert choose_batches("predict", profile, [32, 32], 1.0) == [32, 32]
    balanced = choose_batches("balance", profile, [32, 32], 1.0)
    assert sum(balanced) == 64 and balanced[0] > 3 * balanced[1]
    capped = choose_batches("balance", _profile([fast, slow], [40, 96]), [32, 32], 1.0)
    assert capped == [40, 24]
    best = choose_batches("maximize", profile, [32, 32], 1.0)
    rate = lambda b: predict_for(profile, b).throughput  # noqa: E731
    assert all(b <= 96 for b in best)
    assert all(rate(best) >= rate(plan_batches(profile.curves, [96, 96], g)) for g in (16, 32, 128, 192))
    with pytest.raises(ValueError, match="plan.mode"):
        choose_batches("fastest", profile, [32, 32], 1.0)


def test_profile_and_plan_caps():
    assert profile_cap("balance", 500, 96, 0) == 96        # the global batch bounds a balanced split
    assert profile_cap("balance", 40, 96, 0) == 40         # never above the memory cap
    assert profile_cap("maximize", 500, 96, 0) == 500      # maximize looks up to the memory cap
    assert profile_cap("predict", 0, 96, 200) == 200       # profile_max, no memory model
    with pytest.raises(JobError, match="plan.profile_max"):
        profile_cap("maximize", 0, 96, 0)
    assert plan_cap("maximize", 500, 96, 128) == 128
    assert plan_cap("balance", 500, 96, 96) == 96 and plan_cap("balance", 0, 96, 96) == 96


def test_probe_grid_spans_a_sixteenth_of_the_cap_to_the_cap_and_holds_the_clients_batch():
    assert probe_grid(96, 4, 32) == [6, 15, 32, 38, 96]
    assert probe_grid(96, 4, 500) == [6, 15, 38, 96, 96]      # the batch never above the cap
    assert probe_grid(2, 4, 2) == [1, 1, 2, 2, 2]             # same length on every client


def _probe_tables(rng, rounds=40):
    """Server and two client tables (probes.PROBE_COLUMNS) of rounds whose parts are known: broadcast
    2 ms, slowest compute, then 3 ms more of update path, server 1 ms."""
    b = np.tile([8, 32], rounds // 2)
    steps = [ComputeCurve(0.002, 5e-4), ComputeCurve(0.001, 1e-3)]
    compute = [c.predict(b) * rng.lognormal(0, 0.05, rounds) for c in steps]
    nan = np.full(rounds, np.nan)
    clients = [np.column_stack([b, t, nan, nan, nan]) for t in compute]
    slowest = np.maximum(*compute)
    server = np.column_stack([nan, nan, np.full(rounds, 0.002), slowest + 0.003, np.full(rounds, 0.001)])
    return server, clients, steps


def test_probe_terms_split_the_round_as_the_log_does():
    server, clients, _ = _probe_tables(np.random.default_rng(5))
    assert probe_terms(server, clients) == pytest.approx((0.002, 0.003, 0.001))
    server[:, 3] = 0.0   # the clients' compute hid the whole update path: a positive floor, not a negative term
    assert 0 < probe_terms(server, clients)[1] <= 1e-6


def test_fit_client_recovers_the_curve_from_probe_rounds():
    server, clients, steps = _probe_tables(np.random.default_rng(6), rounds=400)
    curve, samples = fit_client(clients[1], link=0.004, jitter=0.05)
    assert [b for b, _ in samples] == [8, 32]
    assert curve.predict(32) == pytest.approx(steps[1].predict(32) + 0.004, rel=0.02)
    assert curve.c == pytest.approx(1e-3, rel=0.05) and curve.spread == 0.05


def test_plan_section_is_validated():
    job = load_job(overrides=["plan.mode=\"balance\"", "plan.points=5"])
    assert job.plan.mode == "balance" and job.plan.points == 5
    with pytest.raises(JobError, match="plan.mode = 'fast': must be one of off, predict, balance, maximize"):
        load_job(overrides=["plan.mode=\"fast\""])
    with pytest.raises(JobError, match="plan.min_fraction = 1.5"):
        load_job(overrides=["plan.min_fraction=1.5"])


def _run(t_iter, pred, eval_rounds, batch=16.0):
    t = len(t_iter)
    it = {"t_iter": np.column_stack([t_iter, t_iter, t_iter]),
          "t_iter_pred": np.column_stack([pred] * 3),
          "batch": np.column_stack([np.full(t, 2 * batch), np.full(t, batch), np.full(t, batch)])}
    ranks = {"role": np.array(["server", "client 0", "client 1"], dtype=object)}
    return Run(Path("x"), {}, {}, ranks, it, {}, {"round": np.array(eval_rounds, dtype=float)})


def test_round_time_error_skips_warmup_and_evaluation_rounds():
    measured = np.array([5.0, 2.0, 2.0, 0.1, 0.1, 0.11, 0.09, 0.1, 0.5])
    run = _run(measured, np.full(9, 0.12), [9])  # the last round (1-based 9) evaluates
    assert steady_rounds(run).tolist() == [3, 4, 5, 6, 7]
    mdape, n = perf_model_error(run)
    assert n == 5 and mdape == pytest.approx(20.0)  # errors 20, 20, 9, 33, 20 %; with the skipped rounds: 33 %
    assert steady_throughput(run) == pytest.approx(32 * 5 / 0.5)
    assert math.isnan(perf_model_error(_run(measured, np.full(9, np.nan), [9]))[0])
    assert terms(run) == []   # no fitted model in this log
