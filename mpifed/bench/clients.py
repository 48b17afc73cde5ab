"""`mpifed bench clients`: many clients per rank, against the compute floor, as N grows, and placed.

Three measurements, each side by side in one run (interleaved, so load drifts hit all alike):
  floor      the same FedAvg work as a plain single-process torch loop (K sampled clients trained one
             after another, E local SGD steps each, averaged by batch; no framework, 1 thread) beside
             `mpirun -n R mpifed train` for each R: mpifed's round time over the loop's
  counts     per-round time and the largest rank's peak memory at N clients, K a round: what N costs
  placement  clients whose speeds spread `spread`x (emulated profiles), balanced against round-robin
             placement: the throughput ratio. What balance gains depends on K, W and how many clients
             are slow: K a multiple of W with equal clients gains nothing, a few slow clients the most
mpifed's round time is the median of the server's t_iter in run.h5 (rank 0's whole round, less the
last round's evaluation), the first rounds left out (start-up); the loop's is the median of its own rounds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from mpifed.bench.launch import MARK, mpirun, report

WARMUP = 3  # rounds left out of each median: start-up, first allocations


def job_args(n: int, k: int, steps: int, batch: int, model: str, rounds: int) -> list[str]:
    """The `--set`s of the benchmark's FedAvg job (evaluation off: rounds are training alone)."""
    sets = [f"clients.count={n}", f"clients.per_round={k}", f"train.local_steps={steps}", f"train.batch={batch}",
            f"model.name=\"{model}\"", f"train.rounds={rounds}", "train.eval_every=0", "run.timestamp=false",
            "memory.size_clients=false"]
    return [arg for s in sets for arg in ("--set", s)]


def mpifed_round(ranks: int, args: list[str], out: Path, name: str, mean: bool = False) -> tuple[float, float]:
    """Run `mpirun -n ranks mpifed train` with 1 thread a rank; (median round seconds, or the mean where
    rounds differ by design, the largest rank's peak resident memory in MiB)."""
    import h5py
    import numpy as np

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [mpirun(), "-n", str(ranks), sys.executable, "-m", "mpifed", "train", "--out", str(out), "--name", name,
           "--progress", "off", *args]
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
             "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise click.ClickException(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = [line for line in proc.stdout.splitlines() if line.startswith("PEAK ")][-1]
    with h5py.File(out / name / "run.h5") as f:
        t_iter = f["iter/t_iter"][WARMUP:, 0] - np.nan_to_num(f["iter/t_eval"][WARMUP:, 0])  # the last round's test
    return float(np.mean(t_iter) if mean else np.median(t_iter)), int(peak.split()[1]) / 1024


def loop_round(args: dict, copies: int = 1) -> float:
    """The plain loop in fresh 1-thread processes, `copies` of them at once (2: what two cores give two
    independent processes, the ceiling of any 2-rank speed-up); the mean of their median round seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "mpifed.bench.clients", json.dumps(args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(copies)]
    seconds = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        lines = [line for line in out.splitlines() if line.startswith(MARK)]
        if proc.returncode or not lines:
            raise click.ClickException(f"the plain torch loop failed (exit {proc.returncode}):\n{err[-3000:]}")
        seconds.append(json.loads(lines[-1][len(MARK):])["seconds"])
    return statistics.mean(seconds)


def _plain_loop(n: int, k: int, steps: int, batch: int, model: str, rounds: int, train_size: int) -> None:
    """FedAvg as a researcher would write it without a framework: sample K of N, train each from the
    global model for E SGD steps on its own data, average the K models by batch."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mpifed.data import load_dataset
    from mpifed.models import build_model

    torch.set_num_threads(1)
    data = load_dataset("synthetic", True, size=train_size)
    xs, ys = data.tensors()
    gen = np.random.default_rng(0)
    parts = [torch.from_numpy(p) for p in np.array_split(gen.permutation(len(ys)), n)]
    cursors = [0] * n
    net = build_model(model, data.num_classes)
    global_state = {name: v.clone() for name, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.05, weight_decay=5e-4)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        ids = np.sort(gen.choice(n, size=k, replace=False))
        average = {name: torch.zeros_like(v) for name, v in global_state.items()}
        for client in ids:
            net.load_state_dict(global_state)
            part = parts[client]
            for _ in range(steps):
                pos = part[torch.arange(cursors[client], cursors[client] + batch) % len(part)]
                cursors[client] += batch
                opt.zero_grad()
                F.cross_entropy(net(xs[pos]), ys[pos]).backward()
                opt.step()
            for name, v in net.state_dict().items():
                if v.is_floating_point():
                    average[name].add_(v, alpha=1.0 / k)
                else:
                    average[name].copy_(v)
        global_state = average
        times.append(time.perf_counter() - start)
    report(dict(seconds=statistics.median(times[WARMUP:])))


