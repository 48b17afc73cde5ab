"""How the settings of several runs differ: the first thing a comparison of runs must say. Reads the
resolved jobs that the logs store; pure functions, no I/O.
"""

from __future__ import annotations

import json

from mpifed.analysis.load import Run

# Fields that name or place a run rather than change what it computes.
IGNORED = ("run.name", "run.out", "run.timestamp")
ABSENT = "-"  # how a field one job lacks (an older mpifed wrote it) is shown


def flatten(job: dict, prefix: str = "") -> dict[str, object]:
    """{"optim": {"lr": 0.1}} as {"optim.lr": 0.1}; lists (clients.groups) stay whole values, and an
    empty table adds nothing (a table one job lacks shows its fields as absent)."""
    out: dict[str, object] = {}
    for key, value in job.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
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
    """A value as TOML writes it inline, the way `--set` takes it: "topk", true, [{count = 1}]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_show, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    return str(value)
