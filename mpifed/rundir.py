"""A launch's run directory: rank 0 creates a new one or resumes a stored one, and every rank gets the job.

    launch = agree(world, lambda: check_launch(...))     # rank 0's checks before torch (mpifed.jobcheck)
    job, start = prepare(world, launch)                  # every rank
    write_job(start.run_dir, job, world.size)            # rank 0, once set-up succeeded

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
from mpifed.jobcheck import Launch
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


def prepare(world: World, launch: Launch | None) -> tuple[Job, Start]:
    """Once rank 0's checks passed (`launch`, mpifed.jobcheck; None on the other ranks) and torch is
    loaded: rank 0 checks what needs torch (the codec, the data, the model; resuming, the checkpoint)
    and creates the run directory; every rank gets the resolved job. A bad job or checkpoint ends every
    rank with the same error before any training communication."""
    text, error, start = None, None, Start()
    timeout = Job().comm.timeout  # the others wait the default: they do not know the job's yet
    if world.is_server:
        try:
            if launch.resume:
                job, payload, note = resume_run(world, launch.resume, launch.job)
                start = Start(launch.resume, payload["round"], payload, note)
            else:
                job, start = _new(world, launch.job_file, list(launch.overrides))
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
    job = load_job(job_file, overrides)  # again, in full: the codec's checks too
    check_learning(job, world.local_size)  # the data fits and loads, the model takes it: one line, nothing written
    check_client_state(job, world.size)  # resolves the clients too
    return job, Start(_make_run_dir(job))


def _make_run_dir(job: Job) -> Path:
    name = job.run.name
    if job.run.timestamp:
        name += datetime.datetime.now().strftime("-%Y%m%d-%H%M%S")
    path = Path(job.run.out) / name
    if path.exists() and not (path.is_dir() and not runlock.holds_files(path)):  # empty: a start-up that failed
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

