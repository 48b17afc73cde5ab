"""How the settings of several runs differ: the first thing a comparison of runs must say. Reads the
resolved jobs that the logs store; pure functions, no I/O.
"""

from __future__ import annotations

from mpifed.analysis.load import Run

# Fields that name or place a run rather than change what it computes.
IGNORED = ("run.name", "run.out", "run.timestamp")
ABSENT = "-"  # how a field one job lacks (an older mpifed wrote it) is shown


def flatten(job: dict, prefix: str = "") -> dict[str, object]:
    """{"optim": {"lr": 0.1}} as {"optim.lr": 0.1}; lists (clients.groups) stay whole values."""
    out: dict[str, object] = {}
    for key, value in job.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def differing_settings(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(field, the value in each run) for every job field whose values are not all equal, in the jobs'
    order; [] for one run, or when no run stored its job."""
    if len(runs) < 2:
        return []
    jobs = [flatten(run.job) for run in runs]
    names = list(dict.fromkeys(name for job in jobs for name in job))
    rows = []
    for name in names:
        if name in IGNORED:
            continue
        values = [_show(job[name]) if name in job else ABSENT for job in jobs]
        if len(set(values)) > 1:
            rows.append((name, values))
    return rows


def _show(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # as TOML writes it
    if isinstance(value, str):
        return repr(value)
    return str(value)
