"""`mpirun -n N mpifed profile --job J --out prof.json`: a job's performance model, without training.

Every rank does what `mpifed train` does at start-up with `plan.mode = "maximize"`: the clients
prepare (data, memory caps), and all ranks run probe rounds of the job's real path, each client at
batch sizes up to its profile cap (mpifed.planning, mpifed.probes). Rank 0 fits the model, prints
the plan it would choose and writes the profile file that `mpifed plan` reads; a training run with
a plan writes the same file as runs/<run>/profile.json. Torch and MPI are imported when the command
runs, so `mpifed --help` stays instant.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import click

from mpifed.perf.profile_file import save_profile

if TYPE_CHECKING:
    from mpifed.planning import StartupPlan


@click.command("profile")
@click.option("--job", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Job file (TOML) whose model, data, devices and codec are profiled.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a job field, as for `mpifed train`; e.g. plan.points=8 for a GPU's "
                   "plateau-then-line curves, plan.repeats=9 for steadier medians.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Profile file to write (JSON), read by `mpifed plan`.")
@click.option("--max-batch", type=click.IntRange(min=2), default=None,
              help="Largest batch a client times (plan.profile_max); default: its memory cap.")
def profile(job: str, overrides: tuple[str, ...], out: str, max_batch: int | None) -> None:
    """Time each client's step over batch sizes up to its cap in real rounds, and the round's other
    terms, as `mpifed train` does at start-up; write the fitted model."""
    start = time.perf_counter()
    extra = [f"plan.profile_max={max_batch}"] if max_batch else []
    plan = profile_job(job, [*overrides, 'plan.mode="maximize"', *extra])
    if plan is None:
        return
    save_profile(plan.profile, out)
    for line in plan.describe():
        click.echo(line)
    click.echo(f"profiled {len(plan.profile.clients)} clients in {time.perf_counter() - start:.1f} s -> {out}; "
               f"ask other batches with: mpifed plan {out} --global-batch N (or --maximize)")


def profile_job(job_path: str, overrides: Sequence[str]) -> StartupPlan | None:
    """Every rank builds the job's session and prepares its client as `mpifed train` does, then runs
    the same start-up step; rank 0 returns its StartupPlan, the others None. Clients are timed up to
    min(memory cap, plan.profile_max): bound it where the memory cap is large (a CPU), or the profile
    takes long. A rank that fails aborts them all, as in training, so no rank waits in a collective
    for it."""
    import dataclasses

    from mpifed.cluster import init_world, run_or_abort
    from mpifed.config import JobError, load_job
    from mpifed.jobcheck import agree, check_launch

    world = init_world()
    try:  # rank 0 checks the job, before any rank imports torch and then its data and model: one message
        agree(world, lambda: _profiled(check_launch(job_path, list(overrides), world_size=world.size).job))
        from mpifed.learn.loading import check_learning  # torch, on every rank at once

        agree(world, lambda: check_learning(load_job(job_path, list(overrides)), world.local_size))
    except JobError as err:
        if world.is_server:
            raise click.ClickException(str(err)) from None
        raise SystemExit(1) from None  # the same message once, from rank 0, not once per rank
    job = load_job(job_path, list(overrides))  # every rank: the file rank 0 found good

    from mpifed import probes
    from mpifed.client import prepare_client
    from mpifed.perf import fit_collective, measure_collectives
    from mpifed.planning import other_sizes, plan_startup
    from mpifed.runlog import ITER_FIELDS
    from mpifed.session import open_session, stop_if_asked

    result: list[StartupPlan] = []

    def body() -> None:
        s = open_session(world, job)
        setup = None if world.is_server else prepare_client(s)
        stop_if_asked(s)  # as in training: from here on the ranks agree on a stop between probe rounds
        plan = plan_startup(s, setup)
        # The round's own sizes are read off the probe rounds; bare collectives at other sizes give
        # the alpha-beta fit its shape, for what-if questions beyond them (`mpifed plan`'s one-client
        # baseline), and the metrics gather (outside t_iter, so not in the probe rounds) is measured
        # at its own size too.
        up = probes.update_collective(s)
        row = 8 * len(ITER_FIELDS)
        sizes = {"bcast": other_sizes(4 * s.model.size), up: other_sizes(probes.update_bytes(s)),
                 "gather": sorted({*other_sizes(row), row})}
        bare = measure_collectives(world.comm, sizes, repeats=job.plan.repeats)
        if plan is not None:
            comm = fit_collective([*plan.profile.comm.samples, *bare])
            result.append(dataclasses.replace(plan, profile=dataclasses.replace(plan.profile, comm=comm)))

    code = run_or_abort(world, body)
    if code:  # stopped by a signal during the probes: every rank exits with it, nothing written
        raise SystemExit(code)
    return result[0] if result else None



def _profiled(job):
    """`job`, if `mpifed profile` can time it (as a launch's checks found it: mpifed.jobcheck)."""
    from mpifed.config import JobError

    if not job.memory.size_clients and not job.plan.profile_max:
        raise JobError("mpifed profile times each client up to its memory cap: turn on "
                       "memory.size_clients or bound it with --max-batch N")
    return job