@dataclass(frozen=True)
class Work:
    """What every client does in a round of the benchmark's job, and how long each run is."""

    k: int
    steps: int
    batch: int
    model: str
    rounds: int
    repeats: int
    out: Path

    def args(self, n: int, k: int | None = None, steps: int | None = None, rounds: int | None = None) -> list[str]:
        return job_args(n, k or self.k, steps or self.steps, self.batch, self.model, rounds or self.rounds)

    @property
    def what(self) -> str:
        return f"{self.model}, K = {self.k} clients a round, E = {self.steps} local steps of batch {self.batch}"


def _table(title: str, columns: tuple[str, ...]):
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    return table


def floor_table(w: Work, sizes: list[int]):
    """The plain loop beside mpifed at each world size, interleaved."""
    loop, pair, runs = [], [], {r: [] for r in sizes}
    args = dict(n=100, k=w.k, steps=w.steps, batch=w.batch, model=w.model, rounds=w.rounds, train_size=12000)
    for rep in range(w.repeats):
        loop.append(loop_round(args))
        pair.append(loop_round(args, copies=2))
        for r in sizes:
            runs[r].append(mpifed_round(r, w.args(100), w.out, f"floor-{r}-{rep}")[0])
    base = statistics.median(loop)
    table = _table(f"against the compute floor: {w.what}, N = 100; median of {w.repeats} interleaved runs",
                   ("runner", "threads", "round (ms)", "round / loop", "throughput / loop"))
    table.add_row("plain torch loop", "1", f"{1e3 * base:.1f}", "1.00x", "1.00x")
    two = statistics.median(pair)
    table.add_row("two plain loops at once (the cores' ceiling)", "1 each", f"{1e3 * two:.1f}", f"{two / base:.2f}x",
                  f"{2 * base / two:.2f}x")
    for r in sizes:
        t = statistics.median(runs[r])
        table.add_row(f"mpifed, {r - 1} worker rank(s)", "1 each", f"{1e3 * t:.1f}", f"{t / base:.2f}x",
                      f"{base / t:.2f}x")
    return table


def counts_table(w: Work, ns: list[int]):
    """Round time and peak memory at each client count N, K a round, interleaved."""
    runs = {n: [] for n in ns}
    for rep in range(w.repeats):
        for n in ns:
            runs[n].append(mpifed_round(4, w.args(n), w.out, f"count-{n}-{rep}"))
    table = _table(f"cost of N: {w.what}, mpirun -n 4; median of {w.repeats} interleaved runs",
                   ("clients N", "round (ms)", "vs first", "largest rank's peak RSS (MiB)"))
    first = statistics.median(t for t, _ in runs[ns[0]])
    for n in ns:
        t = statistics.median(t for t, _ in runs[n])
        peak = statistics.median(m for _, m in runs[n])
        table.add_row(f"{n:,}", f"{1e3 * t:.1f}", f"{t / first:.2f}x", f"{peak:.0f}")
    return table


