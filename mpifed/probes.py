"""What the start-up performance model times: the real code paths of one round, not stand-ins.

  client_step   one client's local training at batch b (E steps of forward/backward on its own
                samples, on its own device), *plus* the sleep that emulates its profile's speed:
                the emulation is part of that client's real step time.
  server_step   the server's work between the update arriving and the next round (scaling policy
                and optimizer step), on scratch tensors so the model and its momentum stay untouched.
  round_comm    the broadcast of the model and the whole update path (the codec's encode, its
                collectives through mpifed.exchange with the job's waiting mode, the server's
                decode, the dense tail), at the round's real sizes.

Why the real update path rather than bare MPI calls (mpifed.perf.measure_collectives): rounds wait
politely on an oversubscribed node, fp16/bf16 sums run a Python reduction operator, and gathered
codecs validate and decode on the server; none of that is in a bare Reduce, and all of it is in the
round time the model has to predict.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpifed import profiles
from mpifed.client import ClientSetup, payload_size, update_channel
from mpifed.data import augment
from mpifed.scaling import ClientRound, ServerScalingPolicy
from mpifed.seeding import Purpose, rng, torch_generator
from mpifed.session import Session

PROBE_KEY = 0x9E0BE
"""Extra seed key that keeps the probes' random streams apart from training's (same Purpose)."""


def client_step(s: Session, setup: ClientSetup) -> Callable[[int], None]:
    """step(b): this client's E local steps at batch b, emulated slow-down included; blocks until done.

    Samples are drawn from the client's own data with a private generator, so the training sampler
    is not advanced. The model's parameters may change (E > 1 runs SGD with lr 0, which leaves them
    as they are but costs the same); round 0's broadcast overwrites them anyway."""
    job, client, module = s.job, s.world.rank - 1, s.model.module
    profile = s.profile(client)
    steps = job.train.local_steps
    xs, ys = setup.xs, setup.ys
    gen = torch_generator(job.run.seed, Purpose.SAMPLE, PROBE_KEY, client)
    local_opt = torch.optim.SGD(s.model.params, lr=0.0, weight_decay=job.optim.weight_decay)
    on_gpu = s.device.type == "cuda"

    def step(batch: int) -> None:
        start = time.perf_counter()
        module.train()
        for e in range(steps):
            pos = torch.randint(len(ys), (batch,), generator=gen).to(s.device)
            x, y = xs[pos], ys[pos]
            if job.data.augment:
                x = augment(x, job.run.seed, client, e)
            module.zero_grad(set_to_none=False)
            F.cross_entropy(module(x), y).backward()
            if steps > 1:
                local_opt.step()
        if on_gpu:
            torch.cuda.synchronize(s.device)
        profiles.sleep(profiles.compute_delay(profile, time.perf_counter() - start))

    return step


def server_step(s: Session) -> Callable[[], None]:
    """step(): the server's scaling policy and optimizer step on a scratch copy of the parameters."""
    job, model = s.job, s.model
    n = model.n_params
    scratch = torch.zeros(n, dtype=torch.float32, device=s.device, requires_grad=True)
    scratch.grad = torch.randn(n, generator=torch_generator(job.run.seed, Purpose.SAMPLE, PROBE_KEY, 0),
                               dtype=torch.float32).to(s.device) * 1e-3
    o = job.optim
    if job.train.local_steps == 1:
        opt = torch.optim.SGD([scratch], lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay)
    else:
        opt = torch.optim.SGD([scratch], lr=o.server_lr, momentum=o.server_momentum)
    sizes = [p.numel() for p in model.params]
    policy = ServerScalingPolicy(job.scaling, sizes, job.run.seed)
    layer_sq = torch.ones(len(sizes), dtype=torch.float32, device=s.device)
    batches = s.batches.tolist()
    done = [0]

    def step() -> None:
        grad = scratch.grad
        scaled, _ = policy.apply(done[0], grad, ClientRound(batches, weighted_sq=layer_sq))
        if scaled is not grad:
            grad.copy_(scaled)
        opt.step()
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        done[0] += 1

    return step


def update_bytes(s: Session) -> int:
    """Bytes one client uploads per round: the codec's payload plus the dense float32 tail."""
    channel = update_channel(s, None)
    return channel.nbytes + 4 * (payload_size(s.model) - s.model.n_params)


def round_comm(s: Session, repeats: int) -> tuple[float, float]:
    """(broadcast seconds, update-path seconds): each the median over `repeats` (after one untimed
    try) of the slowest rank's time, every try starting together after a barrier. Collective:
    every rank calls it; the numbers are the same on every rank."""
    model, comm, ex = s.model, s.world.comm, s.exchange
    client = None if s.world.is_server else s.world.rank - 1
    channel = update_channel(s, client)   # a throwaway channel: its error feedback is discarded
    n = model.n_params
    buf = np.zeros(model.size, np.float32)  # scratch: never the model's own buffer
    tail = np.zeros(payload_size(model) - n, np.float32)
    update = (1e-3 * rng(s.job.run.seed, Purpose.SAMPLE, PROBE_KEY, s.world.rank).standard_normal(n)
              ).astype(np.float32)
    out = np.zeros(n, np.float32)
    weights = s.batches / s.batches.sum()
    times = np.zeros((repeats + 1, 2))
    for i in range(repeats + 1):
        ex.wait([comm.Ibarrier()])
        start = time.perf_counter()
        ex.broadcast(buf)
        times[i, 0] = time.perf_counter() - start
        ex.wait([comm.Ibarrier()])
        start = time.perf_counter()
        if client is None:
            channel.receive(0, out, weights)
        else:
            channel.send(update, 0)
        ex.reduce_sum(tail)
        times[i, 1] = time.perf_counter() - start
    slowest = np.empty_like(times)
    ex.wait([comm.Iallreduce(times, slowest, op=MPI.MAX)])
    bcast, up = np.median(slowest[1:], axis=0)
    return float(bcast), float(up)
