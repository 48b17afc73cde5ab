"""Clients size their batch with the memory model at start-up, under real MPI."""

import h5py
import pytest

from conftest import mpi_run, ok, train

pytestmark = pytest.mark.mpi

TINY_DEVICE = ["--set", 'profiles.tiny.memory="12MiB"', "--set", 'clients.groups=[{count = 1, profile = "tiny"}]',
               "--set", "train.batch=64"]


def test_a_batch_that_does_not_fit_is_capped_and_logged(tmp_path):
    proc = ok(train(3, tmp_path, "cap", *TINY_DEVICE))
    assert "client 0 (rank 1, profile tiny): batch 64 needs" in proc.stdout and "capped to" in proc.stdout
    with h5py.File(tmp_path / "cap" / "run.h5") as f:
        requested, largest, batch = (f[f"ranks/{k}"][1:].tolist() for k in ("requested_batch", "max_batch", "batch"))
        assert requested == [64, 64]
        assert 1 <= largest[0] < 64 and batch[0] == largest[0]  # the tiny client, capped
        assert largest[1] >= 64 and batch[1] == 64               # the native client, as asked
        assert (f["iter/batch"][:, 1] == largest[0]).all()
        assert f["ranks/batch"][0] == sum(batch)                 # the global batch follows
        static = f["models"].attrs["memory.client0.static_bytes"]
        per_sample = f["models"].attrs["memory.client0.per_sample_bytes"]
        assert static > 0 and per_sample > 0
        assert static + largest[0] * per_sample <= 12 * 2**20


def test_strict_refuses_a_batch_that_does_not_fit(tmp_path):
    proc = train(3, tmp_path, "strict", *TINY_DEVICE, "--set", "memory.strict=true", timeout=120)
    assert proc.returncode != 0
    assert "MemoryBudgetError" in proc.stderr and "client 0 (rank 1, profile tiny)" in proc.stderr
    assert "the largest batch that fits is" in proc.stderr


def test_a_budget_where_not_even_batch_one_fits_names_the_client_and_budget(tmp_path):
    proc = train(3, tmp_path, "none", "--set", 'profiles.tiny.memory="1MiB"',
                 "--set", 'clients.groups=[{count = 1, profile = "tiny"}]', timeout=120)
    assert proc.returncode != 0
    assert "client 0 (rank 1, profile tiny): memory budget 1.00 MiB (1048576 bytes) cannot hold batch 1" in proc.stderr


def test_synthetic_data_larger_than_the_node_is_refused_once_by_rank_0_and_nothing_is_written(tmp_path):
    proc = mpi_run(3, ["train", "--set", "data.train_size=10000000000", "--out", str(tmp_path / "runs"),
                       "--name", "huge"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.startswith("mpifed: error")]
    assert len(lines) == 1 and lines[0].startswith("mpifed: error: data.train_size = 10,000,000,000"), output
    assert "on this node (3 ranks)" in lines[0] and "is available, bound by" in lines[0]
    assert "lower data.train_size to at most" in lines[0]
    assert "Traceback" not in output and "MemoryError" not in output and "rank 1" not in output
    assert not (tmp_path / "runs").exists()
