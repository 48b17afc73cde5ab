"""`mpirun -n N mpifed profile --job J --out prof.json`: a job's performance model, without training.

Every rank does what `mpifed train` does at start-up with `plan.mode = "maximize"`: the clients
prepare (data, memory caps), and all ranks run probe rounds of the job's real path, each client at
batch sizes up to its profile cap (mpifed.planning, mpifed.probes). Rank 0 fits the model, prints
the plan it would choose and writes the profile file that `mpifed plan` reads; a training run with
a plan writes the same file as runs/<run>/profile.json. What a round *is* comes from the spine
through `setup`, so this module knows nothing about MPI or torch.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import click

from mpifed.perf.profile_file import save_profile

Setup = Callable[[str, Sequence[str]], Any]
"""(job path, --set overrides) -> the spine's StartupPlan on rank 0, None elsewhere; collective."""


def make_profile_command(setup: Setup) -> click.Command:
    """Build the `profile` command around the spine's `setup` (cli.py registers the result)."""

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
        plan = setup(job, [*overrides, 'plan.mode="maximize"', *extra])
        if plan is None:
            return
        save_profile(plan.profile, out)
        for line in plan.describe():
            click.echo(line)
        click.echo(f"profiled {len(plan.profile.clients)} clients in {time.perf_counter() - start:.1f} s -> {out}; "
                   f"ask other batches with: mpifed plan {out} --global-batch N (or --maximize)")

    return profile
