"""A client's rounds: receive the model, train on its own batch(es), send its weighted update.

One round, in the order it runs (E = job.train.local_steps):
  1. broadcast  -> the model arrives in place (parameters are views of one flat buffer)
  2. E local steps on batches drawn from this client's partition
  3. payload = [E=1: gradient | E>1: model delta, BatchNorm statistics, per-layer |update|^2] * b_k / B
     (the squared norms let the server estimate the gradient noise with no extra communication),
     plus, for the per-coordinate teacher with a summable codec, (b_k / B) u_k^2 per coordinate
  4. the update through the codec's channel (reduce, or gather to the server), the dense tail by reduce
  5. one fixed-size row of timings and metrics -> gathered by the server for the run log
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mpifed import memory as mem
from mpifed import profiles
from mpifed.compress import make_codec
from mpifed.memory import BudgetGuard
from mpifed.updates import UpdateChannel
from mpifed.data import ClientSampler, augment, partition
from mpifed.optimizers import local_optimizer
from mpifed.runlog import ITER_FIELDS, column
from mpifed.schedule import learning_rate
from mpifed.session import Session


class InjectedFault(RuntimeError):
    """Raised on purpose by debug.fail_rank, to test that one failing rank ends the whole job."""


def update_channel(s: Session, client: int | None) -> UpdateChannel:
    layers = [(name, shape) for name, shape in s.model.layout]
    codec = make_codec(s.job.compress.codec, layers=layers, **s.job.compress.options)
    return UpdateChannel(codec, s.exchange, s.model.n_params, s.job.run.seed, client)


def payload_size(model) -> int:
    """Floats in one update: parameters, float buffers, one squared norm per parameter tensor."""
    return model.size + len(model.params)


def coordinate_route(s: Session, channel: UpdateChannel) -> str:
    """How the server gets sum_k (b_k / B) u_k^2 per coordinate for the per-coordinate teacher:
    '' not needed; 'decode' the server squares what it decodes (gather codecs, no extra bytes);
    'reduce' each client appends its n squares to the dense tail it reduces (summable codecs)."""
    if not s.job.scaling.per_coordinate:
        return ""
    return "reduce" if channel.codec.summable else "decode"


def dense_tail_size(s: Session, channel: UpdateChannel) -> int:
    """Floats each client reduces densely beside its update: BatchNorm statistics, per-layer squared
    norms, and the per-coordinate squares where clients reduce them."""
    n = s.model.n_params
    return payload_size(s.model) - n + n * (coordinate_route(s, channel) == "reduce")


def partitions(s: Session) -> list[np.ndarray]:
    weights = np.array([s.profile(k).data for k in range(s.n_clients)])
    d = s.job.data
    return partition(s.dataset.targets, weights, d.partition, s.job.run.seed, d.alpha, d.volume_sigma)


@dataclass
class ClientSetup:
    """What one client prepares before the first round."""

    part: np.ndarray
    xs: torch.Tensor
    ys: torch.Tensor
    batch: int                  # the batch it will train with (after the memory model's cap)
    max_batch: int              # 0 when sizing is off
    memory: dict                # fitted memory model (static_bytes, per_sample_bytes, ...), or {}
    message: str                # why the batch was capped, or ""
    guard: BudgetGuard | None   # binds an emulated memory budget


def prepare_client(s: Session) -> ClientSetup:
    """Partition, load this client's samples, and size the batch with the memory model."""
    job, client = s.job, s.world.rank - 1
    profile = s.profile(client)
    part = partitions(s)[client]
    xs, ys = s.dataset.tensors(part)
    xs, ys = xs.to(s.device), ys.to(s.device)
    requested = int(s.batches[client])
    if not job.memory.size_clients:
        return ClientSetup(part, xs, ys, requested, 0, {}, "", None)
    name = f"client {client} (rank {s.world.rank}, profile {s.profile_names[client]})"
    step = mem.StepSpec(optimizer="none" if job.train.local_steps == 1 else "sgd", momentum=0.0,
                        weight_decay=job.optim.weight_decay, keep_grads=True)
    budget = profile.memory or mem.device_budget(s.device) // (1 if s.device.type == "cuda" else s.world.local_size)
    # held outside the step: this client's samples, the update buffer, the E>1 start copy
    # (and, for the per-coordinate teacher, up to n squares)
    held = (xs.nbytes + ys.nbytes + 4 * payload_size(s.model)
            + 4 * s.model.n_params * ((job.train.local_steps > 1) + job.scaling.per_coordinate))
    sizing = mem.size_client(s.model.module, tuple(xs.shape[1:]), s.dataset.num_classes, step, s.device,
                             int(budget), requested, name, strict=job.memory.strict, margin=job.memory.margin,
                             multiple_of=job.memory.multiple_of, extra_static_bytes=int(held))
    guard = None
    if profile.memory and job.memory.enforce:
        guard = mem.enforce_budget(s.device, int(profile.memory), sizing.model, name)
    batch, largest, record, message = sizing.batch, sizing.max_batch, sizing.model.as_record(), sizing.message
    if s.device.type == "cuda" and job.memory.verify:
        def real_step(b: int) -> int:
            return mem.measured_peak(s.model.module, tuple(xs.shape[1:]), s.dataset.num_classes, step, s.device,
                                     b, seed=job.run.seed).total

        verified = mem.verify_batch(real_step, batch, name, int(budget), sizing.model)
        # the step alone on both sides: the measurement counts from what was allocated before it
        record.update(verified_batch=verified.batch, verified_peak=verified.peak,
                      predicted_peak=sizing.model.peak(verified.batch) - held)
        if verified.failed:
            batch = largest = verified.batch
            message = (f"{name}: a real step at batch {verified.failed[0]} ran out of device memory although the "
                       f"memory model predicted it fits; training with batch {batch}, which ran "
                       f"(peak {mem.format_bytes(verified.peak)})")
    return ClientSetup(part, xs, ys, batch, largest, record, message, guard)


