"""What every PNG of `mpifed analyze` shares: matplotlib's Agg backend (no display on cluster nodes and in
CI), run labels, the legend inside the axes, and a write that never leaves part of a PNG."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mpifed.analysis.load import Run  # noqa: E402
from mpifed.diskfull import write_whole  # noqa: E402

DPI = 110
COLORS = plt.get_cmap("tab10").colors
LEGEND = dict(fontsize=8, framealpha=0.85)


def labels(runs: list[Run]) -> list[str]:
    """Run names, made unique (two runs may share a name in different directories)."""
    names = [r.name for r in runs]
    return [f"{n} [{i}]" if names.count(n) > 1 else n for i, n in enumerate(names)]


def color(i: int) -> tuple:
    """Run i's colour, the same in every figure."""
    return COLORS[i % len(COLORS)]


def integer_ticks(ax: plt.Axes, axis: str = "x") -> None:
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def save(fig: plt.Figure, path: Path) -> Path:
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


def legend_row(fig: plt.Figure, handles: list, below: float = 0.0) -> float:
    """One legend for every panel, in rows across the top of the figure `below` inches under its top edge,
    as many entries a row as the figure's width holds (it never runs off the sides); returns the top of
    the area left for the panels, as a fraction of the figure's height (for tight_layout's rect)."""
    width, height = fig.get_size_inches()
    entry = max(0.5 + 0.075 * len(h.get_label()) for h in handles)  # inches: the key, the label, a gap
    ncol = max(1, min(len(handles), int((width - 0.3) // entry)))
    rows = -(-len(handles) // ncol)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - below / height), ncol=ncol, **LEGEND)
    return 1 - (below + 0.1 + 0.22 * rows) / height
