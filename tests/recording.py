"""Ranks in one process for tests: a recording exchange in place of MPI, and sessions built on it.

Each rank's training loop (run_server, run_client, run_worker) runs here against a RecordingExchange,
which records every collective and point-to-point message the rank issues instead of communicating.
The server runs first and keeps what it broadcasts and scatters; each client or worker then replays
that in order, so it trains the clients, batches and cursors the server sent it, and its messages
are those a real run would send. The stop question ("did any rank get a signal?") is answered yes
at a chosen round, as the allreduce would answer every rank.

    ranks = run_ranks(["clients.count=5", "clients.per_round=3"], tmp_path, stop_at=2)
    assert ranks.problems() == []
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from mpi4py import MPI

from mpifed.client import prepare_client, run_client
from mpifed.cluster import World
from mpifed.config import load_job
from mpifed.exchange import Exchange
from mpifed.progress import Progress
from mpifed.server import run_server
from mpifed.session import Session, open_session
from mpifed.worker import prepare_worker, run_worker

WORLD = 3  # a server and two clients
SMALL = ["data.train_size=300", "data.test_size=64", "train.rounds=3", "train.batch=16", "train.eval_every=0"]


class RecordingExchange(Exchange):
    """Records every collective this rank issues instead of communicating. A root's gathers come back
    filled with its own row (gatherv: one empty payload per rank), so its loop runs on; the root keeps
    copies of what it broadcasts and scatters (`sent`), which a client given them as `replay` receives.
    Point-to-point messages are recorded with their peer and size (`messages`); the stop question
    (`largest`) is answered yes (a signal's STOP_ASKED) the `stop_at`-th time (0: never)."""

    def __init__(self, rank: int, data_plane: bool = False, stop_at: int = 0):
        super().__init__(SimpleNamespace(rank=rank, size=WORLD), polite=False, data=data_plane or None)
        self.calls: list[tuple] = []
        self.messages: list[tuple] = []  # (move number, kind, "send" or "receive", peer rank, bytes)
        self.sent: list[np.ndarray] = []  # the root's broadcasts and scattered tables, in order
        self.replay: list[np.ndarray] = []  # a client's: the root's `sent`, received in order
        self.stop_at, self.asked, self.moves = stop_at, 0, 0

    def _share(self, buf: np.ndarray, scattered: bool = False) -> None:
        """The root keeps a copy of what it sends; a replaying client receives the root's next one (its
        own row of a scattered table)."""
        if self.comm.rank == 0:
            self.sent.append(buf.copy())
            return
        if not self.replay:
            return
        root = self.replay.pop(0)
        root = root[self.comm.rank] if scattered else root
        assert (root.dtype, root.shape) == (buf.dtype, buf.shape), \
            f"rank {self.comm.rank} receives {buf.dtype}{buf.shape} where the server sent {root.dtype}{root.shape}"
        buf[...] = root

    def broadcast_tensor(self, tensor):  # as MPI's, or the torch data plane's (comm.data = "nccl")
        self.calls.append(("broadcast", "<f4", tensor.numel(), self.data is not None))
        self._share(tensor.detach().numpy())

    def reduce_tensor(self, tensor, everyone=False):  # the direct path on a torch data plane
        self.calls.append(("allreduce" if everyone else "reduce", "tensor", tensor.numel()))

    def reduce_data(self, buf, op=MPI.SUM, everyone=False, as_tensor=torch.from_numpy):
        if self.data is None:
            return self.reduce_sum(buf, op, everyone)
        self.reduce_tensor(as_tensor(buf), everyone)  # host bytes on a torch plane: reduced as a tensor

    def broadcast(self, buf):
        self.calls.append(("broadcast", buf.dtype.str, buf.size))
        self._share(buf)

    def reduce_sum(self, buf, op=MPI.SUM, everyone=False):
        self.calls.append(("allreduce" if everyone else "reduce", buf.dtype.str, buf.size, op is MPI.SUM))

    def gather_rows(self, row, table):
        self.calls.append(("gather", row.dtype.str, row.size))
        if table is not None:
            table[:] = row

    def scatter_rows(self, table, row):
        self.calls.append(("scatter", row.dtype.str, row.size))
        self._share(table if self.comm.rank == 0 else row, scattered=True)

    def largest(self, value):  # the stop question (Exchange.any asks it too): yes at the stop_at-th
        self.calls.append(("any",))
        self.asked += 1
        return max(int(value), int(self.asked == self.stop_at))

    def arrive(self):
        self.calls.append(("barrier",))

    def move(self, sends, receives, kind="move"):  # point to point: each side its own messages
        self.moves += 1
        self.calls.append(("move", kind))
        self.messages += [(self.moves, kind, "send", peer, buf.nbytes) for buf, peer in sends]
        self.messages += [(self.moves, kind, "receive", peer, buf.nbytes) for buf, peer in receives]

    def gather_bytes(self, payload):  # host bytes, or (a client on a data plane) a uint8 tensor
        payload = payload.numpy() if isinstance(payload, torch.Tensor) else payload
        self.calls.append(("gatherv", payload.dtype.str))
        return [np.zeros(0, np.uint8)] * WORLD if self.comm.rank == 0 else None


class _Comm(SimpleNamespace):
    def allgather(self, obj):  # the data plane's check of every rank's device
        return [obj] * WORLD

    def gather(self, obj, root=0):  # the pickled start-up gather of /ranks facts
        return [dict(max_batch=0, data_size=1)] * WORLD if self.rank == root else None


class _Writer:
    def append_round(self, table, server, clients=None):
        assert table.shape[0] == WORLD

    def append_eval(self, values):
        pass


def session(rank: int, overrides: list[str], stop_at: int = 0) -> Session:
    """Rank `rank`'s session of the job SMALL + `overrides`, on a RecordingExchange."""
    job = load_job(overrides=SMALL + overrides)
    world = World(_Comm(rank=rank, size=WORLD), rank, WORLD, 0, 1, "test", torch.get_num_threads())
    on_torch = job.comm.data == "nccl"  # recorded, not opened: the rounds must issue the plane's calls alike
    s = open_session(world, dataclasses.replace(job, comm=dataclasses.replace(job.comm, data="mpi-host")))
    s.exchange = RecordingExchange(rank, data_plane=on_torch, stop_at=stop_at)
    s.max_batches, s.data_sizes = [0] * s.n_clients, [300] * s.n_clients
    return s


def first_difference(a: list[tuple], b: list[tuple]) -> str:
    """'' when both sides issue the same collectives; else where and how they part."""
    for i, (x, y) in enumerate(zip(a, b)):
        same = x[:2] == y[:2] if x[0] == "gatherv" else x == y
        if not same:
            return f"collective {i}: server {x}, client {y}"
    if len(a) != len(b):
        return f"server issues {len(a)} collectives, client {len(b)}"
    return ""


def unmatched_messages(exchanges: list[RecordingExchange]) -> list[str]:
    """Every point-to-point message, sent by one rank to a rank of the world and received by that rank
    from the sender in the same move, with as many bytes, in the same order (MPI matches them so); one
    line for each pair of ranks where not."""
    problems = [f"rank {rank} {way}s to or from rank {peer}, outside the world of {len(exchanges)}"
                for rank, ex in enumerate(exchanges) for _, _, way, peer, _ in ex.messages
                if not 0 <= peer < len(exchanges)]
    for src, a in enumerate(exchanges):
        for dst, b in enumerate(exchanges):
            sent = [(move, kind, n) for move, kind, way, peer, n in a.messages if way == "send" and peer == dst]
            got = [(move, kind, n) for move, kind, way, peer, n in b.messages if way == "receive" and peer == src]
            if sent != got:
                problems.append(f"rank {src} -> rank {dst}: sent (move, kind, bytes) {sent}, received {got}")
    return problems


@dataclasses.dataclass
class Ranks:
    """What each rank did over one run, rank 0 (the server) first."""

    sessions: list[Session]
    calls: list[list[tuple]]  # each rank's collectives over the rounds (a client's start-up report left out)
    results: list             # run_server's final dict, then each client's "stopped early"

    @property
    def exchanges(self) -> list[RecordingExchange]:
        return [s.exchange for s in self.sessions]

    def problems(self) -> list[str]:
        """Where a client's collectives part from the server's, and each message without its match."""
        parted = [f"rank {rank}: {said}" for rank, calls in enumerate(self.calls[1:], 1)
                  if (said := first_difference(self.calls[0], calls))]
        return parted + unmatched_messages(self.exchanges)


def run_ranks(overrides: list[str], tmp: Path, resume_from: dict | None = None, stop_at: int = 0) -> Ranks:
    """Every rank of one training run, the server first, then each client or worker replaying what it
    sent. `stop_at`: the round after which a signal stops the run (its k-th stop question; 0 none)."""
    sessions = [session(rank, overrides, stop_at) for rank in range(WORLD)]
    server, clients = sessions[0], sessions[1:]
    for s in sessions:
        if resume_from is not None:
            s.start_round = int(resume_from["round"])
    server.resumed_from = resume_from
    results = [run_server(server, _Writer(), tmp, Progress("off", server.job.train.rounds, 1))]
    calls = [server.exchange.calls]
    for client in clients:
        pooled = client.placement.pooled
        setup = prepare_worker(client) if pooled else prepare_client(client)
        client.exchange.calls.clear()  # from here on, both sides run the rounds
        client.exchange.replay = list(server.exchange.sent)
        results.append((run_worker if pooled else run_client)(client, setup))
        report, *rounds = client.exchange.calls
        assert report == ("barrier",)  # the client's start-up report, whose server side is train.py's
        calls.append(rounds)
    return Ranks(sessions, calls, results)
