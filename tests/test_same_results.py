"""analysis/same_results.py, the bit-for-bit check of a restructure: it passes runs that differ only in
what is measured (timings, wall clocks, start time) and names every computed value that differs, down to
one ulp, a signed zero, or one tensor of a checkpoint. Run directories written here with h5py and
torch.save in a run's layout (run.h5, model.pt, checkpoints/round-*.pt)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
JOB = '[run]\nname = "x"\nout = "{out}"\n\n[train]\nrounds = 3\n'


def write_run(folder: Path, *, loss=(2.0, 1.5, 1.25), weight=0.5, t_iter=0.1, started="2026-01-01T00:00:00",
              checkpoint_wall=10.0, free=2**30) -> Path:
    """A run directory: run.h5 with computed and measured datasets, model.pt, one checkpoint."""
    (folder / "checkpoints").mkdir(parents=True)
    with h5py.File(folder / "run.h5", "w") as f:
        f.attrs["job"] = JOB.format(out=folder.parent)  # run.out differs between the two runs: not compared
        f.attrs["started"] = started
        f["iter/loss"] = np.array(loss, dtype=np.float32)
        f["iter/t_iter"] = np.full(3, t_iter)
        f["server/wall"] = np.cumsum(np.full(3, t_iter))
        f["ranks/sized_budget"] = np.array([0, free])  # the host's free memory at start-up, and what bound it
        f["ranks/budget_bound"] = np.array(["", f"MemAvailable ({free} B in /proc/meminfo)"], dtype=h5py.string_dtype())
        f.create_group("models").attrs["perf.alpha"] = t_iter
    model = {"w": torch.full((4,), weight)}
    torch.save(model, folder / "model.pt")
    torch.save({"round": 3, "model": model, "wall": checkpoint_wall}, folder / "checkpoints" / "round-00000003.pt")
    return folder


def same_results(a: Path, b: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "analysis" / "same_results.py"), str(a), str(b), *options],
                          capture_output=True, text=True, timeout=120)


def test_runs_that_differ_only_in_measurements_are_identical(tmp_path):
    write_run(tmp_path / "before" / "default")
    write_run(tmp_path / "after" / "default", t_iter=0.3, started="2026-06-01T12:00:00", checkpoint_wall=99.0,
              free=2**31)
    done = same_results(tmp_path / "before", tmp_path / "after")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "default: identical"


def test_one_ulp_of_a_logged_value_is_a_difference(tmp_path):
    nudged = float(np.nextafter(np.float32(1.5), np.float32(2.0)))
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", loss=(2.0, nudged, 1.25))
    done = same_results(a, b)
    assert done.returncode == 1
    assert "run.h5['iter/loss']: 1 of 3 values differ, first at (1,)" in done.stdout


def test_a_signed_zero_in_the_model_is_a_difference(tmp_path):
    a, b = write_run(tmp_path / "a", weight=0.0), write_run(tmp_path / "b", weight=-0.0)
    done = same_results(a, b)
    assert done.returncode == 1
    assert "model.pt['w']: values equal but bytes differ" in done.stdout
    assert "checkpoints/round-00000003.pt['model']['w']" in done.stdout


def test_a_run_missing_from_one_side_is_reported(tmp_path):
    write_run(tmp_path / "before" / "topk")
    write_run(tmp_path / "before" / "default")
    write_run(tmp_path / "after" / "default")
    done = same_results(tmp_path / "before", tmp_path / "after")
    assert done.returncode == 1
    assert "default: identical" in done.stdout and "topk: 1 difference(s)" in done.stdout


def test_what_the_new_code_adds_is_listed_only_when_named(tmp_path):
    """A new job field and attribute: named with --added, present in the second run alone, they are listed
    and the runs identical; unnamed, or missing from the second run, they stay differences."""
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    with h5py.File(b / "run.h5", "a") as f:
        f.attrs["data_plane"] = "mpi-host"
        f.attrs["job"] = f.attrs["job"] + '\n[comm]\ndata = "auto"\n'
    added = ["--added", "attrs['data_plane']", "--added", "attrs['job']['comm']"]
    done = same_results(a, b, *added)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "a: identical; added: attrs['data_plane']; added: attrs['job']['comm']"
    assert "run.h5 attrs['data_plane']: only in second" in same_results(a, b).stdout
    assert same_results(b, a, *added).returncode == 1  # what the first run has alone is no addition
    assert same_results(a, b, "--added", "attrs['data_plane']").returncode == 1  # the job field unnamed
    with h5py.File(b / "run.h5", "a") as f:
        f["server/train_acc"] = np.zeros(3)  # a new dataset
    assert same_results(a, b, *added).returncode == 1
    done = same_results(a, b, *added, "--added", "server/train_acc")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("; added: attrs['job']['comm']; added: server/train_acc")