def placement_table(w: Work, ranks: int, k: int, slow: int, spread: float, base: float):
    """Balanced against round-robin placement, clients' speeds spread `spread`x. Every client is emulated
    (native compute is the fraction `base` of a fast client's time, less of a slow one's), so that
    workers sharing few cores still run near their profiles' speeds; E = 1 and three times the rounds,
    for many sampled mixes."""
    hetero = ["--set", f"profiles.fast.speed={base}", "--set", f"profiles.slow.speed={base / spread}",
              "--set", "clients.profile=\"fast\"", "--set", f"clients.groups=[{{count = {slow}, profile = \"slow\"}}]"]
    runs = {p: [] for p in ("balanced", "round-robin")}
    for rep in range(w.repeats):
        for p in runs:
            args = w.args(100, k=k, steps=1, rounds=3 * w.rounds) + hetero + ["--set", f"clients.placement=\"{p}\""]
            runs[p].append(mpifed_round(ranks, args, w.out, f"place-{p}-{rep}", mean=True)[0])
    table = _table(f"placement: {w.model}, K = {k} of N = 100 clients a round on {ranks - 1} worker ranks, E = 1, "
                   f"batch {w.batch}, {3 * w.rounds} rounds; {slow} clients at speed {base / spread:g}, the others at "
                   f"{base:g} ({spread:g}x); mean round (sampled rounds differ), median of {w.repeats} "
                   f"interleaved runs",
                   ("placement", "round (ms)", "throughput vs round-robin"))
    rr = statistics.median(runs["round-robin"])
    for p, times in runs.items():
        table.add_row(p, f"{1e3 * statistics.median(times):.1f}", f"{rr / statistics.median(times):.2f}x")
    return table


@click.command("clients")
@click.option("--part", "parts", multiple=True, type=click.Choice(["floor", "counts", "placement"]),
              help="Which measurement (repeatable); all three by default.")
@click.option("--ranks", default="2,3,4", show_default=True, help="World sizes for the floor (1 server + workers).")
@click.option("--counts", default="100,1000,10000", show_default=True, help="Client counts N for `counts`.")
@click.option("--per-round", "k", default=10, show_default=True, help="Clients K sampled each round.")
@click.option("--local-steps", "steps", default=5, show_default=True, help="Local SGD steps E per client.")
@click.option("--batch", default=32, show_default=True, help="Each client's batch.")
@click.option("--model", default="cnn", show_default=True, help="The model every client trains.")
@click.option("--rounds", default=20, show_default=True, help=f"Rounds per run (the first {WARMUP} are left out).")
@click.option("--repeats", default=3, show_default=True, help="Interleaved repeats; the median is reported.")
@click.option("--spread", default=4.0, show_default=True, help="Placement: fastest over slowest client speed.")
@click.option("--slow", default=10, show_default=True, help="Placement: how many of the 100 clients are slow.")
@click.option("--placement-ranks", default=6, show_default=True, help="Placement: world size.")
@click.option("--placement-k", default=16, show_default=True, help="Placement: clients sampled each round.")
@click.option("--base-speed", default=0.25, show_default=True, help="Placement: the fast clients' emulated speed.")
def clients(parts, ranks, counts, k, steps, batch, model, rounds, repeats, spread, slow, placement_ranks, placement_k,
            base_speed):
    """Many clients per rank: mpifed against a plain torch loop, the cost of N, balanced placement."""
    from rich.console import Console

    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="mpifed-bench-clients-") as tmp:
        w = Work(k, steps, batch, model, rounds, repeats, Path(tmp))
        for part in parts or ("floor", "counts", "placement"):
            if part == "floor":
                console.print(floor_table(w, [int(r) for r in ranks.split(",")]))
            elif part == "counts":
                console.print(counts_table(w, [int(c) for c in counts.split(",")]))
            else:
                console.print(placement_table(w, placement_ranks, placement_k, slow, spread, base_speed))

if __name__ == "__main__":
    _plain_loop(**json.loads(sys.argv[1]))
