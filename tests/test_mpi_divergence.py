"""A diverged run ends: after train.max_skipped rounds in a row whose step the server skipped, every rank
exits with DIVERGED and one message saying since when and what to try; the skips are logged per round
and `mpifed analyze` flags them."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import train
from mpifed.cluster import DIVERGED
from mpifed.skipped import SkippedSteps

# lr 1e6: the training loss is ~1e20 after the first step and NaN after the second
DIVERGING = ("--set", "optim.lr=1e6", "--set", "train.rounds=20", "--set", "train.eval_every=5")


def _diverged(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == DIVERGED, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stderr.splitlines() if "the run diverged" in line]
    assert len(lines) == 1, proc.stderr  # from rank 0 alone
    assert "Try a lower optim.lr (now 1e+06)" in lines[0]
    return lines[0]


@pytest.mark.mpi
def test_a_diverging_run_stops_within_max_skipped_rounds_with_a_checkpoint(tmp_path):
    proc = train(3, tmp_path, "lr", *DIVERGING, "--set", "train.max_skipped=3", "--set", "checkpoint.every=50")
    line = _diverged(proc)
    run = tmp_path / "lr"
    with h5py.File(run / "run.h5") as f:
        skipped, loss = f["server/skipped"][:], f["server/train_loss"][:]
    first = int(np.flatnonzero(skipped)[0])
    assert skipped[first:].tolist() == [1, 1, 1] and not skipped[:first].any()  # stopped at the third
    assert first <= int(np.flatnonzero(~np.isfinite(loss))[0]) + 1  # within a round of the first NaN
    assert len(skipped) < 20
    assert f"rounds {first + 1}-{first + 3} " in line
    written = sorted((run / "checkpoints").glob("round-*.pt"))  # checkpoints are on: one at the stop
    assert [p.name for p in written] == [f"round-{len(skipped):08d}.pt"] and str(written[0]) in line
    shown = subprocess.run([sys.executable, "-m", "mpifed", "analyze", str(run), "--json", "--no-plots"],
                           capture_output=True, text=True, timeout=120)
    assert json.loads(shown.stdout)["skipped"] == {"rounds": 3, "first": first + 1, "diverged": True}
    table = subprocess.run([sys.executable, "-m", "mpifed", "analyze", str(run), "--no-plots"],
                           capture_output=True, text=True, timeout=120).stdout
    assert "the run diverged and stopped" in table


@pytest.mark.mpi
def test_pooled_clients_stop_alike_and_without_checkpoints_none_is_written(tmp_path):
    proc = train(3, tmp_path, "pooled", *DIVERGING, "--set", "clients.count=6", "--set", "clients.per_round=4")
    line = _diverged(proc)
    assert "max_skipped = 5" in line and "no checkpoint (checkpoint.every = 0)" in line
    assert not (tmp_path / "pooled" / "checkpoints").exists()
    with h5py.File(tmp_path / "pooled" / "run.h5") as f:
        assert f["server/skipped"][-5:].tolist() == [1] * 5


def test_a_good_round_ends_a_streak_and_zero_never_stops():
    skips = SkippedSteps(3)
    for done, stepped, loss in [(1, True, 2.0), (2, False, 9.0), (3, False, np.nan), (4, True, np.nan),
                                (5, False, np.nan), (6, False, np.nan)]:
        skips.observe(done, stepped, loss)
    assert not skips.diverged and skips.streak == 2 and skips.first == 5
    skips.observe(7, False, np.nan)
    assert skips.diverged
    assert "rounds 5-7 (run.h5 rows 4-6" in skips.explain(0.1)
    assert "the last finite training loss was 9 at round 2" in skips.explain(0.1)
    never = SkippedSteps(0)
    for done in range(1, 100):
        never.observe(done, False, np.nan)
    assert not never.diverged and "no finite training loss" in never.explain(0.1)
