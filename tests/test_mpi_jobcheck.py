"""A launch's mistakes are found by rank 0 before any rank imports torch, and said once.

The ranks here import a `torch` that fails: a launch whose job is wrong must end with its one message,
the same exit code on every rank, and no trace of that import."""

import os
import subprocess

import pytest

from conftest import mpi_run

pytestmark = pytest.mark.mpi

NO_TORCH = "raise ImportError('torch was imported before the job was checked')\n"


@pytest.fixture
def without_torch(tmp_path, monkeypatch):
    """PYTHONPATH that shadows torch with a package whose import fails, for the ranks mpirun starts."""
    fake = tmp_path / "no-torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(NO_TORCH)
    path = [str(fake), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", ":".join(path))
    return tmp_path


def _said_once(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The launch's one line on stderr (rank 0's), with every rank's exit code `code`."""
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpifed: error: "), proc.stderr[-3000:]
    return lines[0]


def test_a_bad_set_and_a_refused_resume_are_said_once_before_torch(without_torch):
    tmp = without_torch
    typo = _said_once(mpi_run(4, ["train", "--set", "train.rouns=3", "--out", str(tmp)], tmp, timeout=120))
    assert typo.startswith("mpifed: error: --set train.rouns=3: train.rouns: unknown field (did you mean 'rounds'?)")
    assert "the default job" not in typo
    assert not any(tmp.glob("default*"))
    nodata = _said_once(mpi_run(4, ["train", "--set", "data.dataset=cifar10", "--set", f'data.root="{tmp / "none"}"',
                                    "--out", str(tmp)], tmp, timeout=120))
    assert f"cifar10 (train split) not found or corrupt: {tmp / 'none' / 'cifar-10-batches-py'} is not there" in nodata
    assert "--set data.root=DIR" in nodata and not any(tmp.glob("default*"))

    run = tmp / "stored"  # what a finished 4-round run leaves; its schedule anneals over those 4 rounds
    (run / "checkpoints").mkdir(parents=True)
    (run / "job.toml").write_text("[train]\nrounds = 4\n")
    (run / "run.h5").write_bytes(b"")
    (run / "checkpoints" / "round-00000004.pt").write_bytes(b"")
    longer = mpi_run(4, ["train", "--resume", str(run), "--set", "train.rounds=6"], tmp, timeout=120)
    assert longer.stdout.splitlines()[0] == (f"mpifed: resuming {run} after round 4 (checkpoint round-00000004.pt), "
                                             f"appending to its run.h5"), longer.stdout
    assert "anneals the learning rate over train.rounds = 4" in _said_once(longer)
    other = mpi_run(4, ["train", "--resume", str(run), "--set", 'optim.schedule="constant"'], tmp, timeout=120)
    assert "--set changes optim.schedule" in _said_once(other)
    done = mpi_run(4, ["train", "--resume", str(run)], tmp, timeout=120)
    assert "round-00000004.pt is at round 4 and the job has train.rounds = 4: nothing left" in _said_once(done)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "job.toml", "run.h5"]  # the lock let go

