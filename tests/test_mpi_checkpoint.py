"""Checkpoint and resume under real MPI: a signal mid-run, then --resume, ends exactly where an
uninterrupted run ends; bad checkpoints are set aside or refused, never silently used."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import MPIRUN, TINY, mpi_run, ok, rounds_logged, train

pytestmark = pytest.mark.mpi

# Error feedback (client residuals), momentum (optimizer state) and a slow emulated client, so the
# signal lands mid-run and every kind of state must survive the restart.
JOB = ["--set", 'compress.codec="topk"', "--set", "compress.options={density = 0.05, error_feedback = true}",
       "--set", "profiles.slow.speed=0.25", "--set", 'clients.groups=[{count = 1, profile = "slow"}]',
       "--set", "train.rounds=14", "--set", "train.eval_every=7"]


def _state(path):
    return torch.load(path, weights_only=True)


def _signal_mid_run(tmp_path, sig, after_rounds):
    """Start run "cut" under mpirun, send `sig` to mpirun once it has logged `after_rounds` rounds."""
    cmd = [MPIRUN, "-n", "3", sys.executable, "-m", "mpifed", "train", *TINY, "--out", str(tmp_path),
           "--name", "cut", *JOB]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while rounds_logged(tmp_path / "cut" / "run.h5") < after_rounds and time.monotonic() < deadline \
            and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc, out, err


def test_signal_then_resume_equals_an_uninterrupted_run(tmp_path):
    ok(train(3, tmp_path, "full", *JOB))

    proc, out, err = _signal_mid_run(tmp_path, signal.SIGTERM, 3)  # mpirun forwards it, as SLURM's trap does
    log = tmp_path / "cut" / "run.h5"
    assert proc.returncode == 3, err[-3000:]
    assert "stopped by a signal after round" in out
    assert f"continue with: mpirun -n 3 mpifed train --resume {tmp_path / 'cut'}\n" in out  # as a full disk says it
    stopped = rounds_logged(log)
    assert 3 <= stopped < 14
    assert (tmp_path / "cut" / "checkpoints" / f"round-{stopped:08d}.pt").exists()

    ok(mpi_run(3, ["train", "--resume", str(tmp_path / "cut"), "--progress", "log"], tmp_path))
    full, cut = _state(tmp_path / "full" / "model.pt"), _state(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    with h5py.File(log) as f, h5py.File(tmp_path / "full" / "run.h5") as g:
        assert f["iter/t_iter"].shape == (14, 3)
        assert f["eval/round"][:].tolist() == [0, 7, 14]
        assert np.array_equal(f["iter/loss"][:], g["iter/loss"][:])  # the same rounds, once each
        assert np.array_equal(f["iter/batch"][:], g["iter/batch"][:])
        assert f["server/wall"][stopped] >= f["server/wall"][stopped - 1]
        assert f"resumed at round {stopped}" in f.attrs["resumes"][0]


def test_ctrl_c_checkpoints_and_stops_like_a_time_limit(tmp_path):
    """One Ctrl-C (mpirun forwards SIGINT to every rank) is a request to stop, not a crash: before,
    every rank died with a KeyboardInterrupt traceback and no checkpoint, so the run was lost."""
    proc, out, err = _signal_mid_run(tmp_path, signal.SIGINT, 2)
    log = tmp_path / "cut" / "run.h5"
    assert proc.returncode == 3, err[-3000:]
    assert "KeyboardInterrupt" not in err
    stopped = rounds_logged(log)
    assert f"stopped by a signal after round {stopped}" in out
    assert (tmp_path / "cut" / "checkpoints" / f"round-{stopped:08d}.pt").exists()


def _ranks_of(marker: str) -> list[int]:
    """Pids of the mpifed ranks whose command line holds `marker` (the launcher excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and b"mpifed" in cmd and marker.encode() in b" ".join(cmd) and b"-n" not in cmd:
            pids.append(int(entry.name))
    return pids


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM: mpifed's stop handler is installed (Python and
    MPICH leave SIGTERM at its default; they catch SIGINT and SIGUSR1 themselves)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def _rank_of(pid: int) -> int:
    """The MPI rank of a launched process (MPICH's PMI_RANK in its environment)."""
    env = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    return int(env[b"PMI_RANK"])


