"""PNG figures of one or several runs; several runs are overlaid (curves) or set side by side (bars).

Each figure is a function of the runs that returns it (for tests to inspect) and draws arrays that a pure
function returns (mpifed.analysis.curves, .clients, .summary, and server_series below), so tests check
the data a plot shows, not only that a PNG exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from mpifed.analysis.figure import color, integer_ticks, labels, legend_row, plt, save
from mpifed.analysis.load import Run
from mpifed.analysis.plot_clients import plot_batches, plot_clients
from mpifed.analysis.plot_learning import plot_curves
from mpifed.analysis.summary import PHASES, breakdown, server_rank

# Server series worth a panel, when the log has them and they are not all NaN (datasets a log lacks
# are skipped).
SERVER_SERIES = ("lr", "grad_norm", "train_loss", "rel_change", "critical", "scale", "noise_scale", "teacher_std")
ZERO_WITHOUT_USE = ("teacher_std",)  # all 0 in a run whose method does not use it: no panel
STEPS = ("critical", "scale", "lr")  # held for a round: drawn as steps
FROM_ZERO = ("critical", "scale")  # flags and factors: a y axis from 0 (a flat 1 is not a tiny wiggle)


def rank_labels(run: Run) -> list[str]:
    """'rank r' and its role (profile) under it, per rank."""
    profile = run.ranks.get("profile", np.full(run.world_size, "-", dtype=object))
    return [f"{r}\n{role}" + ("" if str(p) in ("", "-", "native") else f"\n({p})")
            for r, (role, p) in enumerate(zip(run.ranks["role"], profile))]


def plot_breakdown(runs: list[Run]) -> plt.Figure:
    """Stacked bars: each rank's mean round split into phases, one panel per run, one y axis for all
    (the tallest bar of any run fits), the phases' legend in a row under the title."""
    parts = [breakdown(run, "mean") for run in runs]
    tallest = max((np.nansum([np.nan_to_num(p[phase]) for phase in PHASES], axis=0).max(initial=0.0)
                   for p in parts), default=0.0)
    fig, axes = plt.subplots(1, len(runs), figsize=(max(5.0, 1.2 + 0.9 * max(r.world_size for r in runs))
                                                    * len(runs), 4.8), squeeze=False)
    shown = set()
    for ax, run, label, part in zip(axes[0], runs, labels(runs), parts):
        x = np.arange(run.world_size)
        bottom = np.zeros(run.world_size)
        for i, phase in enumerate(PHASES):
            values = np.nan_to_num(part[phase])
            if values.any():
                ax.bar(x, values, bottom=bottom, color=color(i))
                bottom += values
                shown.add(phase)
        ax.set_xticks(x, rank_labels(run), fontsize=8)
        ax.set_xlabel("rank", fontsize=8)
        ax.set_ylim(0, 1.05 * tallest if tallest > 0 else 1.0)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("mean seconds per round")
    phases = [p for p in PHASES if p in shown]
    fig.suptitle("round time per rank")
    top = legend_row(fig, [Patch(color=color(PHASES.index(p)), label=p) for p in phases], below=0.4)
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def server_series(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(round, value) of every series of SERVER_SERIES the log holds with a number in it, and the
    server's round time as "t_iter"."""
    rounds = np.arange(1, run.rounds + 1)
    out = {name: (rounds, run.server[name]) for name in SERVER_SERIES
           if name in run.server and np.isfinite(run.server[name]).any()
           and (name not in ZERO_WITHOUT_USE or np.nanmax(np.abs(run.server[name])) > 0)}
    out["t_iter"] = (rounds, run.iter["t_iter"][:, server_rank(run)])
    return out


def plot_server(runs: list[Run]) -> plt.Figure:
    """One panel per server series present in any run (learning rate, gradient norm, loss, the scaling
    policy's statistics) and the server's round time; one legend of the runs above the panels."""
    series = [server_series(run) for run in runs]
    panels = [n for n in (*SERVER_SERIES, "t_iter") if any(n in s for s in series)]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.3), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for i, s in enumerate(series):
            if name in s:
                ax.plot(*s[name], lw=1, color=color(i), drawstyle="steps-mid" if name in STEPS else "default")
        ax.set_xlim(0.5, max(run.rounds for run in runs) + 0.5)  # every panel the same rounds
        if name in FROM_ZERO:
            ax.set_ylim(bottom=0)
        ax.set_title("server round time (s)" if name == "t_iter" else name, fontsize=10)
        ax.set_xlabel("round")
        integer_ticks(ax)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    top = legend_row(fig, [Line2D([], [], color=color(i), lw=2, label=label)
                           for i, label in enumerate(labels(runs))])
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    """Every figure of FIGURES into `out`, as PNGs."""
    out = Path(out)
    return [save(draw(runs), out / name) for name, draw in FIGURES.items()]


# What `mpifed analyze` writes: file name, the function that draws it.
FIGURES = {"loss.png": lambda runs: plot_curves(runs, "loss"),
           "accuracy.png": lambda runs: plot_curves(runs, "accuracy"), "clients.png": plot_clients,
           "batches.png": plot_batches, "breakdown.png": plot_breakdown, "server.png": plot_server}
