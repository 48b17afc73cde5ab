"""Prediction error of the performance model over a sweep of real runs.

Runs each configuration below as a real `mpirun` job with `[plan] mode = "predict"` (the job's
batches, a logged prediction every round), then reads every log and reports the median absolute
percentage error (MdAPE) of the predicted round time t_iter_pred against the server's measured
t_iter, per configuration and over all steady rounds of all runs, with the model's terms beside
their measurements (mpifed.analysis.prediction). Steady rounds: the first --skip rounds and the
rounds that evaluate are left out. Columns:

  MdAPE     the logged prediction: the start-up fit, corrected by the rounds before (mpifed.perf.online)
  start-up  the start-up prediction alone, as if no round had corrected it
  last      the naive forecast "as long as the last round": what the online model must beat
  floor     the run's own median round time in hindsight: what jitter and drift alone cost any
            prediction made once

    python analysis/perf_sweep.py --out runs/sweep              # run all, then report (~8 min on 2 cores)
    python analysis/perf_sweep.py --out runs/sweep --report     # report on logs already there
    python analysis/perf_sweep.py --out runs/sweep --report --replay   # ... as the current model predicts
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from mpifed.analysis import load_run
from mpifed.analysis.prediction import (WARMUP_ROUNDS, last_round_error, noise_floor, replay_online, startup_error,
                                       steady_rounds, terms)
from mpifed.perf import load_profile
from mpifed.analysis.summary import server_rank

# (ranks, per-client batch, codec, heterogeneity): client counts 2/3/4, batches 16/32/64,
# codecs none/fp16/topk, and "slow" = the first client emulates a device at half speed.
CONFIGS = [
    (3, 16, "none", "none"), (3, 64, "none", "none"), (3, 32, "fp16", "slow"), (3, 32, "topk", "none"),
    (4, 16, "fp16", "none"), (4, 32, "none", "slow"), (4, 64, "topk", "slow"), (4, 64, "none", "none"),
    (5, 16, "topk", "none"), (5, 32, "none", "none"), (5, 64, "fp16", "slow"), (5, 32, "topk", "slow"),
]
BASE = ["--set", "data.train_size=4000", "--set", "data.test_size=200", "--set", "train.eval_every=0",
        "--set", "run.timestamp=false", "--set", 'plan.mode="predict"', "--progress", "off"]
SLOW = ["--set", "profiles.slow.speed=0.5", "--set", 'clients.groups=[{count = 1, profile = "slow"}]']


def name(ranks: int, batch: int, codec: str, hetero: str) -> str:
    return f"n{ranks}-b{batch}-{codec}-{hetero}"


def run_config(out: Path, rounds: int, ranks: int, batch: int, codec: str, hetero: str,
               overrides: list[str] = ()) -> None:
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        sys.exit("mpirun not found: install the MPICH wheel (pip install -e '.[mpich]') or load an MPI")
    args = [mpirun, "-n", str(ranks), sys.executable, "-m", "mpifed", "train", *BASE, "--out", str(out),
            "--name", name(ranks, batch, codec, hetero), "--set", f"train.rounds={rounds}",
            "--set", f"train.batch={batch}", "--set", f'compress.codec="{codec}"', *(SLOW if hetero == "slow" else []),
            *[arg for o in overrides for arg in ("--set", o)]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name(ranks, batch, codec, hetero)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def report(out: Path, skip: int, replay: bool = False) -> float:
    """Print one line per configuration and the overall MdAPE; return the overall MdAPE (%). With
    `replay`, the online model's predictions are recomputed from each log and its profile.json
    (mpifed.analysis.prediction.replay_online) instead of read from t_iter_pred."""
    print(f"{'config':<22} {'rounds':>6} {'pred ms':>8} {'meas ms':>8} {'MdAPE %':>8} {'start-up':>8} "
          f"{'last %':>7} {'floor %':>8}   start-up terms: predicted/measured ms (slowest client, "
          f"collectives, server)")
    errors, columns = [], {"start-up": startup_error, "last": last_round_error, "floor": noise_floor}
    baselines = {key: [] for key in columns}
    for cfg in CONFIGS:
        run = load_run(out / name(*cfg))
        rows, r = steady_rounds(run, skip), server_rank(run)
        if replay:
            predicted = replay_online(run, load_profile(out / name(*cfg) / "profile.json"))
        else:
            predicted = run.iter["t_iter_pred"][:, r]
        pred, meas = predicted[rows], run.iter["t_iter"][rows, r]
        errors.append(np.abs(pred - meas) / meas)
        mdape, points = 100 * float(np.median(errors[-1])), len(rows)
        for key, fn in columns.items():
            baselines[key].append(fn(run, skip))
        parts = " ".join(f"{1e3 * t.predicted:.1f}/{1e3 * t.measured:.1f}" for t in terms(run, skip)[:-1])
        print(f"{name(*cfg):<22} {points:>6} {1e3 * np.median(pred):>8.1f} {1e3 * np.median(meas):>8.1f} "
              f"{mdape:>8.1f} {baselines['start-up'][-1]:>8.1f} {baselines['last'][-1]:>7.1f} "
              f"{baselines['floor'][-1]:>8.1f}   {parts}")
    overall = float(100 * np.median(np.concatenate(errors)))
    per_config = [float(100 * np.median(e)) for e in errors]
    medians = {key: float(np.median(v)) for key, v in baselines.items()}
    print(f"overall MdAPE over {sum(len(e) for e in errors)} steady rounds of {len(CONFIGS)} configurations: "
          f"{overall:.1f}% (median of the per-configuration MdAPEs: {np.median(per_config):.1f}%, "
          f"worst {max(per_config):.1f}%); medians of the per-configuration columns: start-up "
          f"{medians['start-up']:.1f}%, last round {medians['last']:.1f}%, floor {medians['floor']:.1f}%; "
          f"first {skip} rounds and evaluation rounds left out")
    return overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/perf-sweep"), help="directory of the sweep's runs")
    parser.add_argument("--rounds", type=int, default=35, help="rounds per run")
    parser.add_argument("--skip", type=int, default=WARMUP_ROUNDS, help="leading rounds left out")
    parser.add_argument("--report", action="store_true", help="only report on the logs already in --out")
    parser.add_argument("--replay", action="store_true",
                        help="report the current online model's predictions, recomputed from each log (for logs "
                             "an older model wrote), instead of the logged t_iter_pred")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a job override for every run, e.g. plan.repeats=9 (repeatable)")
    args = parser.parse_args()
    if not args.report:
        for cfg in CONFIGS:
            if (args.out / name(*cfg)).exists():
                sys.exit(f"{args.out / name(*cfg)} exists: choose another --out, remove it, or add --report")
        for i, cfg in enumerate(CONFIGS, 1):
            print(f"[{i}/{len(CONFIGS)}] {name(*cfg)}", flush=True)
            run_config(args.out, args.rounds, *cfg, overrides=args.overrides)
    report(args.out, args.skip, args.replay)


if __name__ == "__main__":
    main()
