"""`mpifed bench data`: the training split held once per node (data.share = "node"), against once per rank.

    mpifed bench data                                  # N = 100, 1,000, 10,000 clients, both layouts
    mpifed bench data --clients 100,1000 --layouts node --samples 50 --ranks 3

For each N (clients of --samples CIFAR-shaped synthetic samples each, K = 10 sampled a round) and each
layout, one short job `mpirun -n R mpifed train` (2 rounds, no evaluation but the last, memory sizing
off: it is the same in both layouts and its trial steps would blur the data's memory) runs in a
subprocess while this process samples its ranks every 0.1 s:
  memory    the ranks' (the mpirun process's python descendants) summed proportional set size, the
            `Pss:` of /proc/PID/smaps_rollup: a page mapped by k ranks counts 1/k in each, so the sum is
            what the node holds. The peak of the sum over the whole run; the summed RSS beside it counts a
            shared page once per rank, so there the node layout looks like the rank layout
  start-up  seconds from launch until run.h5 first exists. Rank 0 creates the run log once every rank has
            prepared (imported, generated or shared the data, converted it, agreed the batches) and starts
            round 0 right after (the test set and the log's header: milliseconds). Chosen because the
            `started` attr has whole seconds only, and the wall time less the rounds' t_iter would count
            the tear-down too (the window freed, the model saved, MPI finalized); seen within one sample
The rank layout converts the whole split to float32 on every worker (N x samples x 12 KiB, and several
times that in temporaries while the synthetic images are generated at once): at 10,000 clients its two
workers would need about 47 GiB. Before each run its peak is extrapolated (linear in the samples) from the sizes already measured, and the run is
skipped, with the reason in the output, when that would pass --memory-share of MemAvailable; a run whose
MemAvailable still falls under --min-available is stopped and marked. A failed job prints its last
stderr lines and the table marks it; the others go on.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from mpifed.bench.launch import mpirun

GIB = 1024 ** 3
SAMPLE_EVERY = 0.1  # seconds between memory samples (and looks for run.h5)
SAMPLE_BYTES = 32 * 32 * 3  # a CIFAR-shaped sample, uint8: what the node layout holds


@dataclass
class Run:
    """One job's measurement; `error` says why a run has no numbers (failed, stopped, skipped)."""

    clients: int
    samples: int  # the whole training split: clients x samples each
    layout: str
    pss: float = math.nan  # peak of the ranks' summed PSS, bytes
    rss: float = math.nan  # peak of the ranks' summed RSS, bytes
    startup: float = math.nan  # seconds from launch until run.h5 exists
    wall: float = math.nan  # seconds from launch until mpirun exited
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def job_args(n: int, samples: int, layout: str, rounds: int) -> list[str]:
    """The `--set`s of the benchmark's job: N clients of `samples` each, K = 10 a round, short."""
    sets = [f"data.train_size={n * samples}", f"clients.count={n}", f"clients.per_round={min(10, n)}",
            f"data.share=\"{layout}\"", f"train.rounds={rounds}", "train.eval_every=0", "data.test_size=500",
            "run.timestamp=false", "memory.size_clients=false"]
    return [arg for s in sets for arg in ("--set", s)]


