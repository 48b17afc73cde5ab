"""Compression ratio against batch size: where does test accuracy hold?

The paper argues that large batches make training robust to aggressive gradient compression. This
runs the base job jobs/experiment/compression.toml at two per-client batch sizes, each with dense
fp32 updates and top-k (with error feedback) at decreasing densities, at equal rounds, then prints
final test accuracy per (batch, codec) with its drop from dense at the same batch, and draws
accuracy against the compression ratio (bytes of dense fp32 / bytes sent), one line per batch.

    python analysis/compression_sweep.py --out runs/compression          # run what is missing, analyse
    python analysis/compression_sweep.py --out runs/compression --logs-only
    python analysis/compression_sweep.py --batches 8,64 --densities 0.1,0.01,0.001 --seeds 1,2
    python analysis/compression_sweep.py --ranks 3 --rounds 50 --out runs/compression-n3   # a small machine

As in large_batch.py, a run whose run.h5 holds all its rounds is skipped and one stopped by a signal
resumes from its checkpoint. --ranks, --rounds and --set apply to new runs only, so give each setting
its own --out.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from mpifed.analysis import RunLogError, load_run, summarize

from sweep_runs import launch, launchers, mean_std, run_dir

ROOT = Path(__file__).resolve().parents[1]


def methods(batches: list[int], densities: list[float]) -> dict[str, tuple[int, float, list[str]]]:
    """name -> (per-client batch, top-k density (1.0 = dense), job overrides)."""
    out = {}
    for b in batches:
        out[f"b{b}-dense"] = (b, 1.0, [f"train.batch={b}"])
        for d in densities:
            out[f"b{b}-topk{d:g}"] = (b, d, [f"train.batch={b}", 'compress.codec="topk"',
                                             f"compress.options={{density = {d}, error_feedback = true}}"])
    return out


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/compression"),
              show_default=True)
@click.option("--batches", default="8,64", show_default=True, help="Per-client batch sizes.")
@click.option("--densities", default="0.1,0.01,0.001", show_default=True, help="top-k densities.")
@click.option("--seeds", default="1", show_default=True)
@click.option("--ranks", default=5, show_default=True,
              help="mpirun -n: 1 server + ranks-1 clients (sets clients.count; the job has 4).")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="train.rounds of every new run [default: the job's, 150].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Job override for every new run, e.g. optim.lr=0.05 (repeatable); use its own --out.")
@click.option("--logs-only", is_flag=True, help="Only analyse the logs already in --out.")
@click.option("--figure", type=click.Path(path_type=Path), default=None,
              help="PNG path [default: <out>/accuracy_vs_compression.png].")
def main(out: Path, batches: str, densities: str, seeds: str, ranks: int, rounds: int | None,
         overrides: tuple[str, ...], logs_only: bool, figure: Path | None) -> None:
    """Run the grid of (batch, codec) runs and compare their final accuracy (see the module docstring)."""
    grid = methods([int(b) for b in batches.split(",")], [float(d) for d in densities.split(",")])
    seed_list = [int(s) for s in seeds.split(",")]
    job = ROOT / "jobs" / "experiment" / "compression.toml"
    out.mkdir(parents=True, exist_ok=True)
    common = (*([f"train.rounds={rounds}"] if rounds else []), *overrides)
    failed = 0
    if not logs_only:
        mpirun, mpifed = launchers()
        for name, (_, _, sets) in grid.items():
            for seed in seed_list:
                failed += not launch(job, out, name, seed, ranks, mpirun, mpifed, (*common, *sets))
    rows = []
    for name, (batch, density, _) in grid.items():
        accs, ratios = [], []
        for seed in seed_list:
            try:
                run = load_run(run_dir(out, name, seed) / "run.h5")
            except RunLogError:
                continue
            want = int(run.job.get("train", {}).get("rounds", 0))
            if run.rounds < want:  # a stopped run's last evaluation is not a final accuracy
                click.echo(f"skip   {run_dir(out, name, seed).name}: {run.rounds}/{want} rounds logged", err=True)
                continue
            accs.append(summarize(run).accuracy.final)
            sent = float(np.nanmedian(run.iter["bytes_up"][:, 1:]))
            ratios.append(4 * float(run.attrs["n_params"]) / sent)
        if accs:
            rows.append((batch, density, name, mean_std(accs), float(np.median(ratios)), len(accs)))
    if failed:
        click.echo(f"{failed} run(s) failed; the table below leaves them out", err=True)
    if not rows:
        raise click.ClickException(f"no complete logs in {out} (a log is complete when it holds all its rounds)")
    dense = {b: acc[0] for b, d, _, acc, _, _ in rows if d == 1.0}
    click.echo("| batch/client | codec | compression | runs | final test acc (%) | vs dense, same batch |")
    click.echo("|---|---|---|---|---|---|")
    for batch, density, name, (mean, std), r, k in rows:
        codec = "dense fp32" if density == 1.0 else f"top-k {density:g} + EF"
        drop = f"{100 * (mean - dense[batch]):+.1f} pts" if batch in dense else "-"
        acc = f"{100 * mean:.1f}" + (f" +- {100 * std:.1f}" if k > 1 else "")
        click.echo(f"| {batch} | {codec} | {r:.1f}x | {k} | {acc} | {drop} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r[0] for r in rows}):
        pts = sorted((r[4], 100 * r[3][0]) for r in rows if r[0] == batch)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{batch} samples/client")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (dense fp32 bytes / bytes sent)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("top-k + error feedback at equal rounds")
    ax.grid(alpha=0.3)
    ax.legend()
    path = figure or out / "accuracy_vs_compression.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    click.echo(f"figure: {path}")


if __name__ == "__main__":
    main()
