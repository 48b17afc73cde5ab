"""What the experiment scripts in this folder share: launching one `mpifed train` run per (method, seed)
and skipping or resuming it by its log, and mean ± std over seeds for their tables.

Scripts run as `python analysis/<script>.py` find this module beside them (`from sweep_runs import ...`).
"""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import click
import numpy as np

from mpifed.analysis import RunLogError, load_run
from mpifed.bench.launch import find_tool, mpirun as venv_mpirun


def launchers() -> tuple[str, str]:
    """(mpirun, mpifed) of this Python's venv when it has them, else of PATH; a command-line error if missing."""
    mpifed = find_tool("mpifed")
    if mpifed is None:
        raise click.ClickException("the mpifed command was not found: pip install -e . into this Python's venv")
    return venv_mpirun(), mpifed


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}-s{seed}"


def rounds_logged(path: Path) -> tuple[int, int]:
    """(rounds in the log, rounds the job asks for)."""
    run = load_run(path)
    return run.rounds, int(run.job.get("train", {}).get("rounds", 0))


def launch(job: Path, out: Path, method: str, seed: int, ranks: int, mpirun: str, mpifed: str,
           overrides: tuple[str, ...] = ()) -> bool:
    """Run one (method, seed) unless its log is complete; output goes to <run>.log. True if it is done."""
    folder = run_dir(out, method, seed)
    log_file = out / f"{folder.name}.log"
    base = [mpirun, "-n", str(ranks), mpifed, "train"]
    if (folder / "run.h5").exists():
        try:
            have, want = rounds_logged(folder / "run.h5")
        except RunLogError as e:
            click.echo(f"FAILED {folder.name}: {e}; remove {folder} to run it again", err=True)
            return False
        if have >= want:
            click.echo(f"skip   {folder.name}: {have} rounds logged")
            return True
        if not any((folder / "checkpoints").glob("*.pt")):
            click.echo(f"FAILED {folder.name}: partial log ({have}/{want} rounds) and no checkpoint; "
                       f"remove {folder} to run it again", err=True)
            return False
        cmd = [*base, "--resume", str(folder), "--progress", "log"]
        click.echo(f"resume {folder.name} from round {have}")
    else:
        fixed = (f"run.seed={seed}", "run.timestamp=false", f"clients.count={ranks - 1}")  # the jobs fix 4 clients
        sets = [a for kv in (*fixed, *overrides) for a in ("--set", kv)]
        cmd = [*base, "--job", str(job), *sets, "--out", str(out), "--name", folder.name, "--progress", "log"]
        click.echo(f"run    {folder.name}")
    start = time.perf_counter()
    with open(log_file, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log_file.read_text().splitlines()[-5:]
        click.echo(f"FAILED {folder.name} (exit {rc}); last lines of {log_file}:\n  " + "\n  ".join(tail),
                   err=True)
        return False
    click.echo(f"       {folder.name} done in {time.perf_counter() - start:.0f} s")
    return True


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1) of the finite values; std is NaN for a single value."""
    x = np.array([v for v in values if math.isfinite(v)])
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def plus_minus(value: tuple[float, float], scale: float = 1.0, digits: int = 2, pm: str = "±") -> str:
    """A (mean, std) pair as 'mean pm std' times `scale`; '-' without a mean, the mean alone without a std."""
    mean, std = value
    if math.isnan(mean):
        return "-"
    text = f"{scale * mean:.{digits}f}"
    return text if math.isnan(std) else f"{text} {pm} {scale * std:.{digits}f}"
