"""`mpifed slurm`: write (and optionally submit) a SLURM batch script for a job file or a sweep.

    mpifed slurm --job jobs/cifar.toml --gpus-per-node 4 --time 04:00:00 -o cifar.sbatch
    mpifed slurm --job jobs/cifar.toml --nodes 4 --gpus-per-node 4 --partition gpu --submit
    mpifed slurm --sweep sweeps/lr.txt --gpus-per-node 2 --array-parallel 4 --submit
    mpifed slurm --job jobs/smoke.toml --gpus-per-node 0 --ntasks 3 --overcommit -- --set train.rounds=5

Arguments after `--` are appended to `mpifed train --job FILE`, and checked with the job file(s) now
rather than when the job leaves the queue. Paths are written absolute, so the script runs from any
directory. The rendering itself is mpifed/slurm.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from mpifed.slurm import LAUNCHERS, SlurmOptions, render, sbatch_word_problem, submit


def _sweep_jobs(sweep: Path) -> list[Path]:
    """The job files a sweep lists (blank lines and # comments skipped), relative to the sweep."""
    jobs = []
    for n, line in enumerate(sweep.read_text().splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if Path(entry).is_absolute() else sweep.parent / entry
        if not path.is_file():
            raise click.ClickException(f"{sweep}:{n}: job file {entry!r} not found (looked at {path})")
        jobs.append(path)
    if not jobs:
        raise click.ClickException(f"{sweep} lists no job file; write one job TOML path per line")
    return jobs


def _sbatch_word(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a value that would break, or add to, the #SBATCH line it is written into."""
    problem = sbatch_word_problem(param.name, value)
    if problem:
        raise click.BadParameter(problem, ctx, param)
    return value


def _check_output(output: Path) -> None:
    """Refuse -o in a missing directory before anything is written: the user names the directory."""
    parent = output.parent
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise click.BadParameter(f"cannot write {output}: directory {parent} {state}; create it first "
                                 f"(mkdir -p {parent}) or choose another path", param_hint="'-o' / '--output'")


def _default_venv() -> str | None:
    """The virtual environment running this command, if any: the batch job should use the same."""
    return sys.prefix if sys.prefix != sys.base_prefix else None


@click.command("slurm", context_settings={"show_default": True})
@click.option("--job", "job", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Job TOML file of one run.")
@click.option("--sweep", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File listing job TOML files, one per line: renders a job array.")
@click.option("--nodes", type=int, default=1, help="Nodes; more than 1 renders the multi-node script.")
@click.option("--gpus-per-node", type=int, default=1, help="GPUs per node, one client each; 0: CPU only.")
@click.option("--ntasks", type=int, default=None,
              help="MPI ranks. Default: nodes * gpus-per-node + 1 (the server).")
@click.option("--cpus-per-task", type=int, default=1, help="CPU cores per rank.")
@click.option("--time", "time_limit", default="01:00:00", help="Wall-time limit (SLURM --time).")
@click.option("--partition", default=None, callback=_sbatch_word,
              help="Partition (or a comma-separated list). Default: the cluster's default.")
@click.option("--account", default=None, callback=_sbatch_word, help="Account to charge.")
@click.option("--launcher", type=click.Choice(LAUNCHERS), default="srun",
              help="srun --mpi=pmi2, or the MPICH wheel's mpirun.")
@click.option("--overcommit", is_flag=True, help="Allow more ranks than CPUs (test clusters).")
@click.option("--requeue", is_flag=True, help="Requeue after the ranks checkpoint on the time-limit signal; the "
              "run (each array element's too) is named after its job id and resumes on the restart.")
@click.option("--signal-seconds", type=int, default=120,
              help="Send SIGUSR1 this many seconds before the time limit.")
@click.option("--venv", default=_default_venv(),
              help="Virtual environment to activate in the job; '' for none. Default: the current one.")
@click.option("--job-name", default=None, callback=_sbatch_word,
              help="SLURM job name. Default: the job or sweep file's stem.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/slurm"),
              help="Directory of SLURM's output files; created if missing (SLURM cannot create it).")
@click.option("--array-parallel", type=int, default=None,
              help="With --sweep: run at most this many array elements at once.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the script here. Default: stdout, or <log-dir>/<job-name>.sbatch with --submit.")
@click.option("--submit", "do_submit", is_flag=True, help="Submit with sbatch and print the job id.")
@click.argument("mpifed_args", nargs=-1, type=click.UNPROCESSED)
def slurm(job: Path | None, sweep: Path | None, nodes: int, gpus_per_node: int, ntasks: int | None,
          cpus_per_task: int, time_limit: str, partition: str | None, account: str | None,
          launcher: str, overcommit: bool, requeue: bool, signal_seconds: int, venv: str | None,
          job_name: str | None, log_dir: Path, array_parallel: int | None, output: Path | None,
          do_submit: bool, mpifed_args: tuple[str, ...]) -> None:
    """Render a SLURM batch script that runs `mpifed train` (one run, or one per sweep entry)."""
    if venv and not (Path(venv) / "bin" / "activate").is_file():
        raise click.BadParameter(f"{venv}/bin/activate does not exist; give a virtual environment "
                                 "directory, or '' to activate none", param_hint="--venv")
    if output is not None:
        _check_output(output)
    source = job or sweep
    if job_name is None and source is not None:
        job_name = re.sub(r"[^A-Za-z0-9_.+-]", "_", source.stem) or "mpifed"
    sweep_jobs = _sweep_jobs(sweep) if sweep else []
    try:
        opts = SlurmOptions(
            job=str(job.resolve()) if job else None,
            sweep=str(sweep.resolve()) if sweep else None,
            sweep_size=len(sweep_jobs),
            array_parallel=array_parallel, nodes=nodes, gpus_per_node=gpus_per_node, ntasks=ntasks,
            cpus_per_task=cpus_per_task, time=time_limit, partition=partition, account=account,
            launcher=launcher, overcommit=overcommit, requeue=requeue, signal_seconds=signal_seconds,
            venv=str(Path(venv).resolve()) if venv else None, job_name=job_name or "mpifed",
            log_dir=str(log_dir.resolve()), mpifed_args=mpifed_args)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    # Each array element runs `mpifed train` on its own job file: check them all with the -- arguments.
    problems = list(dict.fromkeys(problem for path in sweep_jobs
                                  for problem in opts.job_problems(str(path.resolve()))))
    if problems:
        raise click.UsageError(f"invalid sweep {sweep}:\n  " + "\n  ".join(problems))
    script = render(opts.template, **opts.fields())
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f"cannot create {log_dir}: {e.strerror}", param_hint="'--log-dir'") from None
    if do_submit and output is None:
        output = log_dir / f"{opts.job_name}.sbatch"
    if output is None:
        click.echo(script, nl=False)
        return
    try:
        output.write_text(script)
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e.strerror}") from None
    click.echo(f"wrote {output} ({opts.template}, {opts.ntasks} ranks)", err=True)
    if do_submit:
        try:
            job_id, _ = submit(str(output))
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None
        click.echo(job_id)
