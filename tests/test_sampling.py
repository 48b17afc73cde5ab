"""Sampling K of N clients, placing them on worker ranks, and the job fields that ask for it."""

from __future__ import annotations

import numpy as np
import pytest

from mpifed.config import JobError, load_job, pooled_limits, resolve_clients
from mpifed.placement import Placement
from mpifed.sampling import ClientPool, place_clients, predicted_seconds, sample_clients


def test_a_rounds_sample_is_k_distinct_ids_drawn_again_the_same_from_seed_and_round():
    draws = [sample_clients(0, rnd, 1000, 10) for rnd in range(50)]
    for ids in draws:
        assert len(ids) == 10 and len(set(ids.tolist())) == 10
        assert (np.diff(ids) > 0).all() and ids.min() >= 0 and ids.max() < 1000
    assert all(np.array_equal(a, sample_clients(0, rnd, 1000, 10)) for rnd, a in enumerate(draws))
    assert len({tuple(ids) for ids in draws}) == 50  # rounds differ
    assert not np.array_equal(draws[0], sample_clients(1, 0, 1000, 10))  # so do seeds
    assert sample_clients(0, 3, 5, 5).tolist() == [0, 1, 2, 3, 4]


def test_uniform_sampling_gives_every_client_k_over_n_and_data_sampling_follows_the_sizes():
    rounds, n, k = 4000, 8, 2
    uniform = np.bincount(np.concatenate([sample_clients(0, r, n, k) for r in range(rounds)]), minlength=n)
    assert np.allclose(uniform / rounds, k / n, atol=0.03)
    sizes = [1, 1, 1, 1, 1, 1, 1, 13]  # client 7 holds 13/20 of the data
    by_data = np.bincount(np.concatenate([sample_clients(0, r, n, 1, sizes) for r in range(rounds)]), minlength=n)
    assert abs(by_data[7] / rounds - 13 / 20) < 0.03 and (by_data[:7] / rounds < 0.08).all()


def test_balanced_placement_puts_slow_clients_on_less_loaded_ranks():
    # longest first, each onto the least loaded rank (ties: the lower): 8 -> 0, 7 -> 1, 6 -> 1, 5 -> 0, 4 -> 0;
    # a makespan of 17 where the best is 15 (8 + 7 | 6 + 5 + 4): within Graham's 4/3
    seconds = [8.0, 7.0, 6.0, 5.0, 4.0]
    assert place_clients(seconds, 2).tolist() == [0, 1, 1, 0, 0]
    slow_first = place_clients([1.0, 1.0, 1.0, 3.0], 2)  # the slow client gets a rank of its own
    assert slow_first.tolist() == [1, 1, 1, 0]
    assert place_clients(seconds, 2, balanced=False).tolist() == [0, 1, 0, 1, 0]
    assert place_clients([1.0] * 6, 3).tolist() == [0, 1, 2, 0, 1, 2]  # equal times: round-robin order


def test_balanced_placement_beats_round_robin_with_a_4x_speed_spread():
    rng = np.random.default_rng(0)
    gains = []
    for _ in range(200):
        speeds = rng.choice([0.25, 1.0], size=12)
        seconds = predicted_seconds([32] * 12, speeds, 1)
        makespan = {b: np.bincount(place_clients(seconds, 4, b), weights=seconds, minlength=4).max()
                    for b in (True, False)}
        assert makespan[True] <= makespan[False] + 1e-9
        assert makespan[True] <= 4 / 3 * max(seconds.sum() / 4, seconds.max()) + 1e-9  # Graham's bound
        gains.append(makespan[False] / makespan[True])
    assert np.mean(gains) > 1.2


def test_a_pool_assigns_ranks_and_cursors_and_a_restored_pool_continues_the_same():
    def pool():
        seconds = predicted_seconds([8, 8, 16, 8, 32, 8], [1.0, 0.5, 1.0, 1.0, 1.0, 0.25], 2)
        return ClientPool(0, [8, 8, 16, 8, 32, 8], seconds, [10] * 6, per_round=3,
                          workers=2, local_steps=2, by_data=False, balanced=True)

    a, out = pool(), np.zeros((4, 3), dtype=np.int64)
    rows, last_rank = [], {}
    for rnd in range(6):
        ids = a.assign(rnd, out)
        assert out[0].tolist() == ids.tolist() == sample_clients(0, rnd, 6, 3).tolist()
        assert set(out[1].tolist()) <= {1, 2}
        assert out[3].tolist() == [last_rank.get(k, -1) for k in ids.tolist()]  # its residual: where it trained last
        last_rank.update(zip(ids.tolist(), out[1].tolist()))
        rows.append(out.copy())
    drawn = np.zeros(6, dtype=np.int64)
    for row in rows:
        drawn[row[0]] += np.array([8, 8, 16, 8, 32, 8])[row[0]] * 2
    assert a.cursors.tolist() == drawn.tolist()  # each client's cursor moved by what it drew, E steps
    b = pool()
    for rnd in range(3):
        b.assign(rnd, out)
    restored = pool()
    held = np.flatnonzero(b.holders >= 0)
    restored.restore(b.cursors, held, np.ones((len(held), 4), np.float32))
    assert set(restored.residuals) == set(held.tolist()) and (restored.holders[held] == 0).all()
    for rnd in range(3, 6):
        restored.assign(rnd, out)
        assert np.array_equal(out[:3], rows[rnd][:3])  # ids, ranks and cursors as the uninterrupted pool's
        assert set(out[3].tolist()) <= {-1, 0, 1, 2}  # residuals: on the server until their clients train


