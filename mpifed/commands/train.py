"""`mpifed train`: thin: parse options, then hand the world and the job to mpifed.train."""

from __future__ import annotations

import sys

import click


@click.command("train")
@click.option("--job", "job_file", type=click.Path(dir_okay=False), default=None,
              help="TOML job file (see jobs/). Without it, the embedded default job.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a job field, e.g. --set train.rounds=50 (repeatable).")
@click.option("--name", default=None, help="Run name (same as --set run.name=NAME).")
@click.option("--out", default=None, help="Directory of runs (same as --set run.out=DIR).")
@click.option("--progress", type=click.Choice(["auto", "bar", "log", "off"]), default="auto",
              show_default=True, help="Rank 0's progress display.")
@click.option("--resume", "resume", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="Continue the run in RUN_DIR from its newest checkpoint, appending to its run.h5.")
@click.option("--auto-resume", is_flag=True,
              help="Resume if this run's directory (run.timestamp = false) already holds a checkpoint, "
                   "else start it: what a requeued SLURM job needs.")
@click.option("--print-job", is_flag=True, help="Print the resolved job as TOML and exit (no MPI needed).")
def train(job_file, overrides, name, out, progress, resume, auto_resume, print_job):
    """Federated training: rank 0 serves, every other rank is a client. Launch under MPI:
    `mpirun -n 4 mpifed train`. Exit code 3: stopped by SIGTERM/SIGUSR1/Ctrl-C after writing a checkpoint
    (or during start-up, before round 1)."""
    from mpifed.config import JobError, load_job

    overrides = job_overrides(overrides, name, out)
    if print_job:
        try:
            click.echo(load_job(job_file, overrides).to_toml())
        except JobError as err:
            raise click.ClickException(str(err)) from None
        return

    from mpifed.cluster import StopRequest, abort, init_world, run_or_abort
    from mpifed.exchange import RankTimeout
    from mpifed.train import prepare, train as run_train

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
    sys.exit(run_or_abort(world, lambda: run_train(world, job, start, progress)))


def job_overrides(overrides, name: str | None, out: str | None) -> list[str]:
    """The --set overrides with --name and --out folded in as run.name and run.out (TOML strings)."""
    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return [*overrides, *(f"run.{key}={quote(value)}" for key, value in (("name", name), ("out", out)) if value)]
