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

    from mpifed.cluster import StopRequest, StoppedEarly, abort, init_world, run_or_abort, stop_at_once
    from mpifed.exchange import RankTimeout
    from mpifed.rundir import prepare
    from mpifed.train import train as run_train

    world = init_world()
    StopRequest.install()  # from here on a signal asks for a stop (at start-up's next step, or a round's end)
    try:
        job, start = prepare(world, job_file, overrides, resume, auto_resume)
    except JobError as err:
        if world.is_server:
            click.echo(f"mpifed: error: {err}", err=True)
        sys.exit(2)
    except RankTimeout as err:
        sys.exit(abort(world, err))
    except StoppedEarly as err:  # a signal while rank 0 read the job (or the others waited for it)
        sys.exit(stop_at_once(world, err))
    sys.exit(run_or_abort(world, lambda: run_train(world, job, start, progress)))

