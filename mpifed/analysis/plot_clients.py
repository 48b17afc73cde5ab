"""clients.png and batches.png: per-client views (participation, loss, update norm, time) and each
client's batch per round, readable at a hundred clients: clients are an axis, never one line each."""

from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D

from mpifed.analysis.clients import ClientGrid, client_grid
from mpifed.analysis.figure import LEGEND, color, integer_ticks, labels, plt
from mpifed.analysis.load import Run
from mpifed.analysis.summary import samples_per_round

# The panels of clients.png: (field of ClientGrid, statistic per client, y label); participation first.
PANELS = (("participation", "", "rounds trained"), ("loss", "mean", "loss (mean over its rounds)"),
          ("grad_norm", "mean", "update norm (mean)"), ("t_compute", "median", "round time (s, median)"))


def client_panel(grid: ClientGrid, field: str, stat: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, low, high) per client: the statistic and the range over the rounds it trained (NaN where
    it never trained); participation has no range."""
    if field == "participation":
        p = grid.participation.astype(float)
        return p, p, p
    return grid.per_client(field, stat), grid.per_client(field, "min"), grid.per_client(field, "max")


def plot_clients(runs: list[Run]) -> plt.Figure:
    """Per client (x: client id): how often it trained and its loss, update norm and round time, each with
    its range over the rounds as a bar; runs side by side in their colours."""
    grids = [client_grid(run) for run in runs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    width = 0.8 / len(runs)
    for ax, (field, stat, ylabel) in zip(axes.flat, PANELS):
        for i, grid in enumerate(grids):
            x = np.arange(grid.clients) + (i - (len(runs) - 1) / 2) * width
            value, low, high = client_panel(grid, field, stat)
            if field == "participation":
                ax.bar(x, value, width=width, color=color(i))
                integer_ticks(ax, "y")
            else:
                ax.vlines(x, low, high, color=color(i), alpha=0.35, lw=1 if grid.clients > 30 else 2.5)
                ax.plot(x, value, "o", color=color(i), ms=3 if grid.clients > 30 else 5)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("client")
        integer_ticks(ax)
    handles = [Line2D([], [], color=color(i), lw=6, label=label) for i, label in enumerate(labels(runs))]
    axes[0][1].legend(handles=handles, loc="best", **LEGEND)
    fig.suptitle("per client: how often it trained; its loss, update norm and time (lines: the range over the "
                 "rounds it trained)", fontsize=10)
    fig.tight_layout()
    return fig


def global_batch(run: Run) -> np.ndarray:
    """(T,) the global batch of each round: the server's, else the clients' batches summed."""
    logged = run.server.get("global_batch")
    if logged is not None and np.isfinite(logged).all():
        return logged
    return samples_per_round(run)


def plot_batches(runs: list[Run]) -> plt.Figure:
    """Each run's batch per client and round as a map (blank: the client did not train), and every run's
    global batch with the server's gradient scale factor on a second axis when it ever left 1."""
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4.6 * (len(runs) + 1), 4.2), squeeze=False)
    maps, total = axes[0][:-1], axes[0][-1]
    scale_ax = None
    batches = [client_grid(run).values["batch"] for run in runs]
    largest = max((np.nanmax(b) for b in batches if np.isfinite(b).any()), default=1.0)
    for i, (run, label, ax, batch) in enumerate(zip(runs, labels(runs), maps, batches)):
        image = ax.imshow(np.ma.masked_invalid(batch), aspect="auto", interpolation="nearest", origin="lower",
                          cmap="viridis", vmin=0, vmax=largest,  # one colour scale: colours compare across runs
                          extent=(0.5, run.rounds + 0.5, -0.5, batch.shape[0] - 0.5))
        fig.colorbar(image, ax=ax, label="client batch (samples)")
        same = np.unique(batch[np.isfinite(batch)])
        ax.set_title(label + (f": every batch {same[0]:g}" if len(same) == 1 else ""), fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("client")
        integer_ticks(ax)
        integer_ticks(ax, "y")
        rounds = np.arange(1, run.rounds + 1)
        total.step(rounds, global_batch(run), where="mid", color=color(i), label=f"{label}: global batch")
        scale = run.server.get("scale")
        if scale is not None and np.isfinite(scale).any() and np.nanmax(np.abs(scale - 1)) > 0:
            scale_ax = scale_ax or total.twinx()
            scale_ax.plot(rounds, scale, ls="--", color=color(i), drawstyle="steps-mid",
                          label=f"{label}: scale")
    total.set_ylabel("global batch (samples per round)")
    total.set_ylim(bottom=0)
    handles, names = total.get_legend_handles_labels()
    if scale_ax is not None:
        scale_ax.set_ylabel("gradient scale factor")
        scale_ax.set_ylim(bottom=0)
        more = scale_ax.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    total.legend(handles, names, loc="lower right", **LEGEND)
    total.set_xlabel("round")
    integer_ticks(total)
    total.grid(alpha=0.3)
    fig.tight_layout()
    return fig
