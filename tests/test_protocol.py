"""The server and client sides of the round protocol issue the same collectives, in the same order.

A disagreement would deadlock a real job (only comm.timeout would catch it), so here every rank runs
in-process against a recording exchange (tests/recording.py): training's own loops (run_server,
run_client, run_worker), the start-up probe rounds, a resume and a run stopped by a signal, for jobs
that take every branch of the protocol (batches that move, a gathered codec with error feedback, a
multi-phase codec, a Python reduction operator, E > 1, per-coordinate squares, checkpoints, residuals
that move between ranks). The recorded sequences must be equal call by call: kind, dtype and element
count, except a gatherv's payload, whose size is each sender's own; and every point-to-point message
must be received by its peer, with as many bytes, in the same move.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpifed import checkpoint
from mpifed.client import prepare_client
from mpifed.config import load_job
from mpifed.probes import probe_rounds
from recording import SMALL, WORLD, RecordingExchange, first_difference, run_ranks, session, unmatched_messages


def run_sides(overrides: list[str], tmp, resume_from: dict | None = None) -> tuple[list, list]:
    """Rank 0's and rank 1's recorded collectives over one training run (rank 1: a client, or a worker
    when the job pools its clients), once every rank was found to agree and every message to match."""
    ranks = run_ranks(overrides, tmp, resume_from)
    assert ranks.problems() == []
    return ranks.calls[0], ranks.calls[1]


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
    on_torch = "comm.data=nccl" in overrides
    assert ("broadcast", "<f4", session(0, overrides).model.size, on_torch) in server  # the model went out
    assert any(call[1:2] == ("tensor",) for call in server) == on_torch  # the update where it lies


RESIDUALS_MOVE = JOBS["pooled, efsign (residuals move), checkpoints"]


def test_moving_residuals_are_sent_and_received_in_pairs(tmp_path):
    """Pooled error feedback: each round a residual goes from the worker that trained its client last to
    the one that trains it now, and at a checkpoint every residual goes to the server. Each message is
    matched, peer and bytes, by its receive (an unmatched one would hang or truncate a real job)."""
    ranks = run_ranks(RESIDUALS_MOVE, tmp_path)
    assert ranks.problems() == []
    n_bytes = 4 * ranks.sessions[0].model.n_params
    messages = [m for ex in ranks.exchanges for m in ex.messages]
    assert {m[4] for m in messages} == {n_bytes}  # a float32 residual each
    pairs = {(rank, peer) for rank, ex in enumerate(ranks.exchanges) for _, _, way, peer, _ in ex.messages
             if way == "send"}
    assert pairs & {(1, 2), (2, 1)} and {(1, 0), (2, 0)} <= pairs  # between workers, and to the server


STOPPED = {  # a signal after round 3 of 5 (not a checkpoint round): every side's checkpoint branch, then the end
    "one client a rank, topk + error feedback": ["compress.codec=topk", "train.rounds=5"],
    "one client a rank, grown batches, torch plane": ["scaling.grow_batch=true", "comm.data=nccl", "train.rounds=5"],
    "pooled, efsign (residuals move)": [*RESIDUALS_MOVE, "train.rounds=5"],
}


@pytest.mark.parametrize("overrides", STOPPED.values(), ids=STOPPED.keys())
def test_a_run_stopped_by_a_signal_agrees_and_checkpoints_its_round(overrides, tmp_path):
    """Any rank's SIGTERM is every rank's "stop" answer after round k: the clients send their state, the
    server checkpoints round k, and every rank ends there, having issued the same collectives."""
    ranks = run_ranks(overrides, tmp_path, stop_at=3)
    assert ranks.problems() == []
    server, *clients = ranks.results
    assert server.get("stopped") == 3 and clients == [True] * (WORLD - 1)
    assert [calls.count(("any",)) for calls in ranks.calls] == [3] * WORLD  # no round after the stop
    job = load_job(overrides=SMALL + overrides)
    _, state, _ = checkpoint.choose(tmp_path, checkpoint.identity(job, ranks.sessions[0].n_clients))
    assert state["round"] == 3
    whole = run_ranks(overrides, tmp_path / "whole")  # the same job unstopped: a stop is what cuts it short
    assert whole.results[0].get("stopped") is None and whole.calls[0].count(("any",)) == 5


def test_resumed_rounds_agree(tmp_path):
    """A resume hands each client its state before round 1: both sides take part in the same scatters."""
    job = ["compress.codec=topk", "checkpoint.every=2", "optim.momentum=0.9"]
    run_sides(job, tmp_path)
    _, state, _ = checkpoint.choose(tmp_path, checkpoint.identity(load_job(overrides=SMALL + job), WORLD - 1))
    server, client = run_sides(job + ["train.rounds=5"], tmp_path, resume_from=state)
    assert [c[0] for c in server[:2]] == ["scatter", "scatter"]  # cursors, then residuals


def test_resumed_pooled_rounds_agree(tmp_path):
    """A pooled resume: the server holds the checkpoint's residuals and moves each to its client's rank."""
    job = ["clients.count=5", "clients.per_round=3", "compress.codec=efsign", "checkpoint.every=2"]
    run_sides(job, tmp_path)
    _, state, _ = checkpoint.choose(tmp_path, checkpoint.identity(load_job(overrides=SMALL + job), 5))
    assert state["residuals"].shape[0] == len(state["residual_clients"]) > 0
    ranks = run_ranks(job + ["train.rounds=5"], tmp_path, resume_from=state)
    assert ranks.problems() == []
    assert ranks.calls[0][1] == ("move", "residuals")
    first = [m for m in ranks.exchanges[0].messages if m[0] == 1]
    assert first and all(way == "send" for _, _, way, _, _ in first)  # round 1's residuals leave the server


def test_probe_rounds_agree(tmp_path):
    overrides = ["compress.codec=topk", "plan.mode=predict"]
    server, client = session(0, overrides), session(1, overrides)
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


def test_an_unmatched_message_is_found():
    """The matching itself: a receive from the wrong rank, or of another size, is named by its pair."""
    a, b = RecordingExchange(0), RecordingExchange(1)
    residual = np.zeros(10, dtype=np.float32)
    a.move([(residual, 1)], [])
    b.move([], [(residual, 1)])
    assert unmatched_messages([a, b]) == [
        "rank 0 -> rank 1: sent (move, kind, bytes) [(1, 'move', 40)], received []",
        "rank 1 -> rank 1: sent (move, kind, bytes) [], received [(1, 'move', 40)]"]
    a, b = RecordingExchange(0), RecordingExchange(1)
    a.move([(residual, 1)], [])
    b.move([], [(residual[:5], 0)])
    assert unmatched_messages([a, b]) == ["rank 0 -> rank 1: sent (move, kind, bytes) [(1, 'move', 40)], "
                                          "received [(1, 'move', 20)]"]
    a.move([(residual, 3)], [])
    assert "rank 0 sends to or from rank 3, outside the world of 2" in unmatched_messages([a, b])


def test_pooled_rounds_open_with_the_assignment(tmp_path):
    """Pooled clients: each round starts with the (3, K) assignment, before the batches and the model."""
    server, worker = run_sides(JOBS["pooled"], tmp_path)
    assert server[0] == worker[0] == ("broadcast", "<i8", 4 * 3)
    assert server.count(("broadcast", "<i8", 12)) == 3  # once a round
