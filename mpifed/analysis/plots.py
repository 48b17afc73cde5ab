"""PNG figures of one or several runs; several runs are overlaid (curves) or set side by side (bars).

Uses matplotlib's Agg backend, so it works on cluster nodes and in CI without a display. Every
writer takes a list of Runs and a file path and returns the path it wrote.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mpifed.analysis.load import Run  # noqa: E402
from mpifed.analysis.summary import PHASES, breakdown, server_rank  # noqa: E402
from mpifed.diskfull import write_whole  # noqa: E402

# Server series worth a panel, when the log has them and they are not all NaN (datasets a log lacks
# are skipped).
SERVER_SERIES = ("lr", "grad_norm", "train_loss", "rel_change", "critical", "scale", "noise_scale", "teacher_std")
DPI = 110


def _rank_label(run: Run, r: int) -> str:
    role = str(run.ranks["role"][r])
    profile = str(run.ranks["profile"][r]) if "profile" in run.ranks else ""
    return role if profile in ("", "-", "native") else f"{role}\n({profile})"


def _labels(runs: list[Run]) -> list[str]:
    """Run names, made unique (two runs may share a name in different directories)."""
    names = [r.name for r in runs]
    return [f"{n} [{i}]" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _save(fig: plt.Figure, path: Path) -> Path:
    """The figure as a PNG, replaced whole: a full disk leaves the old plot (or none), never part of one,
    and says so in a DiskFullError."""
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    write_whole(path, lambda fh: fh.write(image.getbuffer()), f"plot {path.name}",
                lambda: "free space there, or write the plots elsewhere (--out DIR) or not at all (--no-plots)",
                lambda: image.getbuffer().nbytes)
    return path


def plot_breakdown(runs: list[Run], path: Path) -> Path:
    """Stacked bars: each rank's mean round split into phases, one panel per run, shared y axis."""
    fig, axes = plt.subplots(1, len(runs), figsize=(max(5.0, 1.2 + 0.9 * max(r.world_size for r in runs))
                                                    * len(runs), 4.5), sharey=True, squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, run, label in zip(axes[0], runs, _labels(runs)):
        parts = breakdown(run, "mean")
        x = np.arange(run.world_size)
        bottom = np.zeros(run.world_size)
        for i, phase in enumerate(PHASES):
            values = np.nan_to_num(parts[phase])
            if values.any():
                ax.bar(x, values, bottom=bottom, color=colors[i % len(colors)], label=phase)
                bottom += values
        ax.set_xticks(x, [_rank_label(run, r) for r in range(run.world_size)], fontsize=8)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("mean seconds per round")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend([handles[p] for p in PHASES if p in handles], [p for p in PHASES if p in handles],
               loc="upper right", fontsize=8)
    fig.suptitle("round time per rank")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    return _save(fig, path)


def plot_accuracy(runs: list[Run], path: Path) -> Path:
    """Test accuracy against round and against wall time, every run overlaid."""
    fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for run, label in zip(runs, _labels(runs)):
        acc = run.eval.get("test_acc")
        if acc is None or not len(acc):
            continue
        by_round.plot(run.eval["round"], acc, marker="o", ms=3, label=label)
        by_time.plot(run.eval["wall"], acc, marker="o", ms=3, label=label)
    by_round.set_xlabel("round")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_time.set_xlabel("wall time (s)")
    by_round.set_ylabel("test accuracy")
    for ax in (by_round, by_time):
        ax.grid(alpha=0.3)
    if by_round.lines:
        by_round.legend(fontsize=8)
    else:
        by_round.text(0.5, 0.5, "no evaluations logged", ha="center", transform=by_round.transAxes)
    fig.tight_layout()
    return _save(fig, path)


def plot_batches(runs: list[Run], path: Path) -> Path:
    """Each client's batch per round (left) and the global batch, with the server's gradient scale
    factor on a second axis when the log has one (right)."""
    fig, (clients, total) = plt.subplots(1, 2, figsize=(11, 4.2))
    scale_ax = None
    for run, label in zip(runs, _labels(runs)):
        rounds = np.arange(1, run.rounds + 1)
        for r in run.clients:
            clients.step(rounds, run.iter["batch"][:, r], where="post", lw=1,
                         label=f"{label}: {_rank_label(run, r)}".replace("\n", " "))
        line, = total.step(rounds, np.nansum(run.iter["batch"][:, run.clients], axis=1), where="post",
                           label=f"{label}: global batch")
        scale = run.server.get("scale")
        if scale is not None and np.isfinite(scale).any():
            scale_ax = scale_ax or total.twinx()
            scale_ax.plot(rounds, scale, ls="--", color=line.get_color(), label=f"{label}: scale")
    clients.set_ylabel("client batch (samples)")
    total.set_ylabel("global batch (samples per round)")
    handles, names = total.get_legend_handles_labels()
    if scale_ax is not None:
        scale_ax.set_ylabel("gradient scale factor")
        more = scale_ax.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    total.legend(handles, names, fontsize=8)
    for ax in (clients, total):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if len(clients.lines) <= 12:
        clients.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_server(runs: list[Run], path: Path) -> Path | None:
    """One panel per server series present in any run (learning rate, gradient norm, loss, ...), and
    the server's round time; None when no run has any such series."""
    names = [n for n in SERVER_SERIES
             if any(run.server.get(n) is not None and np.isfinite(run.server[n]).any() for run in runs)]
    panels = [*names, "t_iter"]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for run, label in zip(runs, _labels(runs)):
            values = run.iter["t_iter"][:, server_rank(run)] if name == "t_iter" else run.server.get(name)
            if values is not None:
                ax.plot(np.arange(1, len(values) + 1), values, lw=1, label=label)
        ax.set_title("server round time (s)" if name == "t_iter" else name, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if len(runs) > 1:
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    """Every figure above into `out`: breakdown.png, accuracy.png, batches.png, server.png."""
    out = Path(out)
    written = [plot_breakdown(runs, out / "breakdown.png"), plot_accuracy(runs, out / "accuracy.png"),
               plot_batches(runs, out / "batches.png"), plot_server(runs, out / "server.png")]
    return [p for p in written if p is not None]