def run_client(s: Session, setup: ClientSetup) -> bool:
    """This client's rounds; True when a signal stopped the run early."""
    job, world, model = s.job, s.world, s.model
    client = world.rank - 1
    profile = s.profile(client)
    slowed = replace(profile, speed=profile.speed * job.debug.slow_speed)  # debug.slow_rank's drift
    xs, ys, part = setup.xs, setup.ys, setup.part
    sampler = ClientSampler(part, job.run.seed, client)
    batch, weight = int(s.batches[client]), s.weight(client)
    _report_setup(s, setup)

    on_gpu = s.device.type == "cuda"
    host = np.empty(model.size, np.float32) if on_gpu else model.flat.numpy()
    channel = update_channel(s, client)
    squares_reduced = coordinate_route(s, channel) == "reduce"
    update = torch.zeros(model.n_params + dense_tail_size(s, channel), dtype=torch.float32, device=s.device)
    update_host = np.empty(update.numel(), np.float32) if on_gpu else update.numpy()
    local_opt = local_optimizer(s)
    row = np.full(len(ITER_FIELDS), np.nan)
    n = model.n_params
    layer_sizes = [p.numel() for p in model.params]
    # BatchNorm statistics, per-layer squared norms and any per-coordinate squares, reduced densely
    tail = update_host[n:]
    layer_sq_at = slice(model.size - n, payload_size(model) - n)
    nbytes, nbytes_up = model.size * 4, channel.nbytes + tail.nbytes

    def draw(b: int) -> torch.Tensor:
        return torch.from_numpy(sampler.next(b)).to(s.device)

    if s.start_round:
        _restore_state(s, sampler, channel)
    for rnd in range(s.start_round, job.train.rounds):
        row[:] = np.nan
        emul = 0.0
        start = time.perf_counter()
        if s.batches_may_change:  # the server may have grown (noise scale) or re-split (re-plan) them
            s.exchange.broadcast(s.batches)
            batch, weight = int(s.batches[client]), s.weight(client)
        s.exchange.broadcast(host)
        if on_gpu:
            model.flat.copy_(torch.from_numpy(host), non_blocking=False)
        emul += profiles.sleep(profiles.link_seconds(profile, nbytes))
        t_down = time.perf_counter() - start

        if job.debug.fail_rank == world.rank and job.debug.fail_round == rnd:
            raise InjectedFault(f"debug.fail_rank = {world.rank}: failing on purpose in round {rnd}")

        t0 = time.perf_counter()
        if setup.guard is not None:
            setup.guard.check(batch)
        lr = learning_rate(job.optim, rnd, job.train.rounds, s.global_batch)
        loss = local_steps(s, local_opt, lr, draw, xs, ys, batch, rnd * job.train.local_steps, update)
        if on_gpu:
            torch.cuda.synchronize(s.device)
        measured = time.perf_counter() - t0
        pace = slowed if job.debug.slow_rank == world.rank and rnd >= job.debug.slow_round else profile
        emul += profiles.sleep(profiles.compute_delay(pace, measured))
        t_compute = time.perf_counter() - t0

        t0 = time.perf_counter()
        model.buffers_into(update)
        update.mul_(weight)
        if on_gpu:
            torch.from_numpy(update_host).copy_(update)  # into the staging buffer: no new host tensor
        link_up = profiles.sleep(profiles.link_seconds(profile, nbytes_up))  # the emulated link
        emul += link_up
        hit = job.debug.corrupt_rank == world.rank and job.debug.corrupt_round == rnd
        sent = channel.send(update_host[:n], rnd, job.debug.corrupt if hit else "")
        # per-layer |u_k|^2 of what the server decodes, weighted like the update: the reduction
        # then hands the server sum_k b_k |u_k|^2 / B for the noise-scale estimate. A lossless
        # codec sends the update itself, whose norms the device computes fastest. (foreach norms:
        # 10x faster than squaring into a float64 temporary; relative difference ~1e-4.)
        layers = model.param_view(update) if channel.lossless else torch.from_numpy(sent).split(layer_sizes)
        layer_sq = torch.stack(torch._foreach_norm(layers)).double().square().cpu().numpy()
        if squares_reduced:  # in place in the tail: no n-sized temporary per round
            coordinate_sq = np.square(sent, out=tail[layer_sq_at.stop:])
            coordinate_sq /= np.float32(weight)
        tail[layer_sq_at] = layer_sq / weight
        grad_norm = float(np.sqrt(layer_sq.sum())) / weight
        t1 = time.perf_counter()
        s.exchange.reduce_sum(tail)
        t_up = link_up + channel.comm_seconds + time.perf_counter() - t1
        t_encode = time.perf_counter() - t0 - t_up

        values = dict(t_down=t_down, t_compute=t_compute, t_encode=t_encode, t_up=t_up, t_emul=emul,
                      t_iter=time.perf_counter() - start, batch=batch * job.train.local_steps,
                      bytes_up=nbytes_up, bytes_down=nbytes, loss=loss, grad_norm=grad_norm)
        for key, value in values.items():
            row[column(key)] = value
        s.exchange.gather_rows(row, None)
        stop = s.exchange.any(bool(s.stop))
        if stop or s.checkpoint_due(rnd + 1):
            _send_state(s, sampler, channel)
        if stop:
            return True
    return False


