"""Small batch vs large batch vs large batch + step scaling vs large batch + teacher, at equal iterations.

Runs every method (a job file in jobs/experiment/) for several seeds through `mpirun`, then prints
one row per method (final and best test accuracy as mean ± std over seeds, wall time, and for the
scaled methods the share of rounds the detector called critical and the mean scale factor) and
draws two PNGs:

    accuracy_vs_iteration.png   test accuracy (and training loss) against round, mean ± std band
    scale_and_critical.png      one seed of the step method: scale, critical flag, gradient norm

    python analysis/large_batch.py                          # run what is missing, then analyse
    python analysis/large_batch.py --seeds 1,2,3 --out runs/large-batch
    python analysis/large_batch.py --logs-only              # analyse the logs already there
    python analysis/large_batch.py --methods large-batch-step-sqrt   # add a method to the default four
    python analysis/large_batch.py --set optim.lr=0.05 --out runs/large-batch-lr0.05   # another setting

A run whose run.h5 holds all its rounds is skipped, so an interrupted sweep resumes where it stopped;
a run stopped by a signal is resumed from its checkpoint; any other partial run is reported and left
for the user to remove (nothing here deletes logs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from mpifed.analysis import RunLogError, load_run, summarize
from mpifed.analysis.load import Run

from sweep_runs import launch, launchers, mean_std, plus_minus, run_dir

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("small-batch", "large-batch", "large-batch-step", "large-batch-teacher")
STEP_METHODS = ("step", "step+teacher")


@dataclass(frozen=True)
class MethodRuns:
    method: str
    runs: list[Run]

    @property
    def scaling(self) -> str:
        return str(self.runs[0].job.get("scaling", {}).get("method", "none"))


def table(groups: list[MethodRuns]) -> str:
    """Markdown table, one row per method. Critical share and scale only where a policy acts on them."""
    header = ("method", "seeds", "final test acc (%)", "per seed (%)", "best test acc (%)", "wall time (s)",
              "critical rounds (%)", "mean scale", "mean teacher std")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        sums = [summarize(r) for r in g.runs]
        seeds = [int(r.job.get("run", {}).get("seed", -1)) for r in g.runs]
        scaled = g.scaling != "none"
        crit = mean_std([float(np.nanmean(r.server["critical"])) for r in g.runs]) if scaled else (math.nan,) * 2
        scale = (mean_std([float(np.nanmean(r.server["scale"])) for r in g.runs]) if g.scaling in STEP_METHODS
                 else (math.nan,) * 2)
        teacher = (mean_std([float(np.nanmean(r.server["teacher_std"])) for r in g.runs])
                   if "teacher" in g.scaling else (math.nan,) * 2)
        lines.append("| " + " | ".join([
            g.method, ",".join(map(str, seeds)), plus_minus(mean_std([s.accuracy.final for s in sums]), 100),
            " / ".join(f"{100 * s.accuracy.final:.1f}" for s in sums),
            plus_minus(mean_std([s.accuracy.best for s in sums]), 100),
            plus_minus(mean_std([s.wall_s for s in sums]), 1, 1),
            plus_minus(crit, 100, 1), plus_minus(scale, 1, 2), plus_minus(teacher, 1, 4)]) + " |")
    return "\n".join(lines)


def _band(ax, x: np.ndarray, ys: list[np.ndarray], label: str, color) -> None:
    """Mean line and mean ± std band over seeds (runs cut to the shortest)."""
    n = min(len(y) for y in ys)
    stack = np.vstack([y[:n] for y in ys])
    mean = np.nanmean(stack, axis=0)
    ax.plot(x[:n], mean, color=color, label=f"{label} (n={len(ys)})")
    if len(ys) > 1:
        std = np.nanstd(stack, axis=0, ddof=1)
        ax.fill_between(x[:n], mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean over the last k rounds (fewer at the start): per-round loss is too noisy to read."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - k)
    return (c[i] - c[lo]) / (i - lo)


def plot_accuracy(groups: list[MethodRuns], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10").colors
    for i, g in enumerate(groups):
        color = colors[i % len(colors)]
        _band(acc_ax, g.runs[0].eval["round"], [100 * r.eval["test_acc"] for r in g.runs], g.method, color)
        rounds = np.arange(1, g.runs[0].rounds + 1)
        _band(loss_ax, rounds, [_smooth(r.server["train_loss"], 5) for r in g.runs], g.method, color)
    acc_ax.set(xlabel="round (= iteration)", ylabel="test accuracy (%)",
               title="Test accuracy, mean ± std over seeds")
    loss_ax.set(xlabel="round (= iteration)", ylabel="training loss (mean of the last 5 rounds)",
                title="Training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scale(run: Run, path: Path) -> Path:
    """What the step policy did in one run: the factor, the critical flag, and the signal behind it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = run.server
    cfg = run.job.get("scaling", {})
    rounds = np.arange(1, run.rounds + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    critical = s["critical"] > 0.5
    for ax in (top, bottom):
        ax.fill_between(rounds, 0, 1, where=critical, step="mid", transform=ax.get_xaxis_transform(),
                        color="tab:red", alpha=0.12, linewidth=0, label="critical phase")
    top.step(rounds, s["scale"], where="mid", color="tab:blue", label="scale applied")
    top.set(ylabel="gradient scale", title=f"{run.name}: step scaling and the critical-phase detector "
                                           f"(window {cfg.get('window')}, threshold {cfg.get('threshold')}, "
                                           f"warmup {cfg.get('warmup')})")
    top.set_ylim(0, max(1.0, float(np.nanmax(s["scale"]))) * 1.15)
    bottom.semilogy(rounds, s["grad_norm"], color="tab:gray", label="|aggregated gradient|")
    bottom.set(xlabel="round (= iteration)", ylabel="gradient norm")
    rel = bottom.twinx()
    rel.plot(rounds, np.clip(s["rel_change"], 1e-3, None), color="tab:green", drawstyle="steps-mid",
             label="relative change")
    rel.axhline(float(cfg.get("threshold", np.nan)), color="tab:green", linestyle=":", label="threshold")
    rel.set_ylabel("relative change of window mean")
    rel.set_yscale("log")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(loc="lower right", fontsize=8)
    h1, l1 = bottom.get_legend_handles_labels()
    h2, l2 = rel.get_legend_handles_labels()
    bottom.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@click.command()
@click.option("--jobs", "jobs_dir", type=click.Path(file_okay=False, path_type=Path),
              default=ROOT / "jobs" / "experiment", show_default=True, help="Folder of <method>.toml job files.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/large-batch"),
              show_default=True, help="Run folders go here as <method>-s<seed>/; the PNGs too unless --figures.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated run.seed values.")
