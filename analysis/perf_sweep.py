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
    python analysis/perf_sweep.py --out runs/sweep --only 'n3-*' --only 'n4-*'   # at most mpirun -n 4
    python analysis/perf_sweep.py --out runs/sweep --report     # report on logs already there
    python analysis/perf_sweep.py --out runs/sweep --report --replay   # ... as the current model predicts

Run folders are <out>/<config>/. Running again continues an interrupted sweep: a configuration whose
run.h5 holds every round its job asked for is finished and skipped (whatever --rounds and --set say
now: give other settings their own --out); an unfinished run of this sweep (job.toml names it) is
removed and run again from the start (a resume would start the performance model afresh mid-log). A
failed configuration is reported and the others still run. A folder that is not this sweep's run is
refused, and nothing is removed. --report reports the finished configurations and names the others.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from mpifed.analysis import RunLogError, load_run
from mpifed.analysis.prediction import (WARMUP_ROUNDS, last_round_error, noise_floor, replay_online, startup_error,
                                       steady_rounds, terms)
from mpifed.perf import load_profile
from mpifed.analysis.summary import server_rank
from mpifed.bench.launch import find_tool

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


def select(patterns: list[str]) -> list[tuple]:
    """The configurations --only names (shell-style patterns), in sweep order; all without --only."""
    unknown = [p for p in patterns if not any(fnmatch(name(*cfg), p) for cfg in CONFIGS)]
    if unknown:
        sys.exit(f"--only {', '.join(unknown)} matches no configuration; there are: "
                 f"{', '.join(name(*cfg) for cfg in CONFIGS)}")
    return [cfg for cfg in CONFIGS if not patterns or any(fnmatch(name(*cfg), p) for p in patterns)]


def unfinished(folder: Path) -> str:
    """Why `folder` holds no finished run, '' when it does: a run.h5 with every round its job asked for."""
    if not folder.exists():
        return "not run"
    try:
        run = load_run(folder / "run.h5")
    except RunLogError:
        return "no readable run.h5"
    want = int(run.job.get("train", {}).get("rounds", 0))
    return "" if 0 < want <= run.rounds else f"{run.rounds}/{want} rounds logged"


