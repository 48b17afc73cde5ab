"""Exchange.wait's comm.timeout counts only time this rank spent waiting: a whole job suspended
(scontrol suspend, Ctrl-Z) and resumed later must not abort on its first poll."""

import os
import subprocess
import sys

import pytest

from conftest import MPIRUN
from mpifed import exchange
from mpifed.exchange import Exchange, RankTimeout


class _Clock:
    """time.monotonic() from a list of readings; sleep() does nothing."""

    def __init__(self, readings):
        self.readings = iter(readings)

    def monotonic(self):
        return next(self.readings)

    def sleep(self, seconds):
        pass


class _Requests:
    """MPI.Request.Testall that completes on poll number `done`."""

    def __init__(self, done):
        self.polls, self.done = 0, done

    def Testall(self, requests):
        self.polls += 1
        return self.polls >= self.done


def _wait(monkeypatch, readings, done, polite=True, timeout=3.0):
    requests = _Requests(done)
    monkeypatch.setattr(exchange, "time", _Clock(readings))
    monkeypatch.setattr(exchange, "MPI", type("MPI", (), {"Request": requests}))
    Exchange(comm=None, polite=polite, timeout=timeout).wait([])
    return requests.polls


@pytest.mark.parametrize("polite", [True, False])
def test_a_suspended_job_resumes_instead_of_timing_out(monkeypatch, polite):
    # 1 s of waiting, then the process is stopped for 100 s (> timeout), then 1 s more: 2 s waited
    assert _wait(monkeypatch, [0.0, 0.5, 1.0, 101.0, 101.5, 102.0], done=6, polite=polite) == 6


@pytest.mark.parametrize("polite", [True, False])
def test_a_rank_that_never_joins_times_out(monkeypatch, polite):
    with pytest.raises(RankTimeout, match="waited 3 s \\(comm.timeout\\) in a collective that another rank never"):
        _wait(monkeypatch, [0.5 * k for k in range(100)], done=1000, polite=polite)


# Under mpirun -n 3: rank 2 is stuck (asleep) for 6 s; ranks 0 and 1 arrive at a start-up point and
# wait politely with a 2 s timeout. Each prints its outcome and the CPU seconds its wait used.
_STUCK_RANK = """
import time
from mpi4py import MPI
from mpifed.exchange import Exchange, RankTimeout
comm = MPI.COMM_WORLD
if comm.rank == 2:
    time.sleep(6)
else:
    wall, cpu = time.monotonic(), time.process_time()
    try:
        Exchange(comm, polite=True, timeout=2.0).arrive()
        outcome = "arrived"
    except RankTimeout:
        outcome = "timeout"
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    print(f"rank {comm.rank} {outcome} after {wall:.2f} s, cpu {cpu:.2f} s", flush=True)
"""


@pytest.mark.mpi
def test_start_up_waits_are_polite_and_bounded_by_the_timeout(tmp_path):
    if MPIRUN is None:
        pytest.skip("mpirun not found; install the MPICH wheel: pip install -e '.[mpich]'")
    proc = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-c", _STUCK_RANK], cwd=tmp_path, timeout=120,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = sorted(line.split() for line in proc.stdout.splitlines() if line.startswith("rank "))
    expected = [["rank", "0", "timeout"], ["rank", "1", "timeout"]]
    assert [line[:3] for line in lines] == expected, proc.stdout + proc.stderr
    for line in lines:
        wall, cpu = float(line[4]), float(line[7])
        assert 2.0 <= wall < 4.0
        assert cpu < 0.5 * wall  # a busy-polling wait would use about one CPU second per second
