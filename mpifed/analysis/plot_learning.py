"""loss.png and accuracy.png: learning curves against rounds, samples seen, bytes sent and wall time, one
panel per x axis, every run overlaid in its own colour (mpifed.analysis.curves says where each point sits)."""

from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter

from mpifed.analysis.curves import AXES, Curve, Curves, learning_curves
from mpifed.analysis.figure import LEGEND, color, integer_ticks, labels, plt
from mpifed.analysis.load import Run

# What each figure draws: (Curves attribute, line style, marker, what the legend calls it).
SERIES = {"loss": (("train_loss", "-", None, "train (clients' batches)"), ("test_loss", "--", "o", "test")),
          "accuracy": (("train_acc", "-", None, "train (clients' batches)"), ("test_acc", "--", "o", "test"))}
LOG_BYTES = 20  # runs whose bytes sent differ more than this many times: bytes on a log axis
YLABEL = {"loss": "loss", "accuracy": "accuracy"}


def _draw(ax: plt.Axes, curve: Curve, axis: str, style: str, marker: str | None, colour: tuple) -> None:
    x = curve.x[axis]
    keep = np.isfinite(x) & np.isfinite(curve.y)
    if keep.any():
        ax.plot(x[keep], curve.y[keep], ls=style, color=colour, lw=1.2, marker=marker, ms=3.5)


def log_bytes(curves: list[Curves]) -> bool:
    """Whether the runs' bytes sent span more than LOG_BYTES times (a compressed run beside an uncompressed
    one): on a linear axis the compressed run's curve would be a vertical line at 0."""
    sent = [c.train_loss.x["bytes"][-1] for c in curves if len(c.train_loss)]
    sent = [b for b in sent if np.isfinite(b) and b > 0]
    return len(sent) > 1 and max(sent) > LOG_BYTES * min(sent)


def plot_curves(runs: list[Run], metric: str) -> plt.Figure:
    """metric "loss": train and test loss; "accuracy": train and test accuracy (the task's metric)."""
    curves = [learning_curves(run) for run in runs]
    fig, axes = plt.subplots(1, len(AXES), figsize=(4.0 * len(AXES), 3.8), sharey=True)
    logarithmic = log_bytes(curves)
    for ax, (axis, xlabel) in zip(axes, AXES):
        for i, c in enumerate(curves):
            for name, style, marker, _ in SERIES[metric]:
                _draw(ax, getattr(c, name), axis, style, marker, color(i))
        ax.grid(alpha=0.3)
        if axis == "bytes" and logarithmic:
            ax.set_xscale("log")  # x = 0, the initial model, is left out
            xlabel += " (log scale)"
        else:
            ax.set_xlim(left=0)
        ax.set_xlabel(xlabel)
        if axis == "round":
            integer_ticks(ax)
        elif axis in ("samples", "bytes"):
            ax.xaxis.set_major_formatter(EngFormatter(unit="B" if axis == "bytes" else "", sep=" "))
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {YLABEL[metric]} logged" if axis == "round" else "nothing logged",
                    ha="center", transform=ax.transAxes)
    axes[0].set_ylabel(YLABEL[metric])
    handles = [Line2D([], [], color=color(i), lw=2, label=label) for i, label in enumerate(labels(runs))]
    if len(SERIES[metric]) > 1:
        handles += [Line2D([], [], color="grey", ls=style, marker=marker, ms=3.5, label=what)
                    for _, style, marker, what in SERIES[metric]]
    axes[0].legend(handles=handles, loc="best", **LEGEND)
    fig.suptitle(f"{YLABEL[metric]}; x = the model after that many rounds, samples, bytes or seconds "
                 f"(0: the initial model)", fontsize=9)
    fig.tight_layout()
    return fig
