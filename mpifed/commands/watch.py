"""`mpifed watch RUN.h5`: follow a running job from its log, from any shell that sees the file.

Opens the log read-only (with SWMR while a job writes it), so it never disturbs the writer, and reads only
the rows added since the last look. Stops when the run has logged all its rounds, when no round arrived for
`--idle` seconds (a job that ended early or hangs), or at once with `--once`. Example:

    mpirun -n 4 mpifed train --name a &  mpifed watch runs/a/run.h5
"""

from __future__ import annotations

import time

import click

# Datasets read each refresh; the row count is the least of theirs (the writer grows them one by one).
ROUND_DATA = ("iter/t_iter", "iter/batch", "server/train_loss")
EVAL_DATA = ("eval/round", "eval/test_acc")
MAX_RANKS_LISTED = 9  # above this, t_iter is shown as min / median / max and the slowest rank


def _open(path: str, wait: float, interval: float):
    """Open the log, waiting up to `wait` seconds for a job that has not created it yet."""
    from mpifed.analysis.load import LogUnavailable, open_log

    deadline = time.monotonic() + wait
    while True:
        try:
            return open_log(path)
        except LogUnavailable:  # not yet created, or still being set up; other errors are final
            if time.monotonic() >= deadline:
                raise
        time.sleep(interval)


def _rows(f, names: tuple[str, ...]) -> int:
    for name in names:
        f[name].refresh()
    return min(f[name].shape[0] for name in names)


def _t_iter_text(t_iter, roles: list[str]) -> str:
    import numpy as np

    ms = 1e3 * t_iter
    if len(ms) <= MAX_RANKS_LISTED:
        return "t_iter ms " + " ".join(f"{r}:{v:.0f}" for r, v in enumerate(ms))
    slowest = int(np.nanargmax(ms))
    return (f"t_iter ms min {np.nanmin(ms):.0f} med {np.nanmedian(ms):.0f} max {ms[slowest]:.0f} "
            f"(rank {slowest}, {roles[slowest]})")


def status_line(f, first: int, last: int, total: int | None, roles: list[str]) -> str:
    """The state after round `last` (1-based); throughput over rounds first+1..last."""
    import numpy as np

    clients = [r for r, role in enumerate(roles) if role != "server"]
    server = roles.index("server") if "server" in roles else 0
    t_iter = f["iter/t_iter"][first:last]
    samples = np.nansum(f["iter/batch"][first:last][:, clients])
    seconds = np.nansum(t_iter[:, server])
    rate = f"{samples / seconds:,.0f} samples/s" if seconds > 0 else "- samples/s"
    loss = float(f["server/train_loss"][last - 1])
    n_eval = _rows(f, EVAL_DATA)
    acc = (f"acc {f['eval/test_acc'][n_eval - 1]:.3f} (round {f['eval/round'][n_eval - 1]:.0f})"
           if n_eval else "acc -")
    of = f"/{total}" if total else ""
    return f"round {last}{of}  loss {loss:.3f}  {acc}  {rate}  {_t_iter_text(t_iter[-1], roles)}"


@click.command("watch")
@click.argument("path", metavar="RUN.h5")
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between looks at the log.")
@click.option("--idle", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="Stop when no new round arrived for this many seconds (also: how long to wait "
                   "for the log to appear).")
@click.option("--once", is_flag=True, help="Print the latest round and stop.")
def watch(path: str, interval: float, idle: float, once: bool) -> None:
    """Follow a running job: round, training loss, latest test accuracy, samples/s and each rank's
    round time, one line per new round seen. PATH is a run.h5 or the run folder holding it."""
    import tomllib

    from mpifed.analysis.load import RunLogError

    try:
        p, f = _open(path, 0.0 if once else idle, interval)
    except RunLogError as e:
        raise click.ClickException(str(e)) from None
    with f:
        try:
            total = int(tomllib.loads(f.attrs["job"])["train"]["rounds"])
        except (KeyError, ValueError, TypeError, tomllib.TOMLDecodeError):
            total = None
        roles = list(f["ranks/role"].asstr()[()])
        seen, grew = 0, time.monotonic()
        while True:
            rows = _rows(f, ROUND_DATA)
            if rows > seen:
                click.echo(status_line(f, seen, rows, total, roles))
                seen, grew = rows, time.monotonic()
            elif once:
                click.echo(f"{p}: no round logged yet")
            if once:
                return
            if total is not None and seen >= total:
                click.echo(f"run complete: {seen} rounds")
                return
            if time.monotonic() - grew > idle:
                click.echo(f"no new round for {idle:.0f} s after round {seen}; stopping")
                return
            time.sleep(interval)
