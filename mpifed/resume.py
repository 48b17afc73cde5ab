"""--resume: what a resume may change, and the checks a stored run passes before it continues.

A resumed run appends to its run.h5 from a checkpoint, so whatever shapes the rounds (data, model,
batches, optimizer, codec, clients, profiles, scaling) must stay what the log and the checkpoint
describe. Every check runs before anything in the run directory is changed, and each refusal says
what to do instead. The rules that need only the job, the log and the checkpoints' names
(`check_resume`) run before any rank imports torch (mpifed.jobcheck); `resume_run` then loads the
data and the model and reads the checkpoint itself.
"""

from __future__ import annotations

import datetime
import os
import sys
import tomllib
from pathlib import Path

import h5py
import tomli_w

from mpifed import runlock, runlog
from mpifed.cluster import World
from mpifed.config import Job, JobError, load_job
from mpifed.diskfull import DiskFullError, checkpoint_files


def check_resume(resume: str | Path, overrides: list[str]) -> Job:
    """Rank 0, before torch: lock the run directory `resume` and check its stored job with this
    resume's --set (the job's own checks but the codec's, which the full load in `resume_run` adds)."""
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
    stored = _ran_with(_stored_job(run_dir / "job.toml", overrides))
    logged_job = _ran_with(_logged_job(run_dir / "run.h5") or stored)
    edited = [key for key in _changed_fields(logged_job, stored) if not key.startswith(RESUME_MAY_CHANGE)]
    if edited:
        raise JobError(f"{run_dir / 'job.toml'} differs from the job run.h5 records (its root attribute 'job') "
                       f"in {', '.join(edited)}: it was edited after the run started, and the resumed rounds "
                       f"would differ from what run.h5 describes; restore those fields, or start a new run "
                       f"(nothing was changed)")
    job = load_job(text=tomli_w.dumps(_without_one_shot_faults(stored, overrides)), overrides=overrides, light=True)
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
    rounds = [_named_round(path) for path in checkpoint_files(run_dir)]
    if rounds and min(rounds) >= job.train.rounds:  # whichever checkpoint resume_run takes, nothing is left
        raise JobError(f"{checkpoint_files(run_dir)[0]} is at round {max(rounds)} and the job has train.rounds = "
                       f"{job.train.rounds}: nothing left; raise it, e.g. --set train.rounds={2 * max(rounds)}")
    return job


def resuming(run_dir: Path) -> str:
    """What a resume says first: which run, and the round its newest checkpoint goes on from."""
    found = checkpoint_files(run_dir)
    if not found:
        return f"resuming {run_dir}"
    return f"resuming {run_dir} after round {_named_round(found[0])} (checkpoint {found[0].name}), appending to its run.h5"


def _named_round(path: Path) -> int:
    """The round a checkpoint's name says it resumes at (mpifed.checkpoint refuses one that holds another)."""
    digits = path.name.removeprefix("round-").split(".")[0]
    return int(digits) if digits.isdigit() else 0


def resume_run(world: World, run_dir: Path, job: Job) -> tuple[Job, dict, str]:
    """Rank 0, once `check_resume` passed and torch is loaded: check the job in full, load the data and
    the model, and choose the checkpoint; returns the job, the checkpoint and the note the log records."""
    from mpifed import checkpoint  # these import torch: after the checks above
    from mpifed.learn.loading import check_learning, job_clients

    job = load_job(text=job.to_toml())  # the codec's checks too
    check_learning(job, world.local_size)  # the data and the model still load and fit, before anything is changed
    n_clients = len(job_clients(job, world.size))
    path, payload, notes = checkpoint.choose(run_dir, checkpoint.identity(job, n_clients))
    for note in notes:
        print(f"mpifed: {note}", file=sys.stderr, flush=True)
    if payload["round"] >= job.train.rounds:
        raise JobError(f"{path} is at round {payload['round']} and the job has train.rounds = "
                       f"{job.train.rounds}: nothing left; raise it, e.g. --set train.rounds=2000")
    logged_rounds = _logged_rounds(run_dir / "run.h5")
    if logged_rounds < payload["round"]:
        raise JobError(f"{run_dir / 'run.h5'} holds {logged_rounds} rounds but {path.name} resumes at round "
                       f"{payload['round']}: either the log lost rounds (restore it from a copy) or the checkpoint "
                       f"comes from another run of this job (move it out of {path.parent} to resume from the one "
                       f"before it); nothing was changed")
    when = datetime.datetime.now().isoformat(timespec="seconds")
    return job, payload, f"resumed at round {payload['round']} from {path.name} ({when})"


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
        load_job(text=tomli_w.dumps(data), overrides=overrides, light=True)
    except JobError as err:
        raise JobError(f"{path}, with this resume's --set, is not a valid job: {err}\nA resume may fix a field "
                       f"with --set FIELD=VALUE when it is one of {', '.join(RESUME_MAY_CHANGE)}; for any other, "
                       f"start a new run") from None
    return data


def _ran_with(data: dict) -> dict:
    """A job's TOML data with the defaults that follow train.rounds (scaling.window and warmup) as its
    run set them, where it leaves them out or to follow: a resume with more rounds must not move them.
    A job that fails its checks alone is left as it is (its --set may fix it)."""
    try:
        ran = load_job(text=tomli_w.dumps(data), light=True).scaling
    except JobError:
        return data
    return {**data, "scaling": {**data.get("scaling", {}), "window": ran.window, "warmup": ran.warmup}}


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


RESUME_MAY_CHANGE = ("train.rounds", "train.eval_every", "train.eval_batch", "train.max_skipped", "checkpoint.",
                     "comm.", "run.",
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
    except DiskFullError as err:
        raise JobError(str(err)) from None
    except (OSError, KeyError) as err:
        raise JobError(f"--resume: {path} cannot be read ({err}); restore it from a copy, or start a new run "
                       f"(nothing was changed)") from None
