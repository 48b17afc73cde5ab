"""The `mpifed` command: a click group whose commands live one per module in mpifed/commands/.

Imports of torch and MPI happen inside the commands, so `mpifed --help` stays instant and
`mpifed train --print-job` works without an MPI launcher.
"""

from __future__ import annotations

import click

from mpifed import __version__
from mpifed.commands.analyze import analyze
from mpifed.commands.bench import bench
from mpifed.commands.info import info
from mpifed.commands.memory import memory
from mpifed.commands.plan import plan
from mpifed.commands.profile import profile
from mpifed.commands.slurm import slurm
from mpifed.commands.train import train
from mpifed.commands.watch import watch


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpifed")
def main():
    """mpifed: federated learning over MPI, with large batches made to generalize.

    Launch training with `mpirun -n 4 mpifed train`; see README.md and docs/."""


@main.command("job-reference")
def job_reference():
    """Print every job-file field with its default and meaning (Markdown)."""
    from mpifed.config import job_reference as reference

    click.echo(reference())


main.add_command(train)
main.add_command(info)
main.add_command(bench)
main.add_command(slurm)
main.add_command(memory)
main.add_command(plan)
main.add_command(profile)
main.add_command(analyze)
main.add_command(watch)
