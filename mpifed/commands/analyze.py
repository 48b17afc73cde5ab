"""`mpifed analyze RUN.h5 [MORE.h5 ...]`: summary tables and PNG plots of finished (or running) runs.

Needs no MPI and no GPU. Examples:

    mpifed analyze runs/a/run.h5                    # tables, and PNGs into runs/a/
    mpifed analyze runs/a runs/b --out figs/        # side by side; overlaid plots in figs/
    mpifed analyze runs/a/run.h5 --json > a.json    # the summary as JSON, for scripts
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from mpifed.units import format_bytes

if TYPE_CHECKING:  # h5py and numpy load when the command runs, keeping `mpifed --help` quick
    from mpifed.analysis.summary import Summary


def _num(value: float, fmt: str = "{:.3f}") -> str:
    return "-" if value is None or math.isnan(value) else fmt.format(value)


def _ms(value: float) -> str:
    return _num(1e3 * value, "{:.1f}")


def _pct(value: float) -> str:
    return _num(100 * value, "{:.1f}%")


def _bytes(value: float) -> str:
    return "-" if value is None or math.isnan(value) else format_bytes(value)


# (label, how to read it off a Summary): the rows of the run table and of the comparison.
RUN_ROWS = (
    ("rounds", lambda s: str(s.rounds)),
    ("ranks", lambda s: f"{s.world_size} (1 server, {s.client_ranks} workers)"),
    ("clients", lambda s: _clients(s)),
    ("wall time", lambda s: _num(s.wall_s, "{:.2f} s")),
    ("samples / round", lambda s: _num(s.samples_per_round, "{:.0f}")),
    ("throughput", lambda s: _num(s.throughput, "{:,.0f} samples/s")),
    ("throughput, median round", lambda s: _num(s.throughput_median, "{:,.0f} samples/s")),
    ("bytes up / round", lambda s: _bytes(s.bytes_up_per_round)),
    ("bytes down / round", lambda s: _bytes(s.bytes_down_per_round)),
    ("client straggler wait", lambda s: _pct(s.client_wait_share)),
    ("client emulated time", lambda s: _pct(s.client_emul_share)),
    ("final test accuracy", lambda s: _num(s.accuracy.final, "{:.4f}")),
    ("best test accuracy", lambda s: "-" if s.accuracy.evals == 0
     else f"{s.accuracy.best:.4f} (round {s.accuracy.best_round:.0f})"),
    ("final test loss", lambda s: _num(s.accuracy.final_loss, "{:.4f}")),
    ("perf model MdAPE", lambda s: "no model" if s.perf_points == 0
     else f"{s.perf_mdape:.1f}% ({s.perf_points} steady rounds)"),
    ("skipped steps", lambda s: _skipped(s)),
)


def _clients(s: Summary) -> str:
    """N, and how they met the ranks: K sampled a round, all every round on fewer ranks, or one a rank."""
    if s.clients_per_round < s.clients:
        return f"{s.clients:,} ({s.clients_per_round:,} sampled a round)"
    if s.clients > s.client_ranks:
        return f"{s.clients:,} (all every round, several a rank)"
    return f"{s.clients:,} (one a rank)"


def _skipped(s: Summary) -> str:
    k = s.skipped
    if k is None:
        return "not logged"
    if not k.rounds:
        return "none"
    return f"{k.rounds} (first in round {k.first})" + ("; DIVERGED: the run stopped there" if k.diverged else "")


def skipped_warning(s: Summary) -> str | None:
    """A line that no one reading the tables can miss when the server skipped steps."""
    k = s.skipped
    if k is None or not k.rounds:
        return None
    what = ("the run diverged and stopped" if k.diverged
            else "its model did not change in those rounds (a client's bad update, or the start of a divergence)")
    return (f"warning: {s.name}: the server skipped its step in {k.rounds} of {s.rounds} rounds, first in round "
            f"{k.first}: {what}; see /server/skipped and /server/train_loss")


def run_table(s: Summary) -> Table:
    table = Table(title=f"{s.name}  ({s.path})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for label, read in RUN_ROWS:
        table.add_row(label, read(s))
    return table


def rank_table(s: Summary) -> Table:
    """Per rank: mean and median round, the mean of each phase (ms), wait and emulation shares."""
    from mpifed.analysis.summary import PHASES

    phases = [p for p in PHASES if any(r.mean[p] > 0 for r in s.ranks)]
    table = Table(title=f"{s.name}: round time by rank, ms (mean; med = median); shares of the round time")
    for col in ("rank", "role (profile)", "batch", "round", "med", *phases, "wait %", "emul %"):
        table.add_column(col, justify="left" if col == "role (profile)" else "right")
    for r in s.ranks:
        role = r.role if r.profile in ("", "-") else f"{r.role} ({r.profile})"
        table.add_row(str(r.rank), role, _num(r.batch, "{:.0f}"), _ms(r.t_iter_mean),
                      _ms(r.t_iter_median), *(_ms(r.mean[p]) for p in phases),
                      _pct(r.wait_share), _pct(r.emul_share))
    return table


def participation_table(s: Summary) -> Table:
    """Pooled clients: how many trained, how often, and how long a client's round took."""
    p = s.participation
    table = Table(title=f"{s.name}: clients sampled from {p.clients:,}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("trained at least once", f"{p.trained:,} of {p.clients:,}")
    table.add_row("rounds per client", f"min {p.rounds_min}, median {p.rounds_median:g}, max {p.rounds_max}")
    table.add_row("a client's round", f"median {_ms(p.t_compute_median)} ms, p95 {_ms(p.t_compute_p95)} ms")
    table.add_row("slowest clients", ", ".join(map(str, p.slowest)))
    return table


def comparison_table(summaries: list[Summary], settings: list[tuple[str, list[str]]]) -> Table:
    """The runs side by side: first the job settings that differ between them (`settings`, from
    mpifed.analysis.settings.differing_settings), then every row of the run table."""
    table = Table(title="comparison")
    table.add_column("", style="bold")
    for s in summaries:
        table.add_column(s.name, justify="right")
    table.add_row("settings that differ", *("" for _ in summaries), style="italic")
    for name, values in settings or [("(none: the same job)", ["" for _ in summaries])]:
        table.add_row(name, *values)
    table.add_section()
    for label, read in RUN_ROWS:
        table.add_row(label, *(read(s) for s in summaries))
    return table


@click.command("analyze")
@click.argument("paths", nargs=-1, required=True, metavar="RUN.h5...")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for the PNG plots [default: the first log's folder].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (a list when several runs).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots (tables or JSON only).")
def analyze(paths: tuple[str, ...], out: str | None, as_json: bool, no_plots: bool) -> None:
    """Summarise run logs (time per rank, straggler wait, throughput, bytes, accuracy, performance-model
    error) and plot them. A path may be a run.h5 or the run folder holding it; several runs are
    compared side by side and overlaid in the plots."""
    from mpifed.analysis.load import RunLogError, load_run
    from mpifed.analysis.summary import summarize
    from mpifed.diskfull import DiskFullError

    try:
        runs = [load_run(p) for p in paths]
    except RunLogError as e:
        raise click.ClickException(str(e)) from None
    summaries = [summarize(run) for run in runs]
    plots: list[Path] = []
    if not no_plots:
        try:
            from mpifed.analysis.plots import write_plots
        except ModuleNotFoundError as e:
            raise click.ClickException(f"the plots need matplotlib ({e}): pip install matplotlib, "
                                       f"or leave them out with --no-plots") from None
        try:
            plots = write_plots(runs, Path(out) if out else runs[0].path.parent)
        except DiskFullError as e:
            raise click.ClickException(str(e)) from None
    if as_json:
        data = [s.to_dict() for s in summaries]
        for item in data:
            item["plots"] = [str(p) for p in plots]
        click.echo(json.dumps(data[0] if len(data) == 1 else data, indent=2, allow_nan=False))
        return
    # Off a terminal (a pipe, a log file) rich would wrap the tables at 80 columns; rows per rank read
    # better wide.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    for s in summaries:
        console.print(run_table(s))
        console.print(rank_table(s))
        if s.participation is not None:
            console.print(participation_table(s))
    if len(summaries) > 1:
        from mpifed.analysis.settings import differing_settings

        console.print(comparison_table(summaries, differing_settings(runs)))
    for s in summaries:
        warning = skipped_warning(s)
        if warning:
            console.print(warning, style="bold red", markup=False)
    for p in plots:
        console.print(f"wrote {p}")