@pytest.mark.parametrize("who", ["every rank", "one client"])
def test_a_signal_while_the_data_is_prepared_ends_the_job_at_once(tmp_path, who):
    """Before the ranks first agree on a stop, start-up (here: generating 2 M samples, minutes) holds
    nothing to keep: SIGTERM ends every rank at once with STOPPED, whether mpirun forwarded it to every
    rank or one client alone got it, and names who got it; nothing is left in the run directory."""
    args = ["train", *TINY, "--out", str(tmp_path), "--name", "data", "--set", "data.train_size=2000000"]
    proc = subprocess.Popen([MPIRUN, "-n", "3", sys.executable, "-m", "mpifed", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, ranks = time.monotonic() + 180, []
    while time.monotonic() < deadline and proc.poll() is None:
        ranks = _ranks_of(str(tmp_path))
        if len(ranks) == 3 and all(map(_catches_sigterm, ranks)):
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the job ended before its start-up could be interrupted (ranks {ranks})"
    time.sleep(2.0)  # well into the data
    if who == "every rank":
        proc.send_signal(signal.SIGTERM)
    else:
        os.kill(next(pid for pid in ranks if _rank_of(pid) == 2), signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)  # before, start-up went on until the data was made
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 3, err[-3000:]
    lines = [line for line in err.splitlines() if "stopped by SIGTERM during start-up, before any round" in line]
    assert len(lines) == 1, err
    assert lines[0].endswith("(rank 2 alone got it)") == (who == "one client"), err
    assert "Traceback" not in err
    assert rounds_logged(tmp_path / "data" / "run.h5") == 0


@pytest.mark.parametrize("command", ["train", "profile"])
def test_ctrl_c_during_start_up_stops_every_rank_before_round_1(tmp_path, command):
    """Ctrl-C while the clients size themselves and time probe rounds (a planner start-up with a
    20x-slow client takes minutes) stops the job there, at once, not after round 1; `mpifed profile`,
    which is all probe rounds, stops the same way and writes no profile."""
    slow = ["--set", "plan.repeats=9", "--set", "profiles.slow.speed=0.05",
            "--set", 'clients.groups=[{count = 1, profile = "slow"}]']
    if command == "train":
        args = ["train", *TINY, "--out", str(tmp_path), "--name", "early", "--set", 'plan.mode="maximize"', *slow]
    else:
        (tmp_path / "job.toml").write_text("[data]\ntrain_size = 600\n")
        args = ["profile", "--job", str(tmp_path / "job.toml"), "--out", str(tmp_path / "p.json"),
                "--max-batch", "64", *slow]  # the stop comes between probe rounds: keep each one short
    cmd = [MPIRUN, "-n", "3", sys.executable, "-m", "mpifed", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180  # the probes begin after the ranks first agree on stopping
    while time.monotonic() < deadline and proc.poll() is None and not any("timing probe rounds" in x for x in lines):
        time.sleep(0.1)
    assert proc.poll() is None, f"the job ended before its probe rounds could be interrupted: {''.join(lines)}"
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)  # before, start-up went on for minutes
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 3, err[-3000:]
    assert "stopped by SIGINT during start-up, before any round" in err and "KeyboardInterrupt" not in err
    assert "MPI_Abort" not in err  # every rank stopped at the same step and returned: nothing was aborted
    if command == "train":
        assert rounds_logged(tmp_path / "early" / "run.h5") == 0
        assert sorted(p.name for p in (tmp_path / "early").iterdir()) == ["run.lock"]  # a new start may reuse it
    else:
        assert not (tmp_path / "p.json").exists()


def test_a_corrupt_checkpoint_is_set_aside_and_a_mismatched_one_refused(tmp_path):
    ok(train(3, tmp_path, "ck", "--set", "checkpoint.every=3", "--set", "train.rounds=10",
             "--set", 'optim.schedule="constant"'))  # a cosine run may not change its rounds (below)
    folder = tmp_path / "ck" / "checkpoints"
    # every 3 rounds and after the last, the newest 2 kept: a finished run can be extended
    assert sorted(p.name for p in folder.iterdir()) == ["round-00000009.pt", "round-00000010.pt"]
    job_before = (tmp_path / "ck" / "job.toml").read_text()

    mismatch = mpi_run(3, ["train", "--resume", str(tmp_path / "ck"), "--set", 'compress.codec="fp16"',
                           "--set", "train.rounds=12"], tmp_path, timeout=120)
    assert mismatch.returncode == 2
    assert "--set changes compress.codec" in mismatch.stderr and "start a new run" in mismatch.stderr
    changed = mpi_run(3, ["train", "--resume", str(tmp_path / "ck"), "--set", "train.batch=8",
                          "--set", 'data.partition="dirichlet"', "--set", "train.rounds=12"], tmp_path, timeout=120)
    assert changed.returncode == 2 and "--set changes data.partition, train.batch" in changed.stderr
    done = mpi_run(3, ["train", "--resume", str(tmp_path / "ck")], tmp_path, timeout=120)
    assert done.returncode == 2 and "nothing left; raise it" in done.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["round-00000009.pt", "round-00000010.pt"]
    assert (tmp_path / "ck" / "job.toml").read_text() == job_before  # refused resumes change nothing

    (folder / "round-00000010.pt").write_bytes(b"not a checkpoint at all")
    proc = ok(mpi_run(3, ["train", "--resume", str(tmp_path / "ck"), "--set", "train.rounds=12",
                          "--progress", "log"], tmp_path))
    assert "round-00000010.pt is unreadable" in proc.stderr and "moved to round-00000010.pt.corrupt" in proc.stderr
    assert (folder / "round-00000010.pt.corrupt").read_bytes() == b"not a checkpoint at all"
    with h5py.File(tmp_path / "ck" / "run.h5") as f:
        assert f["iter/t_iter"].shape == (12, 3)  # round 9 logged before was replaced, not duplicated
        assert "resumed at round 9" in f.attrs["resumes"][0]
    assert "rounds = 12" in (tmp_path / "ck" / "job.toml").read_text()


def test_a_checkpoint_renamed_to_an_older_round_is_refused_for_what_it_is(tmp_path):
    """A checkpoint of the same job from a longer run, named as this run's newest: it was refused with
    "the log lost rounds", which sent the user to restore a log that was fine."""
    constant = ["--set", 'optim.schedule="constant"', "--set", "checkpoint.every=2"]
    ok(train(3, tmp_path, "short", *constant, "--set", "train.rounds=4"))
    ok(train(3, tmp_path, "long", *constant))
    folder = tmp_path / "short" / "checkpoints"
    (tmp_path / "long" / "checkpoints" / "round-00000006.pt").replace(folder / "round-00000004.pt")
    log_before = (tmp_path / "short" / "run.h5").read_bytes()

    def resume():
        return mpi_run(3, ["train", "--resume", str(tmp_path / "short"), "--set", "train.rounds=8", "--progress",
                           "log"], tmp_path, timeout=120)

    renamed = resume()
    assert renamed.returncode == 2 and "Traceback" not in renamed.stderr, renamed.stderr[-3000:]
    assert (f"{folder / 'round-00000004.pt'} holds round 6, not round 4 as its name says: it was renamed, or copied "
            f"from another run of this job. Move it out of {folder}") in renamed.stderr, renamed.stderr[-3000:]
    assert "give it its own name, round-00000006.pt (nothing was changed)" in renamed.stderr
    assert "the log lost rounds" not in renamed.stderr

    (folder / "round-00000004.pt").replace(folder / "round-00000006.pt")  # its own name: now the log disagrees
    foreign = resume()
    assert foreign.returncode == 2 and "holds 4 rounds but round-00000006.pt resumes at round 6: either the log " \
                                       "lost rounds" in foreign.stderr, foreign.stderr[-3000:]
    assert "or the checkpoint comes from another run of this job" in foreign.stderr
    assert (tmp_path / "short" / "run.h5").read_bytes() == log_before

    assert not (tmp_path / "short" / "run.lock").exists()  # a refused resume leaves the directory as it was

    (folder / "round-00000006.pt").replace(tmp_path / "aside.pt")  # as both messages say: the one before
    resumed = ok(resume())
    assert resumed.stdout.splitlines()[0] == (f"mpifed: resuming {tmp_path / 'short'} after round 2 (checkpoint "
                                              f"round-00000002.pt), appending to its run.h5"), resumed.stdout
    with h5py.File(tmp_path / "short" / "run.h5") as f:
        assert f["iter/t_iter"].shape == (8, 3) and "resumed at round 2" in f.attrs["resumes"][0]
    assert not (tmp_path / "short" / "run.lock").exists()  # a clean finish lets go of the run directory


def test_a_run_that_died_resumes_from_its_log_and_checkpoint(tmp_path):
    """A client's failure aborts every rank: rank 0 dies with run.h5 open, which HDF5 then refuses to
    append to; the resume copies the logged rounds into a fresh file and goes on."""
    crashed = train(3, tmp_path, "died", "--set", "train.rounds=8", "--set", "checkpoint.every=2",
                    "--set", "debug.fail_rank=1", "--set", "debug.fail_round=5", timeout=120)
    assert crashed.returncode != 0 and "failing on purpose at debug.fail_round = 5" in crashed.stderr
    with h5py.File(tmp_path / "died" / "run.h5", "r", libver="latest", swmr=True) as f:
        logged = f["iter/loss"][:4]
    longer = mpi_run(3, ["train", "--resume", str(tmp_path / "died"), "--set", "debug.fail_rank=-1",
                         "--set", "train.rounds=10"], tmp_path, timeout=120)
    assert longer.returncode == 2 and "anneals the learning rate over train.rounds = 8" in longer.stderr
    # a job.toml edited by hand in a field that shapes the rounds is refused: run.h5 records the job
    stored = tmp_path / "died" / "job.toml"
    original = stored.read_text()
    stored.write_text(original.replace("\nlr = 0.05\n", "\nlr = 0.5\n"))
    edited = mpi_run(3, ["train", "--resume", str(tmp_path / "died")], tmp_path, timeout=120)
    assert edited.returncode == 2, edited.stderr[-3000:]
    assert "differs from the job run.h5 records (its root attribute 'job') in optim.lr" in edited.stderr
    stored.write_text(original)
    # a stored job that this mpifed's checks refuse (as if an older one wrote it) is fixed on the resume
    stored.write_text(stored.read_text().replace("profile_max = 0", "profile_max = 1"))
    # the injected failure was an event of that launch: a resume does not repeat it
    proc = ok(mpi_run(3, ["train", "--resume", str(tmp_path / "died"), "--progress", "log",
                          "--set", "plan.profile_max=0"], tmp_path))
    assert "profile_max = 0" in stored.read_text()
    assert "was left open by a job that died" in proc.stderr
    assert "not repeating the stored fault injection (debug.fail_rank = 1)" in proc.stderr
    with h5py.File(tmp_path / "died" / "run.h5") as f:
        assert f["iter/t_iter"].shape == (8, 3) and np.array_equal(f["iter/loss"][:4], logged)
        assert "resumed at round 4" in f.attrs["resumes"][0]


def test_resume_of_something_that_is_not_a_run_says_so(tmp_path):
    proc = mpi_run(3, ["train", "--resume", str(tmp_path)], tmp_path, timeout=120)
    assert proc.returncode == 2 and "not an mpifed run directory" in proc.stderr
