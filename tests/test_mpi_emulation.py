"""Emulated profiles that cannot work are refused, a stop signal does not wait out an emulated sleep, and
rank 0's roll call tells a rank in an emulated wait from a stuck one."""

import signal
import subprocess
import sys
import time

import pytest

from conftest import MPIRUN, TINY, mpi_run, rounds_logged
from mpifed.config import load_job
from mpifed.profiles import link_problems, sleep

pytestmark = pytest.mark.mpi

SLOW = ["--set", 'clients.groups=[{count = 1, profile = "slow"}]']


def test_a_link_slower_than_the_timeout_allows_is_refused_before_anything_runs(tmp_path):
    proc = mpi_run(3, ["train", *TINY, "--out", str(tmp_path), "--name", "link", *SLOW,
                       "--set", "profiles.slow.bandwidth=1"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mpifed: error:")]
    assert len(errors) == 1 and "profiles.slow: its emulated link takes" in errors[0]
    assert "more than comm.timeout = 1800 s" in errors[0] and "raise profiles.slow.bandwidth" in errors[0]
    assert not (tmp_path / "link").exists()


def test_link_problems_count_latency_both_ways_and_the_model_once():
    job = load_job(overrides=['profiles.slow = {latency = "400s", bandwidth = 1000}', "comm.timeout=1000",
                              'clients.groups=[{count = 1, profile = "slow"}]'])
    assert link_problems(job, 100_000) == []               # 400 + 100 + 400 s: within 1000 s
    assert "900 s" not in link_problems(job, 300_000)[0]   # 400 + 300 + 400 = 1100 s
    assert "1,100 s a round" in link_problems(job, 300_000)[0]
    unused = load_job(overrides=['profiles.slow = {bandwidth = 1}'])  # defined, but no client uses it
    assert link_problems(unused, 100_000) == []
    endless = load_job(overrides=['profiles.slow = {bandwidth = 1}', "comm.timeout=0", *SLOW[1:]])
    assert link_problems(endless, 100_000) == []           # comm.timeout = 0: the user waits for ever


def test_an_emulated_sleep_ends_at_a_stop_request():
    class Stop:
        def __init__(self, after):
            self.at = time.monotonic() + after

        def __bool__(self):
            return time.monotonic() >= self.at

    start = time.monotonic()
    slept = sleep(60.0, Stop(0.2))
    assert 0.2 <= slept < 5.0 and time.monotonic() - start < 5.0
    assert sleep(0.1, Stop(10.0)) == 0.1 and sleep(-1.0) == 0.0


def test_sigterm_during_an_emulated_link_checkpoints_after_that_round(tmp_path):
    """A client whose link takes 10 minutes each way: SIGTERM in round 1 ends its sleep, the round
    completes, every rank checkpoints and the job exits with STOPPED, instead of dying of comm.timeout."""
    args = ["train", *TINY, "--out", str(tmp_path), "--name", "slow", *SLOW, "--set", 'profiles.slow.latency="600s"',
            "--set", 'plan.mode="off"']
    proc = subprocess.Popen([MPIRUN, "-n", "3", sys.executable, "-m", "mpifed", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and not (tmp_path / "slow" / "job.toml").exists():
        time.sleep(0.2)  # job.toml: set-up is done, the rounds begin
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(2.0)  # into the slow client's emulated download
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)  # waiting the sleep out would take 10 minutes
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 3, err[-3000:]
    assert "stopped by a signal after round 1" in out + err
    assert rounds_logged(tmp_path / "slow" / "run.h5") == 1
    assert (tmp_path / "slow" / "checkpoints" / "round-00000001.pt").exists()


def test_the_roll_call_says_a_rank_is_in_an_emulated_wait(tmp_path):
    """A 1000x slower client makes a round outlast comm.timeout: rank 0 names it as emulating, not stuck."""
    proc = mpi_run(3, ["train", *TINY, "--out", str(tmp_path), "--name", "roll", *SLOW,
                       "--set", "profiles.slow.speed=0.001", "--set", "comm.timeout=3", "--set", 'plan.mode="off"'],
                   tmp_path)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if "Roll call:" in line]
    assert len(said) == 1, proc.stderr[-3000:]
    assert "rank 1 (client 0) is in an emulated wait (its profile's slower compute or link)" in said[0]
    assert "rank 2 (client 1) waits in the same collective" in said[0]
    assert "busy outside MPI" not in said[0] and "no rank is missing" not in said[0]
