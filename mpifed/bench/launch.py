"""Starting a benchmark's ranks: find the launcher, run a worker module under it, read its result.
The sweep scripts in analysis/ and the tests find the launcher here too (this module imports no torch).

A worker prints one line `RESULTS <json>` on rank 0; everything else it prints is ignored.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import click

MARK = "RESULTS "


def find_tool(name: str) -> str | None:
    """The venv's own command `name` (beside the running Python) when there is one, else the one on PATH,
    else None: so the launcher and the launched mpifed match the running Python."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def mpirun() -> str:
    """The venv's own mpirun (the MPICH wheel's) when there is one, else the one on PATH."""
    found = find_tool("mpirun")
    if found is None:
        raise click.ClickException("mpirun not found; pip install -e '.[mpich]' or load your cluster's MPI")
    return found


def run_ranks(body: Callable[[], None]) -> None:
    """A worker's entry point on every rank: a rank that fails prints its rank and message and aborts
    them all, so the others never wait out the launcher's timeout in a collective."""
    from mpifed.cluster import init_world, run_or_abort

    sys.exit(run_or_abort(init_world(), body))


def report(result: Any) -> None:
    """Called by a worker on rank 0."""
    print(MARK + json.dumps(result), flush=True)


def run_worker(ranks: int, module: str, args: list[str], timeout: float) -> Any:
    """`mpirun -n ranks python -m module args...`; the JSON its rank 0 reported."""
    cmd = [mpirun(), "-n", str(ranks), sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise click.ClickException(f"mpirun -n {ranks} {module} failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])
