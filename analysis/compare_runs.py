"""Rebuild a paper-style results table from run logs: one row per method, accuracy as mean ± std
over seeds, with rounds, wall time and throughput.

A "method" is a group of runs. By default runs are grouped by their run.name with a trailing seed
suffix removed (`large-s0`, `large-s1`, `large-seed2` -> `large`); `--group-by KEY` groups by job
fields instead (dotted keys of the job TOML stored in each log, e.g. `train.batch`, `optim.lr`;
repeat it to group by several). Examples:

    python analysis/compare_runs.py runs/                       # every runs/*/run.h5
    python analysis/compare_runs.py runs/large-s* runs/small-s* --format latex
    python analysis/compare_runs.py runs/ --group-by train.batch --group-by optim.scale_lr
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import click

from mpifed.analysis import RunLogError, load_run, summarize
from mpifed.analysis.load import Run

from sweep_runs import mean_std, plus_minus

SEED_SUFFIX = re.compile(r"[-_.](?:seed|s)\d+$")
"""A seed suffix: `-s1`, `_seed2`. A bare trailing number is part of the method (`batch-64`, `lr-0.1`)."""


def find_logs(paths: list[str]) -> list[Path]:
    """Run logs named by the paths: a run.h5, a run folder, or a folder of run folders."""
    logs: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and not (p / "run.h5").exists():
            found = sorted(p.glob("*/run.h5"))
            if not found:
                raise RunLogError(f"{p}: holds no run.h5 and no */run.h5; give run folders or their run.h5")
            logs.extend(found)
        else:
            logs.append(p)
    return logs


def job_value(run: Run, key: str) -> object:
    """The job field at a dotted key; a missing key is an error that lists the keys there are."""
    node: object = run.job
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            there = ", ".join(sorted(node)) if isinstance(node, dict) else "none"
            raise RunLogError(f"{run.path}: the job has no field {key!r} (at {part!r}; keys there: {there})")
        node = node[part]
    return node


def method_of(run: Run, group_by: tuple[str, ...]) -> str:
    if not group_by:
        return SEED_SUFFIX.sub("", run.name) or run.name
    return ", ".join(f"{key}={job_value(run, key)}" for key in group_by)


@dataclass(frozen=True)
class Row:
    method: str
    runs: int
    seeds: list[int]
    final_acc: tuple[float, float]   # mean, std over runs (std NaN for one run)
    best_acc: tuple[float, float]
    rounds: list[int]
    wall_s: tuple[float, float]
    throughput: tuple[float, float]


def table_rows(runs: list[Run], group_by: tuple[str, ...]) -> list[Row]:
    """One Row per method, in the order methods first appear."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(method_of(run, group_by), []).append(run)
    rows = []
    for method, members in groups.items():
        s = [summarize(r) for r in members]
        rows.append(Row(method=method, runs=len(members),
                        seeds=sorted({int(r.job.get("run", {}).get("seed", -1)) for r in members}),
                        final_acc=mean_std([x.accuracy.final for x in s]),
                        best_acc=mean_std([x.accuracy.best for x in s]),
                        rounds=sorted({x.rounds for x in s}),
                        wall_s=mean_std([x.wall_s for x in s]),
                        throughput=mean_std([x.throughput for x in s])))
    return rows


HEADER = ("method", "runs", "seeds", "final test acc (%)", "best test acc (%)", "rounds", "wall time (s)",
          "samples/s")


def _cells(row: Row, pm: str) -> list[str]:
    return [row.method, str(row.runs), ",".join(map(str, row.seeds)), plus_minus(row.final_acc, 100, 2, pm),
            plus_minus(row.best_acc, 100, 2, pm), "/".join(map(str, row.rounds)), plus_minus(row.wall_s, 1, 1, pm),
            plus_minus(row.throughput, 1, 0, pm)]


def render(rows: list[Row], fmt: str) -> str:
    if fmt == "latex":
        lines = [r"\begin{tabular}{l" + "r" * (len(HEADER) - 1) + "}", r"\toprule",
                 " & ".join(HEADER).replace("%", r"\%") + r" \\", r"\midrule"]
        lines += [" & ".join(c.replace("_", r"\_") for c in _cells(r, r"$\pm$")) + r" \\" for r in rows]
        return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["method", "runs", "seeds", "final_acc_mean", "final_acc_std", "best_acc_mean",
                         "best_acc_std", "rounds", "wall_s_mean", "wall_s_std", "throughput_mean",
                         "throughput_std"])
        for r in rows:
            writer.writerow([r.method, r.runs, " ".join(map(str, r.seeds)), *r.final_acc, *r.best_acc,
                             " ".join(map(str, r.rounds)), *r.wall_s, *r.throughput])
        return buf.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r, "±")) + " |" for r in rows]
    return "\n".join(lines)


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--group-by", "group_by", multiple=True, metavar="KEY",
              help="Dotted job field to group runs by (repeatable) [default: run.name without a seed suffix].")
@click.option("--format", "fmt", type=click.Choice(["markdown", "latex", "csv"]), default="markdown",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the table here too.")
def main(paths: tuple[str, ...], group_by: tuple[str, ...], fmt: str, out: str | None) -> None:
    """Build a results table (mean ± std over seeds) from run logs or run folders."""
    try:
        runs = [load_run(p) for p in find_logs(list(paths))]
        text = render(table_rows(runs, group_by), fmt)
    except RunLogError as e:
        raise click.ClickException(str(e)) from None
    click.echo(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
