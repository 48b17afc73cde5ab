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


class _Client:
    """The communicator of a client rank that never gets a roll call from rank 0."""
    rank = 1

    def Iprobe(self, source, tag):
        return False


def _wait(monkeypatch, readings, done, polite=True, timeout=3.0):
    requests = _Requests(done)
    monkeypatch.setattr(exchange, "time", _Clock(readings))
    monkeypatch.setattr(exchange, "MPI", type("MPI", (), {"Request": requests}))
    Exchange(comm=_Client(), polite=polite, timeout=timeout).wait([])
    return requests.polls


@pytest.mark.parametrize("polite", [True, False])
def test_a_suspended_job_resumes_instead_of_timing_out(monkeypatch, polite):
    # 1 s of waiting, then the process is stopped for 100 s (> timeout), then 1 s more: 2 s waited
    assert _wait(monkeypatch, [0.0, 0.5, 1.0, 101.0, 101.5, 102.0], done=6, polite=polite) == 6


def test_without_a_timeout_a_polite_wait_waits_as_long_as_it_takes(monkeypatch):
    # comm.timeout = 0 means "wait for ever": 1000 polls over 500 s, and no RankTimeout
    assert _wait(monkeypatch, [0.5 * k for k in range(1001)], done=1000, timeout=0.0) == 1000


@pytest.mark.parametrize("polite", [True, False])
def test_a_rank_that_never_joins_times_out(monkeypatch, polite):
    # a client leaves the word to rank 0 for timeout + grace more; without a roll call it names rank 0
    with pytest.raises(RankTimeout, match="waited 3 s \\(comm.timeout\\) in collective \\d+ \\(a collective\\), which "
                                          "another rank never joined, and rank 0 did not call the roll within 6 s"):
        _wait(monkeypatch, [0.5 * k for k in range(100)], done=1000, polite=polite)


# Under mpirun -n 3: rank 2 is stuck (asleep) for 20 s; ranks 0 and 1 arrive at a start-up point and
# wait politely with a 4 s timeout. Each prints its outcome and the CPU seconds its wait used. Rank 0
# calls the roll for 4 s (the grace) after its timeout; rank 1 answers and waits for rank 0 to end the
# job for timeout + grace more, and as this script ends nothing, times out itself after 12 s. A 4 s
# timeout puts each rank's wrong neighbour (rank 0 waiting as a client does, rank 1 a timeout less) 4 s
# from the right wait, which leaves room for a loaded machine's late wake-ups.
_STUCK_RANK = """
import time
from mpi4py import MPI
from mpifed.exchange import Exchange, RankTimeout
comm = MPI.COMM_WORLD
if comm.rank == 2:
    time.sleep(20)
else:
    wall, cpu = time.monotonic(), time.process_time()
    try:
        Exchange(comm, polite=True, timeout=4.0).arrive()
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
    for line, least in zip(lines, (8.0, 12.0)):
        wall, cpu = float(line[4]), float(line[7])
        assert least <= wall < least + 3.5, proc.stdout
        assert cpu < 0.5 * wall  # a busy-polling wait would use about one CPU second per second


# Under mpirun -n 4, rounds of broadcast then reduce with comm.timeout 2 s; in round 2 one rank goes
# wrong: "compute" rank 2 sleeps in its computation, "server" rank 0 does, "late" rank 2 sleeps 3 s
# (past the timeout, within rank 0's roll-call grace), "skip" rank 3 skips the reduce (the ranks then
# disagree on their collectives). Each rank prints how its wait ended.
_ROUNDS = """
import sys, time
import numpy as np
from mpi4py import MPI
from mpifed.cluster import ABORT_GRACE_SECONDS
from mpifed.exchange import Exchange, RankTimeout
comm, mode = MPI.COMM_WORLD, sys.argv[1]
exchange, buf, start = Exchange(comm, polite=True, timeout=2.0), np.zeros(4), time.monotonic()
try:
    for step in range(5):
        exchange.broadcast(buf)
        if step == 2 and comm.rank == {"compute": 2, "server": 0, "late": 2}.get(mode):
            time.sleep(3 if mode == "late" else 30)
        if not (step == 2 and comm.rank == 3 and mode == "skip"):
            exchange.reduce_sum(buf)
    print(f"rank {comm.rank} done", flush=True)
except RankTimeout as err:
    print(f"rank {comm.rank} timeout after {time.monotonic() - start:.1f} s: {err}", flush=True)
    time.sleep(ABORT_GRACE_SECONDS)  # as mpifed's own abort does: MPI_Abort drops output still in the launcher's pipes
    comm.Abort(1)
"""

_NAMED = {  # which rank says it first ("a client": any but rank 0), and what it says
    "compute": ("rank 0", "Roll call: rank 2 (client 1) did not answer within 2 s: busy outside MPI (stuck in its "
                "computation or I/O, stopped, or on a lost node); "),  # ranks 1 and 3 answered: not named silent
    "late": ("rank 0", "s later: a rank was late, not stuck"),
    "server": ("a client", "which another rank never joined, and rank 0 did not call the roll within 4 s more: "
               "rank 0 itself is stuck"),
    "skip": ("rank 0", "rank 3 (client 2) waits in collective 6 but in a broadcast, not a reduce: the ranks disagree "
             "on their collectives"),
}


@pytest.mark.mpi
@pytest.mark.parametrize("mode", sorted(_NAMED))
def test_a_timeout_names_the_stuck_rank(tmp_path, mode):
    if MPIRUN is None:
        pytest.skip("mpirun not found; install the MPICH wheel: pip install -e '.[mpich]'")
    proc = subprocess.run([MPIRUN, "-n", "4", sys.executable, "-c", _ROUNDS, mode], cwd=tmp_path, timeout=120,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    timeouts = [line for line in proc.stdout.splitlines() if " timeout after " in line]
    rank, named = _NAMED[mode]
    # the rank that says it first, and alone: rank 0 with a roll call, or a client when rank 0 is the stuck one
    assert timeouts, f"exit status {proc.returncode}; stdout: {proc.stdout!r}; stderr: {proc.stderr!r}"
    assert timeouts[0].startswith("rank 0 ") == (rank == "rank 0"), proc.stdout
    assert named in timeouts[0]
    if rank == "rank 0":
        assert len(timeouts) == 1, proc.stdout  # the clients that answered leave the word to rank 0
