"""A worker rank's rounds when clients are pooled: train the round's clients one after another, send once.

With more clients than client ranks, or K of N sampled each round (mpifed.placement), a rank is a
worker and a client is data, a sampler cursor and a device profile. Each round the server says which
clients train and where (protocol step 0); a worker trains each of its clients from the broadcast model
(the model is reset between them), hands each update to `RoundProtocol.add_client` (summable codecs:
w_k u_k into one buffer; gathered codecs: the client's own payload), and takes part in the round's
collectives once: a reduce stays O(ranks), not O(clients), and a gather carries one payload per client.

State: a client carries its sampler cursor and, with error feedback, its residual between rounds (the
local optimizer is plain SGD, rebuilt from the model). The server keeps the N cursors (8 bytes a
client) and sends each with the assignment; a residual (n float32) stays on the worker that trained
the client last and moves point to point to the rank that trains it next (protocol.move_residuals),
so it follows its client and a checkpoint gathers them all on the server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from mpifed import memory as mem
from mpifed import profiles
from mpifed.client import InjectedFault, budget_facts, local_steps, partitions
from mpifed.compress import ErrorFeedback, make_codec
from mpifed.config import Job, JobError
from mpifed.data import ClientSampler
from mpifed.learn.loading import job_clients, load_data, make_model
from mpifed.learn.partition import Partition
from mpifed.learn.samples import DeviceSamples, LazySamples
from mpifed.optimizers import local_optimizer
from mpifed.placement import Placement
from mpifed.protocol import STOP_ASKED, payload_size
from mpifed.runlog import CLIENT_FIELDS, ITER_FIELDS, column
from mpifed.schedule import learning_rate
from mpifed.session import Session, gather_rank_facts
from mpifed.units import format_bytes


@dataclass
class WorkerSetup:
    """What a worker prepares once: every client's partition, the whole train split on the device, and
    the memory model's cap per profile (sized once per profile, not per client)."""

    parts: Partition            # every client's sample indices (the node's shared copy, where there is one)
    samples: LazySamples | DeviceSamples  # the whole train split: node-shared and converted batch by batch,
                                          # or (data.share = "rank") converted once onto the device
    caps: np.ndarray            # per profile name (sorted), largest batch; 0 = not sized
    memory: dict                # profile name -> fitted memory model record
    messages: list[str]
    budget: mem.Budget | None = None  # the host's budget a profile was sized against (None: none was)
    guards: dict = field(default_factory=dict)  # profile name -> mem.BudgetGuard, where its memory is emulated


WORKER_FIELDS = [CLIENT_FIELDS.index(f) for f in ("loss", "t_compute", "grad_norm", "bytes_up", "acc")]
"""The columns of /clients a worker fills; the server adds id, rank, batch and rejected."""

RESIDUAL_SHARE = 0.5
"""The most of a node's available memory that the clients' error-feedback residuals may take."""


def residual_problem(n_clients: int, n_params: int, available: int, codec: str) -> str:
    """Why N residuals of n float32 would not fit (all of them are on rank 0 at each checkpoint), or ''."""
    need = 4 * n_clients * n_params
    if need <= RESIDUAL_SHARE * available:
        return ""
    return (f"error feedback (compress.codec = {codec!r}) keeps a residual of {n_params:,} float32 per client: "
            f"{n_clients:,} clients x {format_bytes(4 * n_params)} = {format_bytes(need)}, spread over the worker "
            f"ranks and gathered on rank 0 at each checkpoint, but this node has {format_bytes(available)} "
            f"available ({RESIDUAL_SHARE:.0%} of it is the limit); lower clients.count to at most "
            f"{int(RESIDUAL_SHARE * available // (4 * n_params)):,}, use a smaller model, or set "
            f"compress.options.error_feedback = false")


def check_client_state(job: Job, world_size: int) -> None:
    """Rank 0, before the run starts: refuse a pooled job whose clients' error-feedback residuals would
    not fit in this node's memory."""
    n_clients = len(job_clients(job, world_size))
    codec = make_codec(job.compress.codec, layers=[("check", (4, 4))], **job.compress.options)
    if not (Placement.of_job(n_clients, world_size, job.clients.per_round).pooled and codec.error_feedback):
        return
    n_params = sum(p.numel() for p in make_model(job, load_data(job).task).parameters())
    problem = residual_problem(n_clients, n_params, mem.device_budget("cpu"), job.compress.codec)
    if problem:
        raise JobError(problem)


