"""The scaling policy inside real MPI training: step scale exactly outside critical phases, and the
batch controller growing the global batch towards the noise scale within the memory caps."""

import h5py
import numpy as np
import pytest

from conftest import ok, train

pytestmark = pytest.mark.mpi


def test_step_scaling_is_applied_exactly_outside_critical_phases(tmp_path):
    ok(train(3, tmp_path, "step", "--set", "train.rounds=24", "--set", 'scaling.method="step"',
             "--set", "scaling.scale=1.5", "--set", "scaling.window=3", "--set", "scaling.warmup=6"))
    with h5py.File(tmp_path / "step" / "run.h5") as f:
        critical, scale = f["server/critical"][:], f["server/scale"][:]
        assert (critical[:6] == 1).all()                      # warmup rounds are critical
        assert np.array_equal(scale, np.where(critical == 1, 1.0, 1.5))
        assert (critical == 0).any()
        assert np.isfinite(f["server/noise_scale"][6:]).all()


def test_the_global_batch_grows_with_the_noise_scale_within_memory_and_data(tmp_path):
    ok(train(3, tmp_path, "grow", "--set", "train.rounds=30", "--set", "train.batch=4",
             "--set", "scaling.grow_batch=true", "--set", "scaling.batch_rate=0.5", "--set", "scaling.noise_ema=0.5"))
    with h5py.File(tmp_path / "grow" / "run.h5") as f:
        batches = f["iter/batch"][:, 1:]
        total = f["server/global_batch"][:]
        caps = np.minimum(f["ranks/max_batch"][1:], f["ranks/data_size"][1:])
        assert total[0] == 8 and total[-1] > 8                # it grew
        assert (np.diff(total) >= 0).all()                     # and never shrank
        assert np.array_equal(batches.sum(axis=1), total)      # every client trained its share
        assert (batches <= caps).all() and (batches >= 1).all()
        assert np.array_equal(f["iter/batch"][:, 0], total)
        assert np.isfinite(f["eval/test_loss"][:]).all()
