"""The server and client sides of the round protocol issue the same collectives, in the same order.

A disagreement would deadlock a real job (only comm.timeout would catch it), so here each side runs
in-process against a recording exchange: training's own loops (run_server, run_client), the
start-up probe rounds and a resume, for jobs that take every branch of the protocol (batches that
move, a gathered codec with error feedback, a multi-phase codec, a Python reduction operator, E > 1,
per-coordinate squares, checkpoints). The two recorded sequences must be equal call by call: kind,
dtype and element count, except a gatherv's payload, whose size is each sender's own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpifed import checkpoint
from mpifed.client import prepare_client, run_client
from mpifed.cluster import World
from mpifed.config import load_job
from mpifed.exchange import Exchange
from mpifed.probes import probe_rounds
from mpifed.progress import Progress
from mpifed.server import run_server
from mpifed.session import open_session
from mpifed.worker import prepare_worker, run_worker

WORLD = 3  # a server and two clients
SMALL = ["data.train_size=300", "data.test_size=64", "train.rounds=3", "train.batch=16", "train.eval_every=0"]


class RecordingExchange(Exchange):
    """Records every collective this rank issues instead of communicating. A root's gathers come back
    filled with its own row (gatherv: one empty payload per rank), so its loop runs on."""

    def __init__(self, rank: int, data_plane: bool = False):
        super().__init__(SimpleNamespace(rank=rank, size=WORLD), polite=False, data=data_plane or None)
        self.calls: list[tuple] = []

    def broadcast_tensor(self, tensor):  # as MPI's, or the torch data plane's (comm.data = "nccl")
        self.calls.append(("broadcast", "<f4", tensor.numel(), self.data is not None))

    def reduce_tensor(self, tensor, everyone=False):  # the direct path on a torch data plane
        self.calls.append(("allreduce" if everyone else "reduce", "tensor", tensor.numel()))

    def reduce_data(self, buf, op=MPI.SUM, everyone=False, as_tensor=torch.from_numpy):
        if self.data is None:
            return self.reduce_sum(buf, op, everyone)
        self.reduce_tensor(as_tensor(buf), everyone)  # host bytes on a torch plane: reduced as a tensor

    def broadcast(self, buf):
        self.calls.append(("broadcast", buf.dtype.str, buf.size))

    def reduce_sum(self, buf, op=MPI.SUM, everyone=False):
        self.calls.append(("allreduce" if everyone else "reduce", buf.dtype.str, buf.size, op is MPI.SUM))

    def gather_rows(self, row, table):
        self.calls.append(("gather", row.dtype.str, row.size))
        if table is not None:
            table[:] = row

    def scatter_rows(self, table, row):
        self.calls.append(("scatter", row.dtype.str, row.size))

    def largest(self, value):
        self.calls.append(("any",))
        return 0

    def arrive(self):
        self.calls.append(("barrier",))

    def move(self, sends, receives, kind="move"):  # point to point: each side its own messages
        self.calls.append(("move", kind))

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


def _session(rank: int, overrides: list[str]):
    job = load_job(overrides=SMALL + overrides)
    world = World(_Comm(rank=rank, size=WORLD), rank, WORLD, 0, 1, "test", torch.get_num_threads())
    on_torch = job.comm.data == "nccl"  # recorded, not opened: the rounds must issue the plane's calls alike
    s = open_session(world, dataclasses.replace(job, comm=dataclasses.replace(job.comm, data="mpi-host")))
    s.exchange = RecordingExchange(rank, data_plane=on_torch)
    s.max_batches, s.data_sizes = [0] * s.n_clients, [300] * s.n_clients
    return s


def run_sides(overrides: list[str], tmp: Path, resume_from: dict | None = None) -> tuple[list, list]:
    """Each side's recorded collectives over one training run (rank 0, then rank 1: a client, or a
    worker when the job pools its clients)."""
    server, client = _session(0, overrides), _session(1, overrides)
    for s in (server, client):
        if resume_from is not None:
            s.start_round = int(resume_from["round"])
    server.resumed_from = resume_from
    pooled = client.placement.pooled
    setup = prepare_worker(client) if pooled else prepare_client(client)
    client.exchange.calls.clear()  # from here on, both sides run the rounds
    (run_worker if pooled else run_client)(client, setup)
    run_server(server, _Writer(), tmp, Progress("off", server.job.train.rounds, 1))
    report, *rounds = client.exchange.calls
    assert report == ("barrier",)  # the client's start-up report, whose server side is train.py's
    return server.exchange.calls, rounds


def first_difference(a: list[tuple], b: list[tuple]) -> str:
    """'' when both sides issue the same collectives; else where and how they part."""
    for i, (x, y) in enumerate(zip(a, b)):
        same = x[:2] == y[:2] if x[0] == "gatherv" else x == y
        if not same:
            return f"collective {i}: server {x}, client {y}"
    if len(a) != len(b):
        return f"server issues {len(a)} collectives, client {len(b)}"
    return ""


JOBS = {
    "default": [],
    "topk, error feedback, checkpoints": ["compress.codec=topk", "checkpoint.every=2"],
    "fp16 (a Python reduction op)": ["compress.codec=fp16"],
    "powersgd (several phases)": ["compress.codec=powersgd"],
    "E = 2": ["train.local_steps=2"],
    "per-coordinate, summable": ["scaling.method=step+teacher", "scaling.per_layer=false", "scaling.small_batch=8"],
    "per-coordinate, gathered": ["scaling.method=teacher", "scaling.per_layer=false", "scaling.small_batch=8",
                                 "compress.codec=qsgd"],
    "grown batches": ["scaling.grow_batch=true"],
    "torch data plane, direct": ["comm.data=nccl", "scaling.method=step+teacher", "scaling.per_layer=false",
                                 "scaling.small_batch=8", "checkpoint.every=2"],
    "torch data plane, pooled": ["comm.data=nccl", "clients.count=5", "clients.per_round=3"],
    "torch data plane, fp16 on the device": ["comm.data=nccl", "compress.codec=fp16", "scaling.method=teacher",
                                             "scaling.per_layer=false", "scaling.small_batch=8"],
    "torch data plane, pooled bf16": ["comm.data=nccl", "compress.codec=bf16", "clients.count=5",
                                      "clients.per_round=3"],
    "torch data plane, topk + feedback on the device": ["comm.data=nccl", "compress.codec=topk",
                                                        "checkpoint.every=2"],
    "torch data plane, qsgd, per-coordinate": ["comm.data=nccl", "compress.codec=qsgd", "scaling.method=teacher",
                                               "scaling.per_layer=false", "scaling.small_batch=8"],
    "torch data plane, powersgd": ["comm.data=nccl", "compress.codec=powersgd", "checkpoint.every=2"],
    "torch data plane, pooled qsgd on the device": ["comm.data=nccl", "compress.codec=qsgd", "clients.count=5",
                                                    "clients.per_round=3"],
    "torch data plane, pooled topk + feedback on the host": ["comm.data=nccl", "compress.codec=topk",
                                                             "clients.count=5", "clients.per_round=3"],
    "torch data plane, randomk, per-coordinate": ["comm.data=nccl", "compress.codec=randomk",
                                                  "scaling.method=teacher", "scaling.per_layer=false",
                                                  "scaling.small_batch=8"],
    "pooled": ["clients.count=5", "clients.per_round=3"],
    "pooled, topk, checkpoints": ["clients.count=5", "clients.per_round=3", "compress.codec=topk",
                                  "compress.options={error_feedback = false}", "checkpoint.every=2"],
    "pooled, efsign (residuals move), checkpoints": ["clients.count=5", "clients.per_round=3", "compress.codec=efsign",
                                                     "checkpoint.every=2"],
    "pooled, powersgd, per-coordinate": ["clients.count=4", "compress.codec=powersgd",
                                         "compress.options={error_feedback = false}", "scaling.method=teacher",
                                         "scaling.per_layer=false", "scaling.small_batch=8"],
}


@pytest.mark.parametrize("overrides", JOBS.values(), ids=JOBS.keys())
def test_training_rounds_agree(overrides, tmp_path):
    server, client = run_sides(overrides, tmp_path)
    assert first_difference(server, client) == ""
    on_torch = "comm.data=nccl" in overrides
    assert ("broadcast", "<f4", _session(0, overrides).model.size, on_torch) in server  # the model went out
    assert any(call[1:2] == ("tensor",) for call in server) == on_torch  # the update where it lies


def test_resumed_rounds_agree(tmp_path):
    """A resume hands each client its state before round 1: both sides take part in the same scatters."""
    job = ["compress.codec=topk", "checkpoint.every=2", "optim.momentum=0.9"]
    run_sides(job, tmp_path)
    _, state, _ = checkpoint.choose(tmp_path, checkpoint.identity(load_job(overrides=SMALL + job), WORLD - 1))
    server, client = run_sides(job + ["train.rounds=5"], tmp_path, resume_from=state)
    assert first_difference(server, client) == ""
    assert [c[0] for c in server[:2]] == ["scatter", "scatter"]  # cursors, then residuals


def test_resumed_pooled_rounds_agree(tmp_path):
    """A pooled resume: the server holds the checkpoint's residuals and moves each to its client's rank."""
    job = ["clients.count=5", "clients.per_round=3", "compress.codec=efsign", "checkpoint.every=2"]
    run_sides(job, tmp_path)
    _, state, _ = checkpoint.choose(tmp_path, checkpoint.identity(load_job(overrides=SMALL + job), 5))
    assert state["residuals"].shape[0] == len(state["residual_clients"]) > 0
    server, worker = run_sides(job + ["train.rounds=5"], tmp_path, resume_from=state)
    assert first_difference(server, worker) == ""
    assert server[1] == ("move", "residuals")


def test_probe_rounds_agree(tmp_path):
    overrides = ["compress.codec=topk", "plan.mode=predict"]
    server, client = _session(0, overrides), _session(1, overrides)
    probe_rounds(client, prepare_client(client), [4, 8], repeats=2)
    probe_rounds(server, None, [0, 0], repeats=2)
    assert first_difference(server.exchange.calls, client.exchange.calls) == ""


def test_a_missing_step_is_found():
    """The comparison itself: a client that skips the stop check is caught where it parts."""
    server = [("broadcast", "<f4", 10), ("reduce", "<f4", 5, True), ("gather", "<f8", 16), ("any",)]
    assert first_difference(server, server[:3]) == "server issues 4 collectives, client 3"
    assert first_difference(server, [server[0], ("gather", "<f8", 16)]) == \
        "collective 1: server ('reduce', '<f4', 5, True), client ('gather', '<f8', 16)"
    assert first_difference([("gatherv", "|u1")], [("gatherv", "|u1")]) == ""


def test_pooled_rounds_open_with_the_assignment(tmp_path):
    """Pooled clients: each round starts with the (3, K) assignment, before the batches and the model."""
    server, worker = run_sides(JOBS["pooled"], tmp_path)
    assert server[0] == worker[0] == ("broadcast", "<i8", 4 * 3)
    assert server.count(("broadcast", "<i8", 12)) == 3  # once a round
