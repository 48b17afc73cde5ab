"""`mpifed bench exchange`: one round's model exchange, four transports, same model, same ranks.

  mpifed     Exchange.broadcast of the flat model + Exchange.reduce_sum of the flat updates (MPI)
  gloo       the same Exchange calls on the torch.distributed data plane (comm.data = "nccl", which is
             gloo on CPU): broadcast_tensor + reduce_tensor, codec none's direct path
  pickled    what many FL frameworks do: torch.save the state dict to bytes, send it to each client
             point-to-point, torch.load it there; each client sends its serialized gradients back,
             the server deserializes and sums them
  bare       mpi4py's blocking Bcast + Reduce on a numpy buffer of the same bytes: no chunking and no
             back-off, so its waiting ranks spin (mpifed backs off where ranks outnumber cores)

The command launches `mpirun -n N` once per rank count, the ranks time the transports one round
each in turn (median of --rounds after a warm-up round of each), and the ratios are printed side
by side from one run.
"""

from __future__ import annotations

import io
import sys
import time

import click
import numpy as np

from mpifed.bench.launch import report, run_ranks, run_worker


def _interleaved_medians(comm, rounds_of: dict, rounds: int) -> dict[str, float]:
    """Median per transport of the time from a common start until the root holds the sum. One round of
    each transport in turn per repeat (after a warm-up round of each), so drift weighs on all alike."""
    times: dict[str, list[float]] = {label: [] for label in rounds_of}
    for i in range(rounds + 1):
        for label, fn in rounds_of.items():
            comm.Barrier()
            start = time.perf_counter()
            fn()
            elapsed = comm.bcast(time.perf_counter() - start if comm.rank == 0 else None, root=0)
            if i:
                times[label].append(elapsed)
    return {label: float(np.median(t)) for label, t in times.items()}


def _worker(models: list[str], rounds: int) -> None:
    import torch
    from mpi4py import MPI

    from mpifed.cluster import init_world
    from mpifed.dataplane import TorchPlane
    from mpifed.exchange import Exchange
    from mpifed.flat import FlatModel
    from mpifed.models import build_model

    world = init_world()
    comm = world.comm
    plane = TorchPlane(comm, torch.device("cpu"), 0.0, world.local_size == world.size)
    results = []
    for name in models:
        flat = FlatModel(build_model(name, 10))
        buf = flat.flat.numpy()
        update = np.ones(flat.size, np.float32)
        exchange = Exchange(comm, polite=world.oversubscribed)
        on_gloo = Exchange(comm, polite=world.oversubscribed, data=plane)
        tensor = torch.ones(flat.size)

        def mpifed_round():
            exchange.broadcast(buf)
            exchange.reduce_sum(update if comm.rank else np.zeros_like(update))

        def gloo_round():
            on_gloo.broadcast_tensor(flat.flat)
            on_gloo.reduce_tensor(tensor if comm.rank else torch.zeros_like(tensor))

        def bare_round():
            comm.Bcast(buf, root=0)
            if comm.rank == 0:
                comm.Reduce(MPI.IN_PLACE, np.zeros_like(update), op=MPI.SUM, root=0)
            else:
                comm.Reduce(update, None, op=MPI.SUM, root=0)

        module = flat.module
        grads = {n: torch.ones_like(p) for n, p in module.named_parameters()}

        def pickled_round():
            if comm.rank == 0:
                blob = io.BytesIO()
                torch.save(module.state_dict(), blob)
                data = blob.getvalue()
                for dest in range(1, comm.size):
                    comm.send(data, dest=dest)
                total = {n: torch.zeros_like(g) for n, g in grads.items()}
                for src in range(1, comm.size):
                    received = torch.load(io.BytesIO(comm.recv(source=src)), weights_only=True)
                    for n, g in received.items():
                        total[n] += g
            else:
                state = torch.load(io.BytesIO(comm.recv(source=0)), weights_only=True)
                module.load_state_dict(state)
                blob = io.BytesIO()
                torch.save(grads, blob)
                comm.send(blob.getvalue(), dest=0)

        row = dict(model=name, ranks=comm.size, mbytes=flat.size * 4 / 1e6, wait="sleep" if exchange.polite else "poll")
        row.update(_interleaved_medians(comm, dict(mpifed=mpifed_round, gloo=gloo_round, bare=bare_round,
                                                   pickled=pickled_round), rounds))
        results.append(row)
    if comm.rank == 0:
        report(results)


@click.command("exchange")
@click.option("--ranks", default="4,8", show_default=True, help="Comma-separated world sizes to run.")
@click.option("--models", default="resnet18,resnet50", show_default=True, help="Comma-separated models.")
@click.option("--rounds", default=5, show_default=True, help="Timed rounds per transport (after one warm-up).")
@click.option("--timeout", default=900, show_default=True, help="Seconds allowed per mpirun.")
def exchange(ranks, models, rounds, timeout):
    """Model exchange time: mpifed on MPI and on gloo vs pickled point-to-point vs bare mpi4py collectives."""
    from rich.console import Console
    from rich.table import Table

    rows = []
    for n in [int(r) for r in ranks.split(",")]:
        rows += run_worker(n, "mpifed.bench.exchange", [models, str(rounds)], timeout)
    table = Table(title="one round's model exchange (broadcast + update reduction), median seconds")
    for col in ("ranks", "model", "MB", "wait", "mpifed", "gloo", "bare mpi4py", "pickled p2p",
                "gloo / mpifed", "pickled / mpifed", "mpifed / bare"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["ranks"]), r["model"], f"{r['mbytes']:.1f}", r["wait"], f"{r['mpifed']:.4f}",
                      f"{r['gloo']:.4f}", f"{r['bare']:.4f}", f"{r['pickled']:.4f}", f"{r['gloo'] / r['mpifed']:.2f}x",
                      f"{r['pickled'] / r['mpifed']:.2f}x", f"{r['mpifed'] / r['bare']:.2f}x")
    Console(width=160).print(table)


if __name__ == "__main__":
    run_ranks(lambda: _worker(sys.argv[1].split(","), int(sys.argv[2])))
