"""Helpers for tests that submit real SLURM jobs (the one-node cluster of .ci/slurm-up).

    from slurm_helpers import require_slurm, run_batch
    require_slurm()                       # skips the test, with the reason, when no cluster is up
    job_id, code, log = run_batch(script_text, tmp_path, timeout=180)
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest

from mpifed.slurm import submit

HOW_TO_START = "run .ci/slurm-up as root to start a one-node SLURM"
USABLE_STATES = {"idle", "mixed", "allocated", "completing"}


@functools.cache
def slurm_unavailable_reason() -> str | None:
    """None when sbatch can run a job here now; otherwise why not, and how to fix it.
    Checked once per test session: a down controller makes sinfo retry for about 10 s."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return f"SLURM is not installed (no sbatch/sinfo on PATH); {HOW_TO_START}"
    # `scontrol ping` answers at once, where sinfo would retry a dead controller.
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    if ping.returncode != 0:
        said = (ping.stdout.strip() or ping.stderr.strip()).splitlines()[:1]
        return f"slurmctld is not answering ({' '.join(said)}); {HOW_TO_START}"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 20 s (slurmctld down?); {HOW_TO_START}"
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip()}); {HOW_TO_START}"
    # A trailing * (not responding), ~ (powered off) etc. makes a state unusable: match exactly.
    states = set(out.stdout.split())
    if not states & USABLE_STATES:
        return f"no usable SLURM node (states: {', '.join(sorted(states)) or 'none'}); {HOW_TO_START}"
    return None


def require_slurm() -> None:
    """Skip the calling test, with the reason, unless a SLURM cluster is up."""
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)


def run_batch(script: str, workdir: Path, *, timeout: float = 180,
              name: str = "job.sbatch") -> tuple[str, int, str]:
    """Write `script` to workdir/name, sbatch --wait it from workdir, return (job id, exit code,
    text of every slurm-*.out/.err in workdir). A job past `timeout` seconds is cancelled and the
    test fails with TimeoutError."""
    path = workdir / name
    path.write_text(script)
    job_id, code = submit(str(path), wait=True, timeout=timeout, sbatch_args=(f"--chdir={workdir}",))
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(workdir.glob("slurm-*")))
    return job_id, code, logs