def _send_state(s: Session, sampler: ClientSampler, channel: UpdateChannel) -> None:
    """This client's part of a checkpoint: its sampler cursor and its error-feedback residual."""
    s.exchange.gather_rows(np.array([sampler.cursor], dtype=np.int64), None)
    if channel.feedback is not None:
        s.exchange.gather_rows(channel.feedback.residual, None)


def _restore_state(s: Session, sampler: ClientSampler, channel: UpdateChannel) -> None:
    """Resuming: receive the cursor and residual the checkpoint holds for this client."""
    cursor = np.zeros(1, dtype=np.int64)
    s.exchange.scatter_rows(None, cursor)
    sampler.cursor = int(cursor[0])
    if channel.feedback is not None:
        s.exchange.scatter_rows(None, channel.feedback.residual)


def local_steps(s: Session, local_opt, lr: float, draw: Callable[[int], torch.Tensor], xs, ys, batch: int,
                key: int, update: torch.Tensor) -> float:
    """E=1: the gradient of one batch into `update`. E>1: E SGD steps, the model delta into `update`.

    `draw(b)` gives the positions in xs/ys of b samples, and local step e augments with key + e.
    Training draws from the client's sampler; the start-up probes (mpifed.probes) run this same
    function with draws of their own, so what they time is the step that training runs.
    Returns the mean loss over the local steps."""
    job, model = s.job, s.model
    steps = job.train.local_steps
    module = model.module
    module.train()
    if steps > 1:  # the starting point, kept in `update` itself: the delta is taken in place
        update[: model.n_params].copy_(model.flat[: model.n_params])
    for group in local_opt.param_groups:
        group["lr"] = lr
    losses = []
    for step in range(steps):
        pos = draw(batch)
        x, y = xs[pos], ys[pos]
        if job.data.augment:
            x = augment(x, job.run.seed, s.world.rank - 1, key + step)
        module.zero_grad(set_to_none=False)
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        losses.append(loss.detach())
        if steps > 1:
            local_opt.step()
    if steps == 1:
        # after the first round the gradients are views into `update`: backward accumulates into it, and
        # grads_into copies nothing (torch skips a copy onto the same memory), no n-sized copy a round
        model.grads_into(update)
        model.attach_grads(update)
    else:
        update[: model.n_params].sub_(model.flat[: model.n_params])
    return float(torch.stack(losses).mean())


def _report_setup(s: Session, setup: ClientSetup) -> None:
    """Once, at start-up: this rank's static facts for the run log's /ranks table."""
    client = s.world.rank - 1
    p = s.profile(client)
    s.exchange.arrive()
    s.world.comm.gather(dict(
        role=s.world.role, host=s.world.host, device=str(s.device), profile=s.profile_names[client],
        emulated=p.emulated, speed=p.speed, memory_budget=p.memory, bandwidth=p.bandwidth, latency=p.latency,
        data_size=len(setup.part), requested_batch=p.batch or s.job.train.batch, max_batch=setup.max_batch,
        batch=int(s.batches[client]), memory_model=setup.memory, message=setup.message), root=0)