def prepare_worker(s: Session) -> WorkerSetup:
    """Partition for all N clients, load the train split once, size each profile's batch."""
    job = s.job
    parts = partitions(s)
    if s.job.data.share == "node":  # the raw split (the node's shared copy), converted batch by batch
        samples = LazySamples(s.dataset, s.device)
    else:
        samples = DeviceSamples(s.dataset, None, s.device)
    names = s.profile_names.names
    caps, records, messages, budgets, guards = np.zeros(len(names), dtype=np.int64), {}, [], [], {}
    if job.memory.size_clients:
        step = mem.StepSpec(optimizer="none" if job.train.local_steps == 1 else "sgd", momentum=0.0,
                            weight_decay=job.optim.weight_decay, keep_grads=True)
        # held outside the step: the train split (when a rank holds its own), the update and its sum, the E>1
        # start copy and the reset copy
        held = samples.nbytes + 4 * (2 * payload_size(s.model) + 2 * s.model.size)
        for i, name in enumerate(names):
            profile = job.profile(name)
            sized_against = mem.client_budget(s.device, profile.memory, s.world.local_size)
            budget = sized_against.bytes
            budgets.append(sized_against)
            requested = int(s.batches[s.profile_names.codes == i].max())
            sizing = mem.size_client(s.model.module, s.task.input_shape, s.task.classes, step, s.device,
                                     int(budget), requested, f"profile {name} (rank {s.world.rank})",
                                     strict=job.memory.strict, margin=job.memory.margin,
                                     multiple_of=job.memory.multiple_of, extra_static_bytes=int(held), task=s.task)
            caps[i], records[name] = sizing.max_batch, sizing.model.as_record()
            if sizing.message:
                messages.append(sizing.message)
            if profile.memory and job.memory.enforce:  # checked before each of its clients' steps (no CUDA
                # memory fraction: one process trains clients of several profiles)
                guards[name] = mem.BudgetGuard(sizing.model, int(profile.memory), f"profile {name}")
    host = [b for b in budgets if b.source != "profile memory"]  # the host's, where a profile sets none
    return WorkerSetup(parts, samples, caps, records, messages, min(host or budgets, key=lambda b: b.bytes,
                                                                      default=None), guards)


def agree_pooled_batches(s: Session, caps: np.ndarray | None) -> None:
    """Every client's batch on every rank: its profile's batch, capped by the smallest cap any worker
    found for that profile (the server passes None); that cap is the client's max batch (grow_batch)."""
    names = s.profile_names.names
    everyone = np.zeros((s.world.size, len(names)), dtype=np.int64)
    mine = np.zeros(len(names), dtype=np.int64) if caps is None else caps
    s.exchange.wait([s.world.comm.Iallgather(mine, everyone)], "allgather")
    sized = everyone[1:]
    cap = np.where((sized > 0).any(axis=0), np.where(sized > 0, sized, np.iinfo(np.int64).max).min(axis=0), 0)
    client_cap = s.profile_names.per_client(cap.astype(np.int64))
    s.batches = np.where(client_cap > 0, np.minimum(s.batches, client_cap), s.batches).astype(np.int64)
    s.max_batches = client_cap.tolist()  # 0: not sized


