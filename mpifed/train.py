"""`mpifed train`, after the command line is parsed: prepare the run on rank 0, then each rank's role.

    mpirun -n 4 mpifed train                       # embedded default job, 3 clients
    mpirun -n 16 mpifed train --job jobs/hetero15.toml
    srun --mpi=pmi2 mpifed train --job jobs/x.toml
"""

from __future__ import annotations

import datetime
import os
import sys
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path

import h5py
import mpi4py
import tomli_w
import torch
from mpi4py import MPI

import mpifed
from mpifed import checkpoint, runlock, runlog
from mpifed.client import prepare_client, run_client
from mpifed.cluster import STOPPED, World
from mpifed.config import Job, JobError, load_job, resolve_clients
from mpifed.errors import InputError
from mpifed.exchange import Exchange
from mpifed.perf.report import predict_for
from mpifed.planning import plan_startup
from mpifed.progress import Progress
from mpifed.runlog import RANK_COLUMNS, RunWriter
from mpifed.server import run_server
from mpifed.scaling import check_scaling
from mpifed.session import Session, agree_batches, open_session, restore_batches, stop_if_asked


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
            job, start = _resume(world, resume, overrides) if resume else _new(world, job_file, overrides)
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
    resolve_clients(job, world.size)
    return job, Start(_make_run_dir(job))


def _existing_run(job_file: str | None, overrides: list[str]) -> str | None:
    """--auto-resume: this launch's run directory, if it already holds a checkpoint (a requeued
    SLURM job starts its script again from the top, under the same job id)."""
    job = load_job(job_file, overrides)
    if job.run.timestamp:
        raise JobError("--auto-resume needs a fixed run directory: add --set run.timestamp=false and a "
                       "--name that is the same on every restart (e.g. the SLURM job id)")
    run_dir = Path(job.run.out) / job.run.name
    if checkpoint.candidates(run_dir):
        return str(run_dir)
    if run_dir.exists() and _holds_files(run_dir):
        raise JobError(f"--auto-resume: {run_dir} exists but holds no checkpoint to resume; remove it or "
                       f"choose another --name (nothing was written)")
    return None


def _resume(world: World, resume: str, overrides: list[str]) -> tuple[Job, Start]:
    run_dir = Path(resume)
    if not (run_dir / "job.toml").is_file() or not (run_dir / "run.h5").is_file():
        raise JobError(f"--resume {run_dir}: not an mpifed run directory (no job.toml and run.h5); give "
                       f"the directory `mpifed train` printed, e.g. runs/default-20260101-120000")
    unwritable = [p for p in (run_dir, run_dir / "run.h5") if not os.access(p, os.W_OK)]
    if unwritable:
        raise JobError(f"--resume {run_dir}: {', '.join(map(str, unwritable))} cannot be written (a resume appends "
                       f"to the log and writes checkpoints); make it writable, or copy the run directory somewhere "
                       f"writable and resume the copy (nothing was changed)")
    runlock.hold(run_dir)
    stored = _stored_job(run_dir / "job.toml", overrides)
    logged_job = _logged_job(run_dir / "run.h5") or stored
    edited = [key for key in _changed_fields(logged_job, stored) if not key.startswith(RESUME_MAY_CHANGE)]
    if edited:
        raise JobError(f"{run_dir / 'job.toml'} differs from the job run.h5 records (its root attribute 'job') "
                       f"in {', '.join(edited)}: it was edited after the run started, and the resumed rounds "
                       f"would differ from what run.h5 describes; restore those fields, or start a new run "
                       f"(nothing was changed)")
    job = load_job(text=tomli_w.dumps(_without_one_shot_faults(stored, overrides)), overrides=overrides)
    changed = [key for key in _changed_fields(stored, tomllib.loads(job.to_toml()))
               if not key.startswith(RESUME_MAY_CHANGE)]
    if changed:
        raise JobError(f"--resume continues the stored job, but --set changes {', '.join(changed)}, which would "
                       f"make the resumed rounds differ from what run.h5 describes; start a new run for that "
                       f"(on resume only {', '.join(k + '*' if k.endswith('.') else k for k in RESUME_MAY_CHANGE)} "
                       f"may change)")
    stored_rounds = logged_job["train"]["rounds"]
    if job.optim.schedule == "cosine" and job.train.rounds != stored_rounds:
        raise JobError(f"optim.schedule = \"cosine\" anneals the learning rate over train.rounds = "
                       f"{stored_rounds}; resuming with {job.train.rounds} would bend the curve mid-run, so "
                       f"the rounds logged and the rounds to come would follow different schedules. Start a "
                       f"new run for more rounds (runs meant to be extended: optim.schedule = \"step\" or "
                       f"\"constant\")")
    resolve_clients(job, world.size)
    path, payload, notes = checkpoint.choose(run_dir, checkpoint.identity(job, world.size - 1))
    for note in notes:
        print(f"mpifed: {note}", file=sys.stderr, flush=True)
    if payload["round"] >= job.train.rounds:
        raise JobError(f"{path} is at round {payload['round']} and the job has train.rounds = "
                       f"{job.train.rounds}: nothing left; raise it, e.g. --set train.rounds=2000")
    logged_rounds = _logged_rounds(run_dir / "run.h5")
    if logged_rounds < payload["round"]:
        raise JobError(f"{run_dir / 'run.h5'} holds {logged_rounds} rounds but {path.name} resumes at round "
                       f"{payload['round']}: the log lost rounds; restore it from a copy (nothing was changed)")
    when = datetime.datetime.now().isoformat(timespec="seconds")
    note = f"resumed at round {payload['round']} from {path.name} ({when})"
    return job, Start(run_dir, payload["round"], payload, note)


