"""`mpifed bench rounds`: one round's exchange per codec at n ranks, as a ratio to dense fp32.

A round here is what a codec changes: training's own protocol steps (mpifed.protocol) for the model
broadcast and the whole update path (client encode, error feedback and norms, the codec's collectives
with the job's waiting mode, the dense tail, the server's validation and decoding). The local training step is the
same whatever the codec, so it is left out; add it back with the step times of `mpifed bench
compress`. Codecs are timed interleaved, one round each per repeat, so drift hits all alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import click
import numpy as np

from mpifed.bench.launch import report, run_ranks, run_worker

if TYPE_CHECKING:
    from mpifed.compress import Codec

DEFAULT_CODECS = "none,fp16,topk,randomk,qsgd,sign,powersgd"


@dataclass(frozen=True)
class RoundTime:
    codec: str
    seconds: float  # median wall time of one exchange round
    vs_dense: float  # seconds / the "none" codec's seconds


def compare_round_times(run_round: Callable[[Codec], float], codecs: Mapping[str, Codec],
                        repeats: int = 5) -> list[RoundTime]:
    """Median round time per codec and its ratio to dense ("none", which `codecs` must hold).

    run_round(codec) runs one full exchange round with `codec` on every rank (encode, collective(s),
    validate/decode/sum on the server) and returns its wall time on rank 0; `_worker`'s run_round
    does (model broadcast plus an UpdateChannel's exchange). Codecs are timed interleaved, one round
    each per repeat, so drift hits all alike.
    """
    if "none" not in codecs:
        raise ValueError("compare_round_times needs the dense baseline: include codecs['none']")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    samples: dict[str, list[float]] = {name: [] for name in codecs}
    for _ in range(repeats):
        for name, codec in codecs.items():
            samples[name].append(run_round(codec))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    return [RoundTime(name, medians[name], medians[name] / medians["none"]) for name in codecs]


def _worker(model_name: str, codec_names: list[str], repeats: int) -> None:
    import torch

    from mpifed.cluster import init_world
    from mpifed.compress import make_codec
    from mpifed.exchange import Exchange
    from mpifed.flat import FlatModel
    from mpifed.models import build_model
    from mpifed.placement import Placement
    from mpifed.protocol import RoundProtocol
    from mpifed.updates import UpdateChannel

    world = init_world()
    flat = FlatModel(build_model(model_name, 10))
    placement = Placement.one_per_rank(world.size)
    exchange = Exchange(world.comm, polite=world.oversubscribed, placement=placement)
    n, client = flat.n_params, placement.client_on(world.rank)
    layers = list(flat.layout)
    gen = np.random.default_rng(world.rank)
    weights = np.full(placement.n_clients, 1.0 / placement.n_clients)
    protocols = {name: RoundProtocol(exchange, flat, UpdateChannel(make_codec(name, layers=layers), exchange, n, 0,
                                                                   client), placement, world.rank)
                 for name in codec_names}
    by_codec = {id(p.channel.codec): p for p in protocols.values()}
    size = max(p.layout.update_size if client is not None else p.layout.aggregate_size for p in protocols.values())
    buffer = torch.zeros(size)
    buffer[:n] = torch.from_numpy((1e-3 * gen.standard_normal(n)).astype(np.float32))
    counter = [0]

    def run_round(codec) -> float:
        protocol = by_codec[id(codec)]
        world.comm.Barrier()
        start = time.perf_counter()
        protocol.share_model(flat.flat)
        if client is None:
            protocol.receive_update(counter[0], buffer[: protocol.layout.aggregate_size], weights)
        else:  # weight 1: the same work, and the update stays as it is from round to round
            protocol.send_update(counter[0], buffer[: protocol.layout.update_size], 1.0)
        counter[0] += 1
        return world.comm.bcast(time.perf_counter() - start, root=0)

    rows = compare_round_times(run_round, {name: p.channel.codec for name, p in protocols.items()}, repeats)
    if world.is_server:
        result = [dict(codec=r.codec, seconds=r.seconds, ratio=r.vs_dense, nbytes=protocols[r.codec].channel.nbytes)
                  for r in rows]
        report(dict(model=model_name, ranks=world.size, n=n, rows=result))


@click.command("rounds")
@click.option("--ranks", default=8, show_default=True, help="World size (1 server + ranks-1 clients).")
@click.option("--model", default="resnet18", show_default=True, help="Model whose parameter vector travels.")
@click.option("--codecs", default=DEFAULT_CODECS, show_default=True, help="Comma-separated codecs ('none' is added).")
@click.option("--repeats", default=5, show_default=True, help="Rounds per codec; the median is reported.")
def rounds(ranks, model, codecs, repeats):
    """Exchange time of one round per codec at n ranks, against dense fp32, measured side by side."""
    from rich.console import Console
    from rich.table import Table

    names = list(dict.fromkeys(["none", *codecs.split(",")]))
    res = run_worker(ranks, "mpifed.bench.rounds", [model, ",".join(names), str(repeats)], timeout=1800)
    table = Table(title=f"{res['model']} ({res['n']:,} values), {res['ranks']} ranks: model broadcast + update "
                        f"exchange, median of {repeats} interleaved rounds")
    for col in ("codec", "bytes/client", "seconds", "vs dense"):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        table.add_row(r["codec"], f"{r['nbytes']:,}", f"{r['seconds']:.4f}", f"{r['ratio']:.2f}x")
    Console(width=160).print(table)


if __name__ == "__main__":
    run_ranks(lambda: _worker(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])))
