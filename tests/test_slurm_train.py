"""`mpifed train` through a rendered sbatch script on the real one-node SLURM of .ci/slurm-up:
the job's run.h5, and SLURM's time-limit signal turning into a checkpoint that resumes."""

import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import TINY, rounds_logged
from mpifed.slurm import SlurmOptions, render, submit
from slurm_helpers import require_slurm, run_batch

pytestmark = pytest.mark.slurm


def _script(tmp_path, name, *extra):
    job = tmp_path / "job.toml"
    job.write_text('[model]\nname = "cnn"\n')
    opts = SlurmOptions(job=str(job), gpus_per_node=0, ntasks=3, overcommit=True, log_dir=str(tmp_path),
                        venv=sys.prefix, time="00:10:00",
                        mpifed_args=(*TINY, "--out", str(tmp_path), "--name", name, *extra))
    return render(opts.template, **opts.fields())


def test_sbatch_of_a_rendered_script_trains_and_writes_the_run_log(tmp_path):
    require_slurm()
    job_id, code, logs = run_batch(_script(tmp_path, "viaslurm"), tmp_path, timeout=420)
    assert code == 0, logs[-4000:]
    assert f"mpifed: job {job_id} on" in logs and "mpifed: done" in logs
    with h5py.File(tmp_path / "viaslurm" / "run.h5") as f:
        assert f.attrs["world_size"] == 3
        assert f["iter/t_iter"].shape == (6, 3)
        # the ranks ran the script's command line, with the job file and the arguments after --
        argv = f.attrs["command"].split()
        assert Path(argv[0]).name == "mpifed", argv
        assert argv[1:] == ["train", "--job", str(tmp_path / "job.toml"), *TINY, "--out", str(tmp_path),
                            "--name", "viaslurm"], argv


def test_the_time_limit_signal_checkpoints_requeues_and_the_job_resumes_itself(tmp_path):
    """SLURM's warning signal -> the ranks checkpoint and exit -> the script requeues the job -> the
    restarted script (same job id) resumes from the checkpoint and finishes, one gap-free log."""
    require_slurm()
    job = tmp_path / "job.toml"
    job.write_text('[run]\nname = "pre"\n')
    opts = SlurmOptions(job=str(job), gpus_per_node=0, ntasks=3, overcommit=True, log_dir=str(tmp_path),
                        venv=sys.prefix, time="00:10:00", requeue=True,
                        mpifed_args=(*TINY, "--out", str(tmp_path), "--set", "train.rounds=40",
                                     "--set", "profiles.s.speed=0.25",
                                     "--set", 'clients.groups=[{count = 1, profile = "s"}]'))
    script = tmp_path / "job.sbatch"
    script.write_text(render(opts.template, **opts.fields()))
    job_id, _ = submit(str(script), sbatch_args=(f"--chdir={tmp_path}",))
    log = tmp_path / f"pre-{job_id}" / "run.h5"
    deadline = time.monotonic() + 480
    try:
        while time.monotonic() < deadline and rounds_logged(log) < 3:
            time.sleep(0.5)
        # what SLURM does --signal seconds before the time limit: USR1 to the batch shell
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        released = -60.0
        while time.monotonic() < deadline and (rounds_logged(log) < 40 or _queued(job_id)):
            # SLURM holds a requeued job 2 min: let it go at once (what the job does is under test, not
            # SLURM's back-off), again every few seconds should an update land before the hold does
            if _state(job_id) == "PENDING BeginTime" and time.monotonic() - released > 5:
                released = time.monotonic()
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*"))
    assert "stopped by a signal after round" in logs and "requeueing job" in logs, logs[-4000:]
    assert "mpifed: done" in logs, logs[-4000:]
    with h5py.File(log) as f:
        assert f["iter/t_iter"].shape == (40, 3)
        assert "resumed at round" in f.attrs["resumes"][0]


def _state(job_id: str) -> str:
    """squeue's 'STATE REASON' of a job ('' once it left the queue)."""
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True).stdout.strip()


def _queued(job_id: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip())
