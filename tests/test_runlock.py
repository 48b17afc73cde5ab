"""One job per run directory: a second launch is refused while a job holds the directory, and a
job that ended (however it ended) leaves nothing that blocks the next one."""

import subprocess
import sys

import pytest

from mpifed import runlock
from mpifed.config import JobError
from mpifed.resume import check_resume

HOLDER = """
import sys, time
from mpifed import runlock
runlock.hold(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def live_job(tmp_path):
    """A process that holds the run directory's lock, as rank 0 of a running job does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_held_run_directory_is_refused_and_free_once_its_job_is_gone(tmp_path, live_job):
    with pytest.raises(JobError, match=rf"in use by a running job \(.* pid {live_job.pid} since"):
        runlock.hold(tmp_path)
    live_job.kill()  # no clean-up runs: the kernel releases the lock of a process that dies
    live_job.wait()
    assert runlock.hold(tmp_path)


def test_resume_of_a_run_whose_job_still_runs_changes_nothing(tmp_path, live_job):
    """Before the lock, the live job's SWMR log looked like one left open by a dead job: the resume
    replaced it, and the live job's later rounds went to a file nobody could see."""
    (tmp_path / "job.toml").write_text("")
    (tmp_path / "run.h5").write_bytes(b"the live job's log")
    with pytest.raises(JobError, match="in use by a running job"):
        check_resume(str(tmp_path), [])
    assert (tmp_path / "run.h5").read_bytes() == b"the live job's log"


def test_a_job_that_ends_of_itself_removes_its_lock_and_a_late_opener_locks_anew(tmp_path):
    """A finished run directory holds the run's files only; a launch that opened run.lock just before
    the ending job removed it must not lock that removed file (a third launch would lock a new one)."""
    assert runlock.hold(tmp_path) and (tmp_path / runlock.LOCK_NAME).exists()
    late = open(tmp_path / runlock.LOCK_NAME, "a+")  # another launch, between its open and its lock
    runlock.release(tmp_path)
    assert not (tmp_path / runlock.LOCK_NAME).exists()
    assert not runlock._still_named(late, tmp_path / runlock.LOCK_NAME)
    late.close()
    assert runlock.hold(tmp_path)  # a fresh file, locked again
    assert runlock._still_named(runlock._held[tmp_path.resolve()], tmp_path / runlock.LOCK_NAME)
    proc = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "in use by a running job" in proc.stderr  # held as before while it lives
    runlock.release_all()
    assert not (tmp_path / runlock.LOCK_NAME).exists() and not runlock._held
