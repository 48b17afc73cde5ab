"""`mpifed train`: thin: parse options (mpifed.trainargs), then hand the world and the job to mpifed.train."""

from __future__ import annotations

import sys

import click

from mpifed.trainargs import job_overrides, train_options


@click.command("train")
@train_options
def train(job_file, overrides, name, out, progress, resume, auto_resume, print_job):
    """Federated training: rank 0 serves, every other rank is a client. Launch under MPI:
    `mpirun -n 4 mpifed train`. Exit code 3: stopped by SIGTERM/SIGUSR1/Ctrl-C after writing a checkpoint
    (or during start-up, before round 1). Exit code 4: diverged (train.max_skipped rounds in a row
    without a usable update)."""
    from mpifed.config import JobError, load_job

    overrides = job_overrides(overrides, name, out)
    if print_job:
        try:
            click.echo(load_job(job_file, overrides).to_toml())
        except JobError as err:
            raise click.ClickException(str(err)) from None
        return

    from mpifed import runlock
    from mpifed.cluster import StopRequest, StoppedEarly, abort, init_world, run_or_abort, stop_at_once
    from mpifed.errors import RankTimeout
    from mpifed.jobcheck import agree, check_launch

    world = init_world()
    StopRequest.install()  # from here on a signal asks for a stop (at start-up's next step, or a round's end)
    try:
        launch = agree(world, lambda: check_launch(job_file, overrides, resume, auto_resume, world.size))  # no torch
        from mpifed.rundir import prepare  # torch, the data and the model from here on
        from mpifed.train import train as run_train

        job, start = prepare(world, launch)
    except JobError as err:
        if world.is_server:
            runlock.release_all()  # a refused resume leaves its run directory as it was
            click.echo(f"mpifed: error: {err}", err=True)
        sys.exit(2)  # every rank: the launcher reports one exit code
    except RankTimeout as err:
        sys.exit(abort(world, err))
    except StoppedEarly as err:  # a signal while rank 0 read the job (or the others waited for it)
        sys.exit(stop_at_once(world, err))
    sys.exit(run_or_abort(world, lambda: run_train(world, job, start, progress)))