ONE_SHOT_FAULTS = ("fail_rank", "corrupt_rank")
"""Fault injections that are events of the launch that asked for them, not part of the job: a resume
does not repeat them (a run that failed on purpose in round 5 would otherwise fail there on every
resume); --set them again to repeat one. Drift (debug.slow_*) is a device's state and carries on."""


def _stored_job(path: Path, overrides: list[str]) -> dict:
    """The stored job as TOML data. It is checked together with the resume's --set, so a job that
    a newer mpifed's checks refuse can be resumed by setting the refused field (when a resume may
    change it); without --set it must pass as it is."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise JobError(f"{path} cannot be read ({err}); it is the job this run was started with: restore "
                       f"it from a copy (nothing was changed)") from None
    try:
        load_job(text=tomli_w.dumps(data), overrides=overrides)
    except JobError as err:
        raise JobError(f"{path}, with this resume's --set, is not a valid job: {err}\nA resume may fix a field "
                       f"with --set FIELD=VALUE when it is one of {', '.join(RESUME_MAY_CHANGE)}; for any other, "
                       f"start a new run") from None
    return data


def _logged_job(path: Path) -> dict | None:
    """The job run.h5 records (set-up's, or the last resume's): what its logged rounds ran with. A
    hand-edited job.toml must not change that silently."""
    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            return tomllib.loads(f.attrs["job"])
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return None  # an unreadable log is reported, with what to do, when its rounds are counted


def _without_one_shot_faults(data: dict, overrides: list[str]) -> dict:
    """The job's TOML data with the one-shot fault injections switched off, saying so when one was on
    and the resume does not set it again."""
    again = {item.split("=", 1)[0].strip() for item in overrides}
    debug = data.get("debug", {})
    dropped = [f"debug.{k} = {debug[k]}" for k in ONE_SHOT_FAULTS
               if debug.get(k, -1) != -1 and f"debug.{k}" not in again]
    if dropped:
        print(f"mpifed: not repeating the stored fault injection ({', '.join(dropped)}); --set it again to "
              f"repeat it", file=sys.stderr, flush=True)
    return {**data, "debug": {**debug, **{k: -1 for k in ONE_SHOT_FAULTS}}}


RESUME_MAY_CHANGE = ("train.rounds", "train.eval_every", "train.eval_batch", "checkpoint.", "comm.", "run.",
                     "memory.", "plan.", "debug.")
"""Job fields a resume may change: how long, how often to evaluate and checkpoint, how ranks wait
and where they run (run.seed too, but the checkpoint's identity refuses another seed). The rest
(data, model, batches, optimizer, codec, clients, profiles, scaling) shapes what the rounds compute,
which the log and the checkpoint must keep describing."""


def _changed_fields(a: dict, b: dict) -> list[str]:
    """Dotted names of the fields that differ between two jobs' TOML data."""
    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    defaults = flat(tomllib.loads(Job().to_toml()))  # a field the stored job predates had its default
    fa, fb = {**defaults, **flat(a)}, {**defaults, **flat(b)}
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def _logged_rounds(path: Path) -> int:
    """Rounds a run log holds, read before anything is changed; a damaged log is the user's to restore."""
    try:
        if runlog.recover(path):
            print(f"mpifed: {path} was left open by a job that died; its rounds were copied into a fresh "
                  f"file to append to", file=sys.stderr, flush=True)
        with h5py.File(path, "r") as f:
            return int(f["iter/t_iter"].shape[0])
    except runlog.DiskFullError as err:
        raise JobError(str(err)) from None
    except (OSError, KeyError) as err:
        raise JobError(f"--resume: {path} cannot be read ({err}); restore it from a copy, or start a new run "
                       f"(nothing was changed)") from None


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


def _write_job(run_dir: Path, job: Job) -> None:
    """job.toml, replaced whole (a full disk must not leave a resumable run with half a job)."""
    checkpoint.write_whole(run_dir / "job.toml", lambda fh: fh.write(job.to_toml().encode()), "job.toml",
                           lambda: checkpoint.resume_advice(run_dir))


def _holds_files(run_dir: Path) -> bool:
    """Whether a run directory holds anything but its lock (which a failed start-up leaves behind)."""
    return any(p.name != runlock.LOCK_NAME for p in run_dir.iterdir())


def train(world: World, job: Job, start: Start, progress_mode: str) -> int:
    """Run this rank's role; return the exit code (0, or STOPPED)."""
    s = open_session(world, job)
    s.start_round, s.resumed_from, run_dir = start.round, start.checkpoint, start.run_dir
    setup = None if world.is_server else prepare_client(s)  # partition, data, memory sizing
    stop_if_asked(s)
    plan = plan_startup(s, setup)  # [plan]: time steps and collectives, choose the batches
    agree_batches(s, 0 if setup is None else setup.batch)   # waits politely while clients prepare
    if start.round:
        restore_batches(s, start.checkpoint)
    check = check_scaling(job.scaling, s.global_batch, s.n_clients)
    if check:
        raise JobError("after memory sizing: " + "; ".join(check))
    if not world.is_server:
        return STOPPED if run_client(s, setup) else 0
    s.exchange.arrive()
    infos = world.comm.gather(None, root=0)
    infos[0] = dict(role="server", host=world.host, device=str(s.device), profile="-", emulated=False,
                    speed=1.0, memory_budget=0.0, bandwidth=0.0, latency=0.0, data_size=len(s.dataset),
                    requested_batch=0, max_batch=0, batch=s.global_batch)
    ranks = {key: [info[key] for info in infos] for key in RANK_COLUMNS}
    s.max_batches = [int(info["max_batch"]) for info in infos[1:]]
    s.data_sizes = [int(info["data_size"]) for info in infos[1:]]
    if start.checkpoint is not None:
        writer = RunWriter.reopen(run_dir / "run.h5", start.round, start.note, job.to_toml())
    else:
        writer = RunWriter(run_dir / "run.h5", _attrs(world, s), ranks)
        for k, info in enumerate(infos[1:]):
            if info["memory_model"]:
                writer.set_model_attrs(f"memory.client{k}", info["memory_model"])
        if plan is not None:
            plan.record(writer, run_dir)
        writer.begin_swmr()
    _write_job(run_dir, job)  # set-up and the log succeeded: the job is what runs
    messages = [info["message"] for info in infos[1:] if info["message"]]
    progress = Progress(progress_mode, job.train.rounds, job.train.eval_every or job.train.rounds)
    for message in messages:
        progress.print(f"mpifed: memory model: {message}")
    for line in plan.describe() if plan is not None else ():
        progress.print(f"mpifed: {line}")
    if plan is not None and start.round and s.batches.tolist() != plan.batches:
        s.t_iter_pred = predict_for(plan.profile, s.batches.tolist()).t_round  # what the rounds will run
        progress.print(f"mpifed: resuming with the checkpoint's batches {', '.join(map(str, s.batches))}, not "
                       f"this start-up plan's; predicted round {1e3 * s.t_iter_pred:.1f} ms")
    progress.print(f"mpifed: {s.n_clients} clients on {len(set(ranks['host']))} host(s), model {job.model.name} "
                   f"({s.model.n_params:,} parameters), global batch {s.global_batch}, log {run_dir / 'run.h5'}")
    try:
        final = run_server(s, writer, run_dir, progress, plan)
    finally:
        writer.close()
        progress.close()
    if "stopped" in final:
        return STOPPED
    progress.print(f"mpifed: done: test accuracy {final['test_acc']:.4f}, test loss {final['test_loss']:.4f} "
                   f"after {final['round']} rounds ({final['wall']:.1f} s); model in {run_dir / 'model.pt'}")
    return 0


def _attrs(world: World, s: Session) -> dict:
    return dict(mpifed_version=mpifed.__version__, torch_version=torch.__version__,
                mpi4py_version=mpi4py.__version__, h5py_version=h5py.__version__,
                mpi_library=MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0],
                job=s.job.to_toml(), command=" ".join(sys.argv), world_size=world.size,
                started=datetime.datetime.now().isoformat(timespec="seconds"),
                wait_mode="sleep" if s.exchange.polite else "poll",
                n_params=s.model.n_params, n_buffers=s.model.n_buffers)
