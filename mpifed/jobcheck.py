"""A launch's job, checked by rank 0 before any rank imports torch.

Importing torch takes 8-25 s on every rank, and a job's mistakes (a --set typo, a value out of range,
a resume its stored run refuses) need none of it. So `mpifed train` and `mpifed profile` start MPI, let
rank 0 run the checks that need only the job, its run directory and run.h5 (h5py), and import torch
only once they pass: a mistake is one message from rank 0 within a second or two, and the other ranks
exit quietly with the same code. What needs torch (the codec's options, the data, the model, the
checkpoint's contents) is checked after, as before (mpifed.rundir).

    launch = agree(world, lambda: check_launch(job_file, overrides, resume, auto_resume, world.size))
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from mpifed import runlock
from mpifed.cluster import World
from mpifed.config import Job, JobError, load_job, resolve_clients
from mpifed.datasets import files_missing
from mpifed.diskfull import checkpoint_files
from mpifed.errors import InputError
from mpifed.jobnotes import job_notes
from mpifed.nodeshare import poll_politely
from mpifed.resume import check_resume, resuming

T = TypeVar("T")



@dataclass
class Launch:
    """What rank 0's checks found: the job (all but its codec checked), and the run directory to resume
    (locked) or None for a new run; the job file and --set, which a new run loads again in full."""

    job: Job
    resume: Path | None = None
    job_file: str | None = None
    overrides: tuple[str, ...] = ()


def check_launch(job_file: str | None, overrides: list[str], resume: str | None = None,
                 auto_resume: bool = False, world_size: int = 0) -> Launch:
    """Rank 0, before torch: the job with its --set, or the run to resume and its rules, and (given the
    `world_size`) its clients on the ranks where the job alone says how many. Prints, once, what the
    job asks for that would never act (mpifed.jobnotes)."""
    if resume and job_file:
        raise JobError("--resume continues the job stored in the run directory; drop --job (use "
                       "--set, e.g. --set train.rounds=600, to change it)")
    resume = resume or (_existing_run(job_file, overrides) if auto_resume else None)
    if resume:
        print(f"mpifed: {resuming(Path(resume))}", flush=True)  # the launch's first line
        launch = Launch(check_resume(resume, overrides), Path(resume))
    else:
        launch = Launch(load_job(job_file, overrides, light=True), None, job_file, tuple(overrides))
    if world_size and launch.job.data.partition != "natural":  # else the data says how many clients
        resolve_clients(launch.job, world_size, light=True)
    data = launch.job.data
    missing = files_missing(data.dataset, data.root, data.download)
    if missing:
        raise JobError(missing)
    for note in job_notes(launch.job):
        print(f"mpifed: warning: {note}", file=sys.stderr, flush=True)
    return launch


def _existing_run(job_file: str | None, overrides: list[str]) -> str | None:
    """--auto-resume: this launch's run directory, if it already holds a checkpoint (a requeued
    SLURM job starts its script again from the top, under the same job id)."""
    job = load_job(job_file, overrides, light=True)
    if job.run.timestamp:
        raise JobError("--auto-resume needs a fixed run directory: add --set run.timestamp=false and a "
                       "--name that is the same on every restart (e.g. the SLURM job id)")
    run_dir = Path(job.run.out) / job.run.name
    if checkpoint_files(run_dir):
        return str(run_dir)
    if run_dir.exists() and runlock.holds_files(run_dir):
        raise JobError(f"--auto-resume: {run_dir} exists but holds no checkpoint to resume; remove it or "
                       f"choose another --name (nothing was written)")
    return None


def agree(world: World, check: Callable[[], T]) -> T | None:
    """Rank 0 runs `check`; every rank returns together once it passed (rank 0 with its result, the
    others with None), or raises JobError with its message (rank 0 alone should print it). The others
    wait by sleeping, not spinning, while rank 0 works."""
    result, error = None, None
    if world.is_server:
        try:
            result = check()
        except InputError as err:  # a job, a run directory: the message says what to do
            error = str(err)
        except Exception as err:  # anything else must reach the other ranks too, not leave them waiting
            traceback.print_exc()
            error = f"rank 0 failed while checking the job: {type(err).__name__}: {err}"
    poll_politely([world.comm.Ibarrier()])  # the other ranks wait without taking rank 0's core
    error = world.comm.bcast(error, root=0)
    if error:
        raise JobError(error)
    return result
