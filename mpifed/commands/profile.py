"""`mpirun -n N mpifed profile --job J --out prof.json`: measure compute curves and the network.

Every client rank times its own training step over a grid of batch sizes up to its memory cap and
fits its curve; rank 0 times its server work; all ranks then time the four collectives at sizes up
to the real model and payload; rank 0 writes the profile file that `mpifed plan` and
`mpifed train` read. What a step *is* (model, data, device, emulated slowdown) comes from the
spine through a ProfileTarget, so this module knows nothing about torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import click
import numpy as np

from mpifed.perf.comm import fit_collective, measure_collectives
from mpifed.perf.curves import ComputeCurve, profile_batches, profile_compute
from mpifed.perf.profile_file import ClientProfile, Profile, save_profile


@dataclass(frozen=True)
class ProfileTarget:
    """What the spine supplies for one job; callables are invoked only on the rank they name.

    make_step_fn(rank) -> step(b): one blocking training step (forward, backward, encode) at batch
      b on that client rank's device. max_batch(rank): the memory model's cap for that rank.
    device(rank): a label for the report (e.g. "cuda:0 (emulated 0.25x)"), or None.
    model_bytes / payload_bytes / metrics_bytes: broadcast buffer, one client's upload (codec byte
      count), per-rank metrics row. up: "reduce" or "gatherv".
    server_step(): one round of server work (decode + aggregate + optimizer step), or None.
    """

    make_step_fn: Callable[[int], Callable[[int], None]]
    max_batch: Callable[[int], int]
    model_bytes: int
    payload_bytes: int
    up: str = "reduce"
    metrics_bytes: int = 0
    device: Callable[[int], str] | None = None
    server_step: Callable[[], None] | None = None


def comm_sizes(max_bytes: int, points: int, smallest: int = 64) -> list[int]:
    """Geometric sizes from `smallest` to `max_bytes` (multiples of 4), so the fit spans both the
    latency-bound and the bandwidth-bound end and the round's real size is measured, not guessed."""
    top = max(int(max_bytes), smallest)
    return sorted({4 * max(1, math.ceil(s / 4)) for s in np.geomspace(smallest, top, points)})


def run_profile(comm, target: ProfileTarget, points: int = 8, repeats: int = 5, warmup: int = 2,
                comm_points: int = 6, comm_repeats: int = 5) -> Profile | None:
    """Profile every client and the collectives; all ranks call it; rank 0 gets the Profile.

    points/repeats/warmup: batch sizes per curve, timed steps per size (median kept), untimed
    steps first. comm_points/comm_repeats: sizes per collective and timings per size.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 2:
        raise ValueError(f"mpifed profile needs a server and >= 1 client: run it under mpirun -n >= 2, got {size}")
    mine: Any = None
    if rank == 0:
        if target.server_step is not None:
            samples = profile_compute(lambda _b: target.server_step(), [1], repeats, warmup)
            mine = samples[0][1]
        else:
            mine = 0.0
    else:
        cap = int(target.max_batch(rank))
        samples = profile_compute(target.make_step_fn(rank), profile_batches(cap, points), repeats, warmup)
        label = target.device(rank) if target.device is not None else ""
        mine = (cap, str(label), samples)
    # One-off start-up message (not on the per-round path), so the pickling gather is fine here.
    gathered = comm.gather(mine, root=0)
    sizes = {"bcast": comm_sizes(target.model_bytes, comm_points),
             "reduce" if target.up == "reduce" else "gatherv": comm_sizes(target.payload_bytes, comm_points),
             "gather": comm_sizes(max(target.metrics_bytes, 1024), 3, smallest=8)}
    comm_samples = measure_collectives(comm, sizes, comm_repeats)
    if rank != 0:
        return None
    clients = tuple(ClientProfile(r - 1, r, device, cap, ComputeCurve.fit(samples), tuple(samples))
                    for r, (cap, device, samples) in enumerate(gathered[1:], start=1))
    return Profile(size, int(target.model_bytes), int(target.payload_bytes), clients,
                   fit_collective(comm_samples), target.up, int(target.metrics_bytes), float(gathered[0]))


Setup = Callable[[str, Sequence[str]], tuple[Any, ProfileTarget]]
"""(job path, --set overrides) -> (communicator, ProfileTarget); supplied by the spine."""


def make_profile_command(setup: Setup) -> click.Command:
    """Build the `profile` command around the spine's `setup` (cli.py registers the result)."""

    @click.command("profile")
    @click.option("--job", required=True, type=click.Path(exists=True, dir_okay=False),
                  help="Job file (TOML) whose model, data, devices and codec are profiled.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a job field, as for `mpifed train`.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False),
                  help="Profile file to write (JSON), read by `mpifed plan` and `mpifed train`.")
    @click.option("--points", default=8, show_default=True,
                  help="Batch sizes per compute curve (powers of two up to the memory cap).")
    @click.option("--repeats", default=5, show_default=True,
                  help="Timed steps per batch size and timed collectives per size; the median is kept.")
    @click.option("--warmup", default=2, show_default=True, help="Untimed steps per batch size first.")
    def profile(job: str, overrides: tuple[str, ...], out: str, points: int, repeats: int,
                warmup: int) -> None:
        """Measure each client's step-time curve and the collectives' alpha-beta costs."""
        comm, target = setup(job, overrides)
        start = time.perf_counter()
        result = run_profile(comm, target, points, repeats, warmup, comm_repeats=repeats)
        if result is not None:
            save_profile(result, out)
            click.echo(f"profiled {len(result.clients)} clients and {len(result.comm.costs)} "
                       f"collectives in {time.perf_counter() - start:.1f} s -> {out}")

    return profile
