"""The sweep scripts in analysis/: perf_sweep.py reports a partial sweep and continues an interrupted
one; compression_sweep.py runs on fewer ranks than its job's 4 clients. Real `mpirun -n 3` jobs of a
few rounds on a small synthetic set; the refusals launch nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MPIRUN, ok
from mpifed.analysis import load_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "data.train_size=600", "--set", "data.test_size=200"]
A, B = "n3-b16-none-none", "n3-b64-none-none"  # two of perf_sweep's twelve configurations, both 3 ranks


def script(name: str, *args, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "analysis" / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def perf_sweep(out: Path, *args) -> subprocess.CompletedProcess:
    return script("perf_sweep.py", "--out", out, "--rounds", 4, "--skip", 1, *SMALL, *args, cwd=out.parent)


def stopped_at_startup(out: Path, config: str) -> Path:
    """A run folder as a sweep stopped during the run's start-up leaves it: job.toml, no run.h5 yet."""
    folder = out / config
    folder.mkdir(parents=True)
    (folder / "job.toml").write_text(f'[run]\nname = "{config}"\n\n[plan]\nmode = "predict"\n')
    return folder


def needs_mpirun() -> None:
    if MPIRUN is None:
        pytest.skip("mpirun not found; install the MPICH wheel: pip install -e '.[mpich]'")


@pytest.mark.mpi
def test_perf_sweep_reports_what_exists_and_continues_where_it_stopped(tmp_path):
    needs_mpirun()
    out = tmp_path / "sweep"
    ok(perf_sweep(out, "--only", A))
    stopped_at_startup(out, B)

    report = ok(perf_sweep(out, "--report"))
    assert "Traceback" not in report.stderr
    lines = report.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.startswith("n")] == [A]
    assert "of 1 configurations" in report.stdout
    assert "missing 11 of 12 configurations" in report.stdout
    assert f"{B} (no readable run.h5)" in report.stdout and "n5-b32-topk-slow (not run)" in report.stdout
    assert "without --report" in report.stdout

    finished = (out / A / "run.h5").stat().st_mtime_ns
    again = ok(perf_sweep(out, "--only", A, "--only", B))
    assert f"{A}: finished, skipped" in again.stdout
    assert f"{B}: unfinished (no readable run.h5), removed and run again" in again.stdout
    assert (out / A / "run.h5").stat().st_mtime_ns == finished
    assert load_run(out / B).rounds == 4
    assert [line.split()[0] for line in again.stdout.splitlines() if line.startswith("n")] == [A, B]
    assert "missing" not in again.stdout


def test_perf_sweep_refuses_a_folder_that_is_not_its_run(tmp_path):
    out = tmp_path / "sweep"
    (out / A).mkdir(parents=True)
    (out / A / "notes.txt").write_text("mine")
    proc = perf_sweep(out, "--only", A)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{out / A} exists and is not this sweep's run" in proc.stderr
    assert (out / A / "notes.txt").read_text() == "mine"

    report = perf_sweep(out, "--report", "--only", "n3-*")
    assert report.returncode != 0 and "Traceback" not in report.stderr
    assert f"no finished run in {out}: {A} (no readable run.h5), {B} (not run)" in report.stderr

    unknown = perf_sweep(out, "--only", "n9-*")
    assert unknown.returncode != 0 and "--only n9-* matches no configuration" in unknown.stderr


def test_perf_sweep_leaves_a_running_job_alone(tmp_path):
    out = tmp_path / "sweep"
    folder = stopped_at_startup(out, A)
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder / "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = perf_sweep(out, "--only", A)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0 and "in use by a running job" in proc.stderr
    assert (folder / "job.toml").exists()


@pytest.mark.mpi
def test_compression_sweep_runs_on_three_ranks(tmp_path):
    needs_mpirun()
    out = tmp_path / "compression"
    args = ["--out", out, "--ranks", 3, "--rounds", 3, "--batches", 8, "--densities", 0.1, *SMALL]
    proc = ok(script("compression_sweep.py", *args, cwd=tmp_path))
    for name in ("b8-dense-s1", "b8-topk0.1-s1"):
        run = load_run(out / name)
        assert (run.world_size, run.rounds) == (3, 3)
        assert run.job["clients"]["count"] == 2 and run.job["data"]["train_size"] == 600
    assert "| 8 | dense fp32 | 1.0x | 1 |" in proc.stdout
    assert "| 8 | top-k 0.1 + EF |" in proc.stdout

    again = ok(script("compression_sweep.py", *args, cwd=tmp_path))
    assert "skip   b8-dense-s1: 3 rounds logged" in again.stdout and "run    " not in again.stdout
