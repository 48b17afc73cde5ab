"""The pooled round model (mpifed.pool_model) without MPI: a round from its placement, calibrated by the rounds."""

import numpy as np
import pytest

from mpifed.perf import ComputeCurve
from mpifed.pool_model import PoolModel
from mpifed.runlog import CLIENT_FIELDS
from mpifed.sampling import place_clients


def model() -> PoolModel:
    """Two profiles: fast (10 ms + 1 ms a sample) and slow (four times that); six clients, one with a link."""
    curves = [ComputeCurve(0.010, 0.001), ComputeCurve(0.040, 0.004)]
    return PoolModel(["fast", "slow"], curves, [((8, 0.018), (16, 0.026))] * 2, np.array([0, 0, 1, 0, 1, 0]),
                     np.array([16] * 6), np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.050]), t_bcast=0.002, t_up=0.003,
                     t_server=0.005, seconds=1.0)


def clients_table(ids, ranks, t_compute) -> np.ndarray:
    table = np.zeros((len(ids), len(CLIENT_FIELDS)))
    table[:, CLIENT_FIELDS.index("id")] = ids
    table[:, CLIENT_FIELDS.index("rank")] = ranks
    table[:, CLIENT_FIELDS.index("t_compute")] = t_compute
    return table


def test_a_round_is_its_fixed_terms_and_its_busiest_worker():
    m = model()
    assert m.client_seconds() == pytest.approx([0.026, 0.026, 0.104, 0.026, 0.104, 0.076])
    assignment = np.array([[0, 2, 4, 5], [1, 2, 1, 1], [0] * 4, [-1] * 4])
    # rank 1: clients 0, 4, 5 (0.026 + 0.104 + 0.076); rank 2: client 2 (0.104)
    assert m.predict(assignment) == pytest.approx(0.010 + 0.206)
    seconds = m.client_seconds()[[0, 2, 4, 5]]
    balanced = place_clients(seconds, 2) + 1  # the two slow clients apart
    assert balanced[1] != balanced[2]
    assert m.predict(np.array([[0, 2, 4, 5], balanced, [0] * 4, [-1] * 4])) < m.predict(assignment)


def test_the_rounds_calibrate_each_profile_and_the_fixed_terms():
    m = model()
    ids, ranks = np.array([0, 2, 3, 4]), np.array([1, 1, 2, 2])
    for _ in range(40):  # the slow clients run twice as slow as profiled, the fast ones as profiled
        measured = np.array([0.026, 0.208, 0.026, 0.208])
        m.observe(clients_table(ids, ranks, measured), 0.030 + 0.234)  # fixed terms 3x (0.030 s)
    fast, slow, fixed = m.calibration.factors
    assert fast == pytest.approx(1.0) and slow == pytest.approx(2.0, rel=1e-3) and fixed == pytest.approx(3.0, rel=1e-3)
    assert m.predict(np.array([ids, ranks, [0] * 4, [-1] * 4])) == pytest.approx(0.264, rel=1e-3)
    m.observe(clients_table([1], [1], [0.026]), float("nan"))  # a profile not in the round keeps its factor
    assert m.calibration.factors[1] == pytest.approx(slow) and m.calibration.factors[2] == pytest.approx(fixed)
    assert m.client_seconds() == pytest.approx(model().client_seconds())  # placement keeps the start-up times


def test_grown_batches_are_predicted_per_client_at_their_own_batch():
    m = model()
    m.rebatch([16, 32, 16, 16, 48, 16])  # scaling.grow_batch: each client's batch, whatever its profile
    assert m.client_seconds() == pytest.approx([0.026, 0.042, 0.104, 0.026, 0.232, 0.076])
    assert m.steps(np.array([4, 1])) == pytest.approx([0.232, 0.042])
