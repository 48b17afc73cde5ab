"""`mpifed bench plan`: the batch planner against a uniform split, side by side, same global batch.

Two real `mpirun` training jobs, one after the other in one invocation, identical but for how the
global batch is split: 3 clients, one at full speed and two emulating a device 4x slower
(profiles speed 0.25), each asking for --batch samples. The first keeps that uniform split
(`[plan] mode = "predict"`, so it logs predictions too and pays the same start-up); the second
re-splits it with `mode = "balance"`, so the fast client takes more. Throughput is measured from
each log: samples over the server's round times of the steady rounds
(mpifed.analysis.prediction.steady_throughput), and the ratio is printed with the predicted one.

    mpifed bench plan                      # batch 64 per client, 40 rounds each (~1.5 min on 2 cores)
    mpifed bench plan --batch 32 --rounds 60
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
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Keep the two runs' directories here (default: a temporary directory, removed).")
def plan(batch: int, rounds: int, out: str | None) -> None:
    """Uniform split vs the planner's balanced split (3 clients, speeds 1, 0.25, 0.25): measured throughput."""
    from mpifed.analysis import load_run
    from mpifed.analysis.prediction import WARMUP_ROUNDS, steady_throughput

    if rounds <= WARMUP_ROUNDS + 1:
        raise click.BadParameter(f"need more than {WARMUP_ROUNDS + 1} rounds: the first {WARMUP_ROUNDS} "
                                 "are warm-up and the last evaluates", param_hint="--rounds")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out) if out else Path(tmp)
        rows = []
        for name, mode in (("uniform", "predict"), ("planned", "balance")):
            if (root / name).exists():
                raise click.ClickException(f"{root / name} exists: remove it or choose another --out")
            click.echo(f"running {name} ({mode}) ...")
            _train(root, name, mode, batch, rounds)
            run = load_run(root / name)
            predicted = float(run.models["perf.round.throughput"])
            batches = [int(b) for b in run.ranks["batch"][1:]]
            rows.append((name, batches, steady_throughput(run), predicted))
        for name, batches, measured, predicted in rows:
            click.echo(f"{name:<8} batches {batches} (global {sum(batches)}): {measured:,.0f} samples/s measured, "
                       f"{predicted:,.0f} predicted")
        (_, _, base, base_pred), (_, _, best, best_pred) = rows
        click.echo(f"planned / uniform throughput: {best / base:.2f}x measured, {best_pred / base_pred:.2f}x predicted")