def run_worker(s: Session, setup: WorkerSetup) -> int:
    """This worker's rounds; 0, or why the run stopped early (mpifed.protocol's STOP_ASKED, STOP_DIVERGED)."""
    job, world, model = s.job, s.world, s.model
    _report_setup(s, setup)
    protocol = s.protocol()
    lay, k_round, steps = protocol.layout, s.placement.round_size, job.train.local_steps
    update = torch.zeros(lay.update_size, dtype=torch.float32, device=s.device)
    total = torch.zeros(lay.update_size, dtype=torch.float32, device=s.device)
    broadcast = torch.empty(model.size, dtype=torch.float32, device=s.device)
    assignment = np.zeros((4, k_round), dtype=np.int64)
    held: dict[int, np.ndarray] = {}  # error-feedback residuals of the clients this rank trained last
    clients = np.zeros((k_round, len(CLIENT_FIELDS)))
    local_opt = local_optimizer(s)
    row = np.full(len(ITER_FIELDS), np.nan)
    nbytes, nbytes_up = model.size * 4, protocol.nbytes_up
    gathered, tail_bytes = not protocol.channel.codec.summable, 4 * (lay.tail.stop - lay.tail.start)
    on_gpu = s.device.type == "cuda"

    for rnd in range(s.start_round, job.train.rounds):
        row[:] = np.nan
        clients[:] = 0.0
        start = time.perf_counter()
        protocol.share_assignment(assignment)
        protocol.move_residuals(assignment, held)
        protocol.share_batches(s.batches)
        protocol.share_model(model.flat)
        t_down = time.perf_counter() - start
        if job.debug.fail_rank == world.rank and job.debug.fail_round == rnd:
            raise InjectedFault(f"debug.fail_rank = {world.rank}: failing on purpose at debug.fail_round = {rnd} (round {rnd + 1})")

        ids, ranks, cursors = assignment[:3]
        mine = np.flatnonzero(ranks == world.rank)
        round_batch = int(s.batches[ids].sum())
        lr = learning_rate(job.optim, rnd, job.train.rounds, round_batch)
        if isinstance(setup.samples, LazySamples) and len(mine):
            setup.samples.prepare(np.concatenate([setup.parts[int(ids[slot])] for slot in mine]))
        total.zero_()
        t0, emul, link, t_compute, samples, losses, accs, payloads = time.perf_counter(), 0.0, 0.0, 0.0, 0, [], [], []
        if len(mine) > 1:
            broadcast.copy_(model.flat)
        for j, slot in enumerate(mine):
            client, batch = int(ids[slot]), int(s.batches[ids[slot]])
            profile = s.profile(client)
            if j:  # every client starts from the broadcast model, BatchNorm statistics included
                model.flat.copy_(broadcast)
            link += profiles.sleep(profiles.link_seconds(profile, nbytes), s.stop, s.exchange)  # its download, emulated
            sampler = ClientSampler(setup.parts[client], job.run.seed, client, int(cursors[slot]))
            part = setup.parts[client]

            def draw(b: int) -> torch.Tensor:
                return torch.from_numpy(part[sampler.next(b)]).to(s.device)

            guard = setup.guards.get(s.profile_names[client])
            if guard is not None:
                guard.check(batch, f"client {client} (rank {world.rank}, profile {s.profile_names[client]})")
            began = profiles.native_start()
            loss, acc = local_steps(s, local_opt, lr, draw, setup.samples, batch, rnd * steps, update, client)
            if on_gpu:
                torch.cuda.synchronize(s.device)
            slowed = job.debug.slow_rank == world.rank and rnd >= job.debug.slow_round
            pace = replace(profile, speed=profile.speed * job.debug.slow_speed) if slowed else profile
            delay = profiles.compute_delay(pace, profiles.native_seconds(began, on_gpu))
            emul += profiles.sleep(delay, s.stop, s.exchange)
            seconds = time.perf_counter() - began[0]
            model.buffers_into(update)
            hit = job.debug.corrupt_rank == world.rank and job.debug.corrupt_round == rnd and j == 0
            feedback = ErrorFeedback(model.n_params, held[client]) if client in held else None
            payload, norm = protocol.add_client(rnd, update, batch / round_batch, total, client, feedback,
                                                job.debug.corrupt if hit else "")
            if payload is not None:
                payloads.append(payload)
            link += profiles.sleep(profiles.link_seconds(profile, nbytes_up), s.stop, s.exchange)  # its upload
            t_compute += seconds
            samples += batch * steps
            losses.append(loss * batch)
            accs.append(acc * batch)
            clients[slot, WORKER_FIELDS] = loss, seconds, norm, payload.nbytes if payload is not None else 0, acc
        t_encode = time.perf_counter() - t0 - t_compute - link

        t0 = time.perf_counter()
        t_up = protocol.send_sum(rnd, total, payloads)
        t_encode += time.perf_counter() - t0 - t_up
        protocol.reduce_client_rows(clients)
        loss = sum(losses) / (samples / steps) if samples else np.nan
        acc = sum(accs) / (samples / steps) if samples else np.nan
        values = dict(t_down=t_down, t_compute=t_compute, t_encode=t_encode, t_up=t_up + link, t_emul=emul + link,
                      t_iter=time.perf_counter() - start, batch=samples, loss=loss, acc=acc, grad_norm=np.nan,
                      bytes_up=sum(p.nbytes for p in payloads) + tail_bytes if gathered else nbytes_up,
                      bytes_down=nbytes)
        for key, value in values.items():
            row[column(key)] = value
        protocol.gather_rows(row)
        stop = protocol.agree_stop(STOP_ASKED if s.stop else 0)
        if s.state_due(rnd + 1, stop):
            protocol.send_residuals(held)
        if stop:
            return stop
    return 0


def _report_setup(s: Session, setup: WorkerSetup) -> None:
    """Once, at start-up: this worker's /ranks row; rank 1 adds what the server needs of all N clients
    (their data sizes, the memory model per profile, the sizing messages)."""
    facts = dict(role=s.placement.role(s.world.rank), host=s.world.host, device=str(s.device), profile="pooled",
                 emulated=False,
                 speed=1.0, memory_budget=0.0, bandwidth=0.0, latency=0.0, data_size=len(setup.samples),
                 requested_batch=0, max_batch=int(setup.caps.max(initial=0)), batch=0, memory_model={},
                 message="; ".join(setup.messages), **budget_facts(setup.budget))
    if s.world.rank == 1:
        facts.update(data_sizes=setup.parts.sizes.tolist(), memory_models=setup.memory)
    gather_rank_facts(s, facts)
