"""`mpifed train`'s command-line options, defined once below the commands.

The `mpifed train` command is built from them (mpifed/commands/train.py), and mpifed.slurm reads the
arguments after `mpifed slurm ... --` with the same parser, so a typo there fails when the script is
rendered, not when the job leaves the queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import click

OPTIONS = (
    click.option("--job", "job_file", type=click.Path(dir_okay=False), default=None,
                 help="TOML job file (see jobs/). Without it, the embedded default job."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override a job field, e.g. --set train.rounds=50 (repeatable)."),
    click.option("--name", default=None, help="Run name (same as --set run.name=NAME)."),
    click.option("--out", default=None, help="Directory of runs (same as --set run.out=DIR)."),
    click.option("--progress", type=click.Choice(["auto", "bar", "log", "off"]), default="auto",
                 show_default=True, help="Rank 0's progress display."),
    click.option("--resume", "resume", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
                 help="Continue the run in RUN_DIR from its newest checkpoint, appending to its run.h5."),
    click.option("--auto-resume", is_flag=True,
                 help="Resume if this run's directory (run.timestamp = false) already holds a checkpoint, "
                      "else start it: what a requeued SLURM job needs."),
    click.option("--print-job", is_flag=True, help="Print the resolved job as TOML and exit (no MPI needed)."),
)
"""`mpifed train`'s options, in the order its --help lists them."""


def train_options(command: Callable) -> Callable:
    """Decorate a click command function with OPTIONS, as if each were written above it in order."""
    for option in reversed(OPTIONS):
        command = option(command)
    return command


@click.command("train")
@train_options
def _parser(**params) -> None:
    """Only parses: `mpifed train` itself is mpifed/commands/train.py."""


def parse(args: Sequence[str]) -> dict[str, object]:
    """`mpifed train`'s parameters in `args`, as its own parser reads them; a click.ClickException
    (UsageError, BadParameter) for what that parser refuses."""
    return dict(_parser.make_context("mpifed train", list(args), help_option_names=[]).params)


def job_overrides(overrides, name: str | None, out: str | None) -> list[str]:
    """The --set overrides with --name and --out folded in as run.name and run.out (TOML strings)."""
    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    given = [("name", name)] if name is not None else []  # --name "" too, which the job check refuses
    given += [("out", out)] if out else []
    return [*overrides, *(f"run.{key}={quote(value)}" for key, value in given)]