def _stat(pid: str) -> tuple[str, int] | None:
    """(command name, parent pid) from /proc/PID/stat; None when the process is gone. The name is in
    parentheses and may hold spaces, so the fields are split after the last ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    return name, int(text[text.rindex(")") + 2:].split()[1])


def rank_processes(root: int) -> list[int]:
    """The python processes descended from `root` (mpirun -> hydra proxy -> ranks), from the parent pids
    of /proc/*/stat (no psutil dependency)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _stat(entry)) is not None:
            children.setdefault(info[1], []).append((int(entry), info[0]))
    found, todo = [], [root]
    while todo:
        for pid, name in children.get(todo.pop(), ()):
            todo.append(pid)
            if name.startswith("python"):
                found.append(pid)
    return found


def memory_of(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in bytes, from /proc/PID/smaps_rollup (kB there); zeros once it is gone."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return pss, rss


def mem_available() -> int:
    """The kernel's estimate of memory available to new work, bytes (MemAvailable of /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _stop(proc: subprocess.Popen) -> None:
    """End the job we launched: its own process group (mpirun and its ranks), SIGTERM then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def measure(ranks: int, n: int, samples: int, layout: str, out: Path, rounds: int = 2, timeout: float = 1800,
            min_available: float = 1.0 * GIB) -> Run:
    """Run one job and sample it until it exits: peak summed PSS and RSS, start-up, wall time."""
    run = Run(n, n * samples, layout)
    name = f"{layout}-{n}"
    cmd = [mpirun(), "-n", str(ranks), sys.executable, "-m", "mpifed", "train", "--out", str(out), "--name", name,
           "--progress", "off", *job_args(n, samples, layout, rounds)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = out / f"{name}.stderr"
    run_log = out / name / "run.h5"
    with open(log, "w") as err:
        start = time.perf_counter()
        # a session of its own: the job's processes are one group that _stop can end without touching ours
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        pss = rss = 0
        while proc.poll() is None:
            now = time.perf_counter() - start
            if math.isnan(run.startup) and run_log.exists():
                run.startup = now
            sample = [memory_of(pid) for pid in rank_processes(proc.pid)]
            pss, rss = max(pss, sum(p for p, _ in sample)), max(rss, sum(r for _, r in sample))
            if now > timeout:
                run.error = f"stopped after {timeout:.0f} s"
            elif mem_available() < min_available:
                run.error = f"stopped: MemAvailable under {min_available / GIB:.1f} GiB"
            if run.error:
                _stop(proc)
                break
            time.sleep(SAMPLE_EVERY)
        run.wall = time.perf_counter() - start
    run.pss, run.rss = float(pss or math.nan), float(rss or math.nan)
    if not run.error and proc.returncode:
        run.error = f"failed (exit {proc.returncode})"
    if run.error:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        click.echo(f"mpifed bench data: N = {n:,}, {layout}: {run.error}; last stderr lines:\n  "
                   + "\n  ".join(tail or ["(none)"]), err=True)
    elif math.isnan(run.startup):
        run.error = "no run.h5"
    return run


def predicted_peak(runs: list[Run], layout: str, samples: int) -> float | None:
    """The layout's peak summed PSS at `samples`, extrapolated linearly in the samples through its two
    largest measured runs; after one run, through it and the smallest peak of any run (at no data: the
    ranks' interpreters, torch and MPI, the part that does not grow). None before any."""
    done = sorted({r.samples: r.pss for r in runs if r.layout == layout and r.ok and r.samples < samples}.items())
    if not done:
        return None
    if len(done) == 1:
        done.insert(0, (0, min(r.pss for r in runs if r.ok)))
    (s0, p0), (s1, p1) = done[-2:]
    return p1 + max(p1 - p0, 0.0) / (s1 - s0) * (samples - s1)


def skip_reason(runs: list[Run], layout: str, n: int, samples: int, skip_rank_above: int | None,
                memory_share: float) -> str:
    """Why the run (layout, N) is not started, or '' to start it."""
    if layout == "rank" and skip_rank_above is not None and n > skip_rank_above:
        return f"skipped: --skip-rank-above {skip_rank_above:,}"
    peak, available = predicted_peak(runs, layout, n * samples), mem_available()
    if peak is not None and peak > memory_share * available:
        return (f"skipped: predicted peak {peak / GIB:.1f} GiB > {memory_share:.0%} of MemAvailable "
                f"{available / GIB:.1f} GiB")
    return ""


def run_bench(clients: list[int], layouts: list[str], ranks: int, samples: int, rounds: int = 2,
              skip_rank_above: int | None = None, memory_share: float = 0.8, timeout: float = 1800,
              min_available: float = 1.0 * GIB) -> list[Run]:
    """Every (N, layout), N ascending so each skip decision has the smaller sizes' numbers."""
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="mpifed-bench-data-") as tmp:
        for n in sorted(clients):
            for layout in layouts:
                reason = skip_reason(runs, layout, n, samples, skip_rank_above, memory_share)
                if reason:
                    click.echo(f"mpifed bench data: N = {n:,}, {layout}: {reason}", err=True)
                    runs.append(Run(n, n * samples, layout, error=reason))
                    continue
                runs.append(measure(ranks, n, samples, layout, Path(tmp), rounds, timeout, min_available))
    return runs


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if math.isfinite(a) and math.isfinite(b) and b > 0 else "-"


def results_table(runs: list[Run], ranks: int, samples: int):
    """One row per run; on the node rows, node over rank at the same N, and node over node at the
    smallest N (the target: at most 1.25x from 100 to 1,000 clients)."""
    from rich.table import Table

    by = {(r.clients, r.layout): r for r in runs}
    base = min(r.clients for r in runs)
    table = Table(title=f"training data per node: mpirun -n {ranks} mpifed train, {samples} synthetic CIFAR-shaped "
                        f"samples a client, 2 rounds of K = 10; peak of the ranks' summed memory")
    for col in ("clients N", "samples", "layout", "Σ PSS (GiB)", "Σ RSS (GiB)", "start-up (s)", "PSS node/rank",
                "start-up node/rank", f"PSS vs N={base:,}", f"start-up vs N={base:,}"):
        table.add_column(col, justify="right")
    for r in runs:
        cells = [f"{r.clients:,}", f"{r.samples:,}", r.layout]
        if r.ok:
            cells += [f"{r.pss / GIB:.3f}", f"{r.rss / GIB:.3f}", f"{r.startup:.1f}"]
        else:
            cells += [r.error.split(":")[0], "-", "-"]
        other, first = by.get((r.clients, "rank")), by.get((base, "node"))
        if r.layout == "node" and r.ok:
            cells += [_ratio(r.pss, other.pss), _ratio(r.startup, other.startup)] if other and other.ok else ["-"] * 2
            cells += [_ratio(r.pss, first.pss), _ratio(r.startup, first.startup)] if first and first.ok else ["-"] * 2
        else:
            cells += [""] * 4
        table.add_row(*cells)
    return table


@click.command("data")
@click.option("--clients", default="100,1000,10000", show_default=True, help="Comma-separated client counts N.")
@click.option("--layouts", default="node,rank", show_default=True, help="Comma-separated data.share layouts.")
@click.option("--ranks", default=3, show_default=True, help="World size (1 server + workers).")
@click.option("--samples", default=50, show_default=True, help="Synthetic samples per client.")
@click.option("--rounds", default=2, show_default=True, help="Rounds per job.")
@click.option("--skip-rank-above", type=int, default=None,
              help="Skip the rank layout above this N. Default: skip a run only when its peak, extrapolated "
                   "from the smaller N, would not fit (see --memory-share).")
@click.option("--memory-share", default=0.8, show_default=True,
              help="Skip a run whose extrapolated peak summed PSS exceeds this share of MemAvailable.")
@click.option("--min-available", default=1.0, show_default=True,
              help="GiB: stop a run (and mark it) when MemAvailable falls below this.")
@click.option("--timeout", default=1800, show_default=True, help="Seconds allowed per job.")
def data(clients, layouts, ranks, samples, rounds, skip_rank_above, memory_share, min_available, timeout):
    """Training data held once per node vs once per rank: summed PSS and start-up as clients grow."""
    from rich.console import Console

    counts = [int(c) for c in clients.split(",")]
    shares = [s.strip() for s in layouts.split(",")]
    if bad := [s for s in shares if s not in ("node", "rank")]:
        raise click.BadParameter(f"{', '.join(bad)}: a layout is node or rank", param_hint="--layouts")
    runs = run_bench(counts, shares, ranks, samples, rounds, skip_rank_above, memory_share, timeout,
                     min_available * GIB)
    console = Console(width=170)
    console.print(results_table(runs, ranks, samples))
    for r in runs:
        if not r.ok:
            console.print(f"N = {r.clients:,}, {r.layout}: {r.error}")
    base = min(counts)
    first = next((r for r in runs if r.clients == base and r.layout == "node" and r.ok), None)
    for r in runs:
        if first is not None and r.layout == "node" and r.ok and r.clients == 10 * base:
            verdict = lambda x: "met" if x <= 1.25 else "missed"  # noqa: E731
            console.print(f"target, node layout from {base:,} to {r.clients:,} clients at most 1.25x: summed PSS "
                          f"{r.pss / first.pss:.2f}x ({verdict(r.pss / first.pss)}), start-up "
                          f"{r.startup / first.startup:.2f}x ({verdict(r.startup / first.startup)})")
