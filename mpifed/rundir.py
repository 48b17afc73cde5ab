"""A launch's run directory: rank 0 creates a new one or resumes a stored one, and every rank gets the job.

    job, start = prepare(world, job_file, overrides, resume, auto_resume)   # every rank
    write_job(start.run_dir, job, world.size)                               # rank 0, once set-up succeeded

A new run gets <run.out>/<run.name>[-<timestamp>]/, locked (mpifed.runlock) before anything else is
written; a resume is checked by mpifed.resume. job.toml comes last, so a directory whose start-up
failed holds only its lock, and a launch under the same name may reuse it.
"""

from __future__ import annotations

import datetime
import traceback
from dataclasses import dataclass
from pathlib import Path

from mpifed import runlock
from mpifed.cluster import World
from mpifed.config import Job, JobError, load_job
from mpifed.diskfull import checkpoint_files, resume_advice, write_whole
from mpifed.errors import InputError
from mpifed.exchange import Exchange
from mpifed.learn.loading import check_learning
from mpifed.resume import resume_run
from mpifed.worker import check_client_state


@dataclass
class Start:
    """Where this launch begins: a new run, or a resumed one (the checkpoint stays on rank 0)."""

    run_dir: Path | None = None
    round: int = 0
    checkpoint: dict | None = None
    note: str = ""


def prepare(world: World, job_file: str | None, overrides: list[str], resume: str | None = None,
            auto_resume: bool = False) -> tuple[Job, Start]:
    """Rank 0 reads and validates the job (and, resuming, picks the checkpoint) and creates the run
    directory; every rank gets the resolved job. A bad job or checkpoint ends every rank with the
    same error before any training communication."""
    text, error, start = None, None, Start()
    timeout = Job().comm.timeout  # the others wait the default: they do not know the job's yet
    if world.is_server:
        try:
            if resume and job_file:
                raise JobError("--resume continues the job stored in the run directory; drop --job (use "
                               "--set, e.g. --set train.rounds=600, to change it)")
            resume = resume or (_existing_run(job_file, overrides) if auto_resume else None)
            if resume:
                job, payload, note = resume_run(world, resume, overrides)
                start = Start(Path(resume), payload["round"], payload, note)
            else:
                job, start = _new(world, job_file, overrides)
            text, timeout = job.to_toml(), job.comm.timeout
        except InputError as err:  # a job, a checkpoint, a full disk: the message says what to do
            error = str(err)
        except Exception as err:  # anything else must reach the other ranks too, not leave them waiting
            traceback.print_exc()
            error = f"rank 0 failed while preparing the run: {type(err).__name__}: {err}"
    Exchange(world.comm, polite=True, timeout=timeout).arrive()  # rank 0 may take a while (a resume copies the log)
    text, error, first = world.comm.bcast((text, error, start.round), root=0)
    if error:
        raise JobError(error)
    start.round = first
    return load_job(text=text), start


def _new(world: World, job_file: str | None, overrides: list[str]) -> tuple[Job, Start]:
    job = load_job(job_file, overrides)
    check_learning(job, world.local_size)  # the data fits and loads, the model takes it: one line, nothing written
    check_client_state(job, world.size)  # resolves the clients too
    return job, Start(_make_run_dir(job))


def _existing_run(job_file: str | None, overrides: list[str]) -> str | None:
    """--auto-resume: this launch's run directory, if it already holds a checkpoint (a requeued
    SLURM job starts its script again from the top, under the same job id)."""
    job = load_job(job_file, overrides)
    if job.run.timestamp:
        raise JobError("--auto-resume needs a fixed run directory: add --set run.timestamp=false and a "
                       "--name that is the same on every restart (e.g. the SLURM job id)")
    run_dir = Path(job.run.out) / job.run.name
    if checkpoint_files(run_dir):
        return str(run_dir)
    if run_dir.exists() and _holds_files(run_dir):
        raise JobError(f"--auto-resume: {run_dir} exists but holds no checkpoint to resume; remove it or "
                       f"choose another --name (nothing was written)")
    return None


def _make_run_dir(job: Job) -> Path:
    name = job.run.name
    if job.run.timestamp:
        name += datetime.datetime.now().strftime("-%Y%m%d-%H%M%S")
    path = Path(job.run.out) / name
    if path.exists() and not (path.is_dir() and not _holds_files(path)):  # empty: a start-up that failed
        raise JobError(f"run directory {path} already exists; choose another run.name (--name) or "
                       f"remove it (nothing was written)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise JobError(f"cannot create the run directory {path}: {err.strerror or err}; choose a writable "
                       f"run.out (--out)") from None
    runlock.hold(path)
    return path


def write_job(run_dir: Path, job: Job, ranks: int) -> None:
    """job.toml, replaced whole (a full disk must not leave a resumable run with half a job); `ranks`
    for the resume command a full disk's message offers."""
    write_whole(run_dir / "job.toml", lambda fh: fh.write(job.to_toml().encode()), "job.toml",
                lambda: resume_advice(run_dir, ranks))


def _holds_files(run_dir: Path) -> bool:
    """Whether a run directory holds anything but its lock (which a failed start-up leaves behind)."""
    return any(p.name != runlock.LOCK_NAME for p in run_dir.iterdir())