def test_placement_of_pooled_clients_has_workers_not_fixed_ranks():
    fixed = Placement.of_job(3, 4, 0)
    assert not fixed.pooled and fixed.rank_of(2) == 3 and fixed.clients_on(1) == [0]
    pooled = Placement.of_job(100, 4, 10)
    assert pooled.pooled and pooled.round_size == 10 and pooled.worker_ranks == [1, 2, 3]
    assert pooled.clients_on(2) == [] and pooled.role(2) == "worker" and pooled.role(0) == "server"
    assert pooled.names([0, 2]) == "ranks 0, 2 (server and workers)"
    with pytest.raises(ValueError, match="no fixed rank"):
        pooled.rank_of(5)
    every_round = Placement.of_job(6, 3, 6)  # K = N: all clients each round, still several a rank
    assert every_round.pooled and every_round.round_size == 6


def test_job_fields_for_many_clients():
    job = load_job(overrides=["clients.count=100", "clients.per_round=10"])
    assert len(resolve_clients(job, 4)) == 100
    with pytest.raises(JobError, match=r"clients.per_round = 11 samples more clients than the job's 10"):
        resolve_clients(load_job(overrides=["clients.count=10", "clients.per_round=11"]), 4)
    with pytest.raises(JobError, match=r"clients.groups: 12 clients in groups but clients.count = 10"):
        load_job(overrides=["clients.count=10", 'clients.groups=[{count = 12}]'])
    with pytest.raises(JobError, match=r"clients.groups assign 12 clients but the job has 3.*one per client rank"):
        resolve_clients(load_job(overrides=['clients.groups=[{count = 12}]']), 4)
    with pytest.raises(JobError, match="must be one of"):
        load_job(overrides=['clients.placement="random"'])


def test_what_pooled_clients_do_not_run_yet_is_refused_with_the_fix():
    for codec in ("none", "fp16", "qsgd", "sign", "randomk"):
        assert pooled_limits(load_job(overrides=[f'compress.codec="{codec}"'])) == [], codec
    assert pooled_limits(load_job(overrides=['compress.codec="topk"', "compress.options={error_feedback = false}"])) \
        == []
    assert pooled_limits(load_job(overrides=['compress.codec="powersgd"', "compress.options={error_feedback = false}",
                                             "scaling.method=teacher", "scaling.per_layer=false",
                                             "scaling.small_batch=8", "debug.corrupt_rank=1", "debug.corrupt=\"nan\"",
                                             "debug.slow_rank=1"])) == []
    for codec in ("topk", "efsign"):  # error feedback with a gathered codec: the residual is the client's
        assert pooled_limits(load_job(overrides=[f'compress.codec="{codec}"'])) == [], codec
    assert pooled_limits(load_job(overrides=['plan.mode="predict"'])) == []  # the round model from the placement
    assert pooled_limits(load_job(overrides=["scaling.grow_batch=true"])) == []  # every client's batch grows
    job = load_job(overrides=['compress.codec="powersgd"', 'plan.mode="balance"'])
    problems = pooled_limits(job)
    assert len(problems) == 2
    assert "error feedback with compress.codec = 'powersgd', which is summed" in problems[0]
    assert "error_feedback = false" in problems[0] and "topk, qsgd, efsign" in problems[0]
    assert "plan.mode = 'balance'" in problems[1] and 'plan.mode = "predict"' in problems[1]
    randomk = ['compress.codec="randomk"', "compress.options={error_feedback = true, unbiased = false}"]
    assert "compress.codec = 'randomk'" in pooled_limits(load_job(overrides=randomk))[0]
    with pytest.raises(JobError, match=r"with 100 clients on 3 client ranks.*compress.codec = 'powersgd'"):
        resolve_clients(load_job(overrides=["clients.count=100", 'compress.codec="powersgd"']), 4)
    assert len(resolve_clients(load_job(overrides=['compress.codec="powersgd"']), 4)) == 3  # one a rank: all codecs


def test_residuals_that_would_not_fit_are_refused_with_the_numbers():
    from mpifed.worker import residual_problem

    resnet50 = 23_520_842  # parameters of torchvision's resnet50 with a 10-class head
    problem = residual_problem(10_000, resnet50, 64 * 2**30, "topk")
    assert "keeps a residual of 23,520,842 float32 per client: 10,000 clients x 89.72 MiB = 876.22 GiB" in problem
    assert "64.00 GiB available" in problem and "lower clients.count to at most 365" in problem
    assert "error_feedback = false" in problem
    assert residual_problem(1_000, 19_466, 64 * 2**30, "topk") == ""  # 78 MB: fits
