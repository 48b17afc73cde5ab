"""`mpifed bench plan`: the batch planner against a uniform split, side by side, same global batch.

Real `mpirun` training jobs in one invocation, identical but for how the global batch is split:
3 clients, one at full speed and two emulating a device 4x slower (profiles speed 0.25), each
asking for --batch samples. The uniform run keeps that split (`[plan] mode = "predict"`, so it pays
the same start-up); the planned run re-splits it with `mode = "balance"`, so the fast client takes
more. They alternate (uniform, planned, uniform, planned, ...: --repeats pairs), so a machine that
drifts during the benchmark weighs on both alike; the median of the pairs' ratios is reported.
Throughput is measured from each log: samples over the server's round times of the steady rounds
(mpifed.analysis.prediction.steady_throughput). The predicted ratio comes from one start-up
profile (the last planned run's), for both splits.

    mpifed bench plan                      # batch 64 per client, 40 rounds, 2 pairs (~3 min on 2 cores)
    mpifed bench plan --batch 32 --rounds 60 --repeats 3
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from mpifed.bench.launch import mpirun

HETERO = ["--set", "profiles.slow.speed=0.25", "--set", 'clients.groups=[{count = 2, profile = "slow"}]',
          "--set", 'clients.profile="native"']


def _train(out: Path, name: str, mode: str, batch: int, rounds: int) -> None:
    args = [mpirun(), "-n", "4", sys.executable, "-m", "mpifed", "train", "--out", str(out), "--name", name,
            "--progress", "off", "--set", "run.timestamp=false", "--set", "data.train_size=6000",
            "--set", "data.test_size=200", "--set", "train.eval_every=0", "--set", f"train.rounds={rounds}",
            "--set", f"train.batch={batch}", "--set", f'plan.mode="{mode}"', *HETERO]
    proc = subprocess.run(args, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"the {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


@click.command("plan")
@click.option("--batch", default=64, show_default=True,
              help="Per-client batch of the uniform split, samples; the global batch is 3x this.")
@click.option("--rounds", default=40, show_default=True, help="Rounds of each run.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True,
              help="Pairs of runs, uniform then planned; the median of their ratios is reported.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Keep the runs' directories here (default: a temporary directory, removed).")
def plan(batch: int, rounds: int, repeats: int, out: str | None) -> None:
    """Uniform split vs the planner's balanced split (3 clients, speeds 1, 0.25, 0.25): measured throughput."""
    import statistics

    from mpifed.analysis import load_run
    from mpifed.analysis.prediction import WARMUP_ROUNDS, steady_throughput
    from mpifed.perf.profile_file import load_profile
    from mpifed.perf.report import predict_for

    if rounds <= WARMUP_ROUNDS + 1:
        raise click.BadParameter(f"need more than {WARMUP_ROUNDS + 1} rounds: the first {WARMUP_ROUNDS} "
                                 "are warm-up and the last evaluates", param_hint="--rounds")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out) if out else Path(tmp)
        measured: dict[str, list[float]] = {"uniform": [], "planned": []}
        batches: dict[str, list[int]] = {}
        for i in range(repeats):
            for name, mode in (("uniform", "predict"), ("planned", "balance")):
                tag = f"{name}-{i}"
                if (root / tag).exists():
                    raise click.ClickException(f"{root / tag} exists: remove it or choose another --out")
                click.echo(f"running {tag} ({mode}) ...")
                _train(root, tag, mode, batch, rounds)
                run = load_run(root / tag)
                batches[name] = [int(b) for b in run.ranks["batch"][1:]]
                measured[name].append(steady_throughput(run))
        profile = load_profile(root / f"planned-{repeats - 1}" / "profile.json")
        predicted = {name: sum(b) / predict_for(profile, b).t_round for name, b in batches.items()}
        for name in ("uniform", "planned"):
            runs = ", ".join(f"{t:,.0f}" for t in measured[name])
            click.echo(f"{name:<8} batches {batches[name]} (global {sum(batches[name])}): {runs} samples/s "
                       f"measured, {predicted[name]:,.0f} predicted")
        ratios = [b / a for a, b in zip(measured["uniform"], measured["planned"])]
        click.echo(f"planned / uniform throughput: {statistics.median(ratios):.2f}x measured (median of "
                   f"{', '.join(f'{r:.2f}' for r in ratios)}), {predicted['planned'] / predicted['uniform']:.2f}x "
                   f"predicted")