@click.option("--methods", "extra", multiple=True, help="A further job in --jobs to include (repeatable).")
@click.option("--only", multiple=True, help="Use exactly these methods instead of the default four (repeatable).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Job override for every new run, e.g. optim.lr=0.05 (repeatable); use its own --out.")
@click.option("--ranks", default=5, show_default=True,
              help="mpirun -n: 1 server + ranks-1 clients (sets clients.count of new runs; the jobs have 4).")
@click.option("--logs-only", is_flag=True, help="Launch nothing; analyse the logs that exist.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNGs [default: --out].")
@click.option("--step-seed", type=int, default=None, help="Seed of the run in scale_and_critical.png "
                                                            "[default: the first seed].")
def main(jobs_dir: Path, out: Path, seeds: str, extra: tuple[str, ...], only: tuple[str, ...],
         overrides: tuple[str, ...], ranks: int, logs_only: bool, figures: Path | None,
         step_seed: int | None) -> None:
    """Run and compare the large-batch methods at equal iterations (see the module docstring)."""
    methods = list(only or (*METHODS, *[m for m in extra if m not in METHODS]))
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    missing = [m for m in methods if not (jobs_dir / f"{m}.toml").exists()]
    if missing:
        raise click.ClickException(f"no job file for {', '.join(missing)} in {jobs_dir} "
                                   f"(there: {', '.join(sorted(p.stem for p in jobs_dir.glob('*.toml')))})")
    failed = 0
    if not logs_only:
        out.mkdir(parents=True, exist_ok=True)
        mpirun, mpifed = launchers()
        for seed in seed_list:  # seed-major: after any interruption every method has as many seeds as possible
            for m in methods:
                failed += not launch(jobs_dir / f"{m}.toml", out, m, seed, ranks, mpirun, mpifed, overrides)

    groups = []
    for m in methods:
        runs = []
        for seed in seed_list:
            path = run_dir(out, m, seed) / "run.h5"
            if not path.exists():
                click.echo(f"note: {path} missing; {m} has fewer seeds", err=True)
                continue
            try:
                run = load_run(path)
            except RunLogError as e:
                click.echo(f"note: {e}", err=True)
                continue
            want = int(run.job.get("train", {}).get("rounds", 0))
            if run.rounds < want:  # still running, or stopped: its accuracy is not the final one
                click.echo(f"note: {path} holds {run.rounds}/{want} rounds; left out", err=True)
                continue
            runs.append(run)
        if runs:
            groups.append(MethodRuns(m, runs))
    if not groups:
        raise click.ClickException(f"no run logs under {out}; run without --logs-only first")
    click.echo(table(groups))

    figures = figures or out
    click.echo(f"wrote {plot_accuracy(groups, figures / 'accuracy_vs_iteration.png')}")
    step = next((g for g in groups if g.scaling in STEP_METHODS), None)
    if step is None:
        click.echo("note: no step-scaling method among the runs; scale_and_critical.png not drawn", err=True)
    else:
        wanted = step_seed if step_seed is not None else seed_list[0]
        run = next((r for r in step.runs if int(r.job["run"]["seed"]) == wanted), step.runs[0])
        click.echo(f"wrote {plot_scale(run, figures / 'scale_and_critical.png')}")
    if failed:
        raise click.ClickException(f"{failed} run(s) failed; see the .log files in {out}")


if __name__ == "__main__":
    main()
