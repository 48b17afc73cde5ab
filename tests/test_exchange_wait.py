"""Exchange.wait's comm.timeout counts only time this rank spent waiting: a whole job suspended
(scontrol suspend, Ctrl-Z) and resumed later must not abort on its first poll."""

import pytest

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