def ours(folder: Path, cfg: tuple) -> bool:
    """Whether `folder` is this sweep's run of `cfg` (its job.toml says so), or the bare lock a failed
    start-up leaves: only such a folder is removed to run it again."""
    if not folder.is_dir():
        return False
    if {p.name for p in folder.iterdir()} <= {"run.lock"}:
        return True
    try:
        job = tomllib.loads((folder / "job.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return job.get("run", {}).get("name") == name(*cfg)


def in_use(folder: Path) -> bool:
    """Whether a live job holds the folder's run.lock (mpifed.runlock): its run must not be removed."""
    try:
        with open(folder / "run.lock", "r+") as f:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return False


def run_config(out: Path, rounds: int, ranks: int, batch: int, codec: str, hetero: str,
               overrides: list[str] = ()) -> bool:
    """Run one configuration; on failure say why and return False, so the other configurations still run."""
    mpirun = find_tool("mpirun")
    if mpirun is None:
        sys.exit("mpirun not found: install the MPICH wheel (pip install -e '.[mpich]') or load an MPI")
    args = [mpirun, "-n", str(ranks), sys.executable, "-m", "mpifed", "train", *BASE, "--out", str(out),
            "--name", name(ranks, batch, codec, hetero), "--set", f"train.rounds={rounds}",
            "--set", f"train.batch={batch}", "--set", f'compress.codec="{codec}"', *(SLOW if hetero == "slow" else []),
            *[arg for o in overrides for arg in ("--set", o)]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode == 3:  # `mpifed train` stopped by Ctrl-C or SIGTERM: stop the sweep too
        raise KeyboardInterrupt
    if proc.returncode != 0:
        print(f"FAILED {name(ranks, batch, codec, hetero)} (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
              file=sys.stderr, flush=True)
    return proc.returncode == 0


def sweep(out: Path, configs: list[tuple], rounds: int, overrides: list[str]) -> int:
    """Run the configurations that have no finished run; return how many failed. Every folder is checked
    before anything runs, so a folder that is not this sweep's stops the sweep before it starts."""
    redo = {}
    for cfg in configs:
        folder = out / name(*cfg)
        redo[cfg] = why = unfinished(folder)
        if folder.exists() and not ours(folder, cfg):
            sys.exit(f"{folder} exists and is not this sweep's run of {name(*cfg)}: choose another --out, "
                     f"or remove it (nothing was run)")
        if why and in_use(folder):
            sys.exit(f"{folder} is in use by a running job: wait for it to end (nothing was run)")
    failed = 0
    for i, cfg in enumerate(configs, 1):
        folder = out / name(*cfg)
        if not redo[cfg]:
            print(f"[{i}/{len(configs)}] {name(*cfg)}: finished, skipped", flush=True)
            continue
        if folder.exists():
            print(f"[{i}/{len(configs)}] {name(*cfg)}: unfinished ({redo[cfg]}), removed and run again", flush=True)
            shutil.rmtree(folder)
        else:
            print(f"[{i}/{len(configs)}] {name(*cfg)}", flush=True)
        failed += not run_config(out, rounds, *cfg, overrides=overrides)
    return failed


def report(out: Path, configs: list[tuple], skip: int, replay: bool = False) -> float:
    """Print one line per finished configuration, the overall MdAPE and the configurations still to run;
    return the overall MdAPE (%). With `replay`, the online model's predictions are recomputed from each
    log and its profile.json (mpifed.analysis.prediction.replay_online) instead of read from t_iter_pred."""
    missing = {name(*cfg): why for cfg in configs if (why := unfinished(out / name(*cfg)))}
    done = [cfg for cfg in configs if name(*cfg) not in missing]
    if not done:
        sys.exit(f"no finished run in {out}: " + ", ".join(f"{n} ({why})" for n, why in missing.items())
                 + "; run the sweep first (the same command without --report)")
    print(f"{'config':<22} {'rounds':>6} {'pred ms':>8} {'meas ms':>8} {'MdAPE %':>8} {'start-up':>8} "
          f"{'last %':>7} {'floor %':>8}   start-up terms: predicted/measured ms (slowest client, "
          f"collectives, server)")
    errors, columns = [], {"start-up": startup_error, "last": last_round_error, "floor": noise_floor}
    baselines = {key: [] for key in columns}
    for cfg in done:
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
    print(f"overall MdAPE over {sum(len(e) for e in errors)} steady rounds of {len(done)} configurations: "
          f"{overall:.1f}% (median of the per-configuration MdAPEs: {np.median(per_config):.1f}%, "
          f"worst {max(per_config):.1f}%); medians of the per-configuration columns: start-up "
          f"{medians['start-up']:.1f}%, last round {medians['last']:.1f}%, floor {medians['floor']:.1f}%; "
          f"first {skip} rounds and evaluation rounds left out")
    if missing:
        print(f"missing {len(missing)} of {len(configs)} configurations (not in the figures above): "
              + ", ".join(f"{n} ({why})" for n, why in missing.items()))
        print("  to run them: the same command without --report (it skips finished runs; an nK- configuration "
              "runs under mpirun -n K, and --only picks configurations)")
    return overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/perf-sweep"), help="directory of the sweep's runs")
    parser.add_argument("--rounds", type=int, default=35, help="rounds per new run")
    parser.add_argument("--skip", type=int, default=WARMUP_ROUNDS, help="leading rounds left out")
    parser.add_argument("--only", action="append", default=[], metavar="CONFIG",
                        help="run and report only the configurations this names, e.g. n3-b16-none-none or 'n3-*' "
                             "(repeatable; default: all twelve, which need up to mpirun -n 5)")
    parser.add_argument("--report", action="store_true", help="only report on the logs already in --out")
    parser.add_argument("--replay", action="store_true",
                        help="report the current online model's predictions, recomputed from each log (for logs "
                             "an older model wrote), instead of the logged t_iter_pred")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a job override for every new run, e.g. plan.repeats=9 (repeatable)")
    args = parser.parse_args()
    configs = select(args.only)
    failed = 0
    if not args.report:
        try:
            failed = sweep(args.out, configs, args.rounds, args.overrides)
        except KeyboardInterrupt:
            sys.exit("\nstopped: run the same command again to continue (finished runs are kept)")
    report(args.out, configs, args.skip, args.replay)
    if failed:
        sys.exit(f"{failed} configuration(s) failed (see above); run the same command again to retry them")


if __name__ == "__main__":
    main()
