"""`mpifed plan PROFILE.json --global-batch B | --maximize`: per-client batches and predictions.

Reads the file `mpifed profile` wrote; needs no MPI and no GPU. Edit caps or curves in the JSON to
ask "what if". Example:

    mpifed plan runs/prof.json --global-batch 2048
    mpifed plan runs/prof.json --maximize --min-fraction 0.9
"""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from mpifed.perf.profile_file import load_profile
from mpifed.perf.report import SMALL_BATCH, PlanReport, plan_report


def render(report: PlanReport, console: Console) -> None:
    """Print the per-client table and the round summary."""
    pred = report.plan.prediction
    table = Table(title=f"plan: global batch {report.plan.global_batch}")
    for col in ("client", "cap", "batch", "uniform", "step (ms)", "idle (ms)"):
        table.add_column(col, justify="right")
    for k, (b, t, idle) in enumerate(zip(report.plan.batches, pred.t_clients, pred.idle())):
        table.add_row(str(k), str(report.caps[k]),
                      str(b), str(report.uniform_batches[k]), f"{1e3 * t:.2f}", f"{1e3 * idle:.2f}")
    console.print(table)
    comm = ", ".join(f"{k} {1e3 * v:.2f}" for k, v in pred.t_collectives.items())
    console.print(f"round {1e3 * pred.t_round:.2f} ms = slowest client {1e3 * pred.t_compute_max:.2f} "
                  f"+ comm {1e3 * pred.t_comm:.2f} ({comm}) + server {1e3 * pred.t_server:.2f}")
    console.print(f"throughput {pred.throughput:,.0f} samples/s; bound by {pred.bound_by}")
    console.print(f"speedup {report.speedup_vs_uniform:.2f}x vs uniform split, "
                  f"{report.speedup_vs_one_client:.2f}x vs one client (client {report.one_client_id}), "
                  f"{report.speedup_vs_small_batch:.2f}x vs small batch "
                  f"({report.small_batch.global_batch} global)")


@click.command("plan")
@click.argument("profile_path", metavar="PROFILE", type=click.Path(exists=True, dir_okay=False))
@click.option("--global-batch", "-B", type=int, default=None,
              help="Global batch B (samples per round, summed over clients) to split.")
@click.option("--maximize", is_flag=True, help="Choose the global batch with the best throughput.")
@click.option("--min-fraction", type=float, default=1.0, show_default=True,
              help="With --maximize: smallest B within this fraction of the best throughput.")
@click.option("--small-batch", type=int, default=SMALL_BATCH, show_default=True,
              help="Per-client batch of the small-batch baseline the speedup is measured against.")
def plan(profile_path: str, global_batch: int | None, maximize: bool, min_fraction: float,
         small_batch: int) -> None:
    """Split a global batch over the profiled clients so that nobody waits for a straggler."""
    if (global_batch is None) == (not maximize):
        raise click.UsageError("give exactly one of --global-batch B or --maximize")
    try:
        report = plan_report(load_profile(profile_path), global_batch,
                             min_fraction if maximize else None, small_batch)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    render(report, Console())
