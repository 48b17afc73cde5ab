"""A client's rounds: receive the model, train on its own batch(es), send its weighted update.

One round, in the order it runs (E = job.train.local_steps; the collectives are mpifed.protocol's):
  1. batches, 2. model: the server's broadcasts; the model arrives in place (its parameters are
     views of one flat buffer)
  -  E local steps on batches drawn from this client's partition (this module's own work)
  3. update: [E=1: gradient | E>1: model delta, BatchNorm statistics] through the protocol, which
     weights it by b_k / B and adds the squared norms the server's noise estimate needs
  4. rows: one fixed-size row of timings and metrics for the run log; 5. stop; 6. state when due
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from mpifed import memory as mem
from mpifed import profiles
from mpifed.memory import BudgetGuard
from mpifed.data import ClientSampler, augment
from mpifed.learn.partition import Partition, split_clients
from mpifed.learn.samples import DeviceSamples
from mpifed.optimizers import local_optimizer
from mpifed.protocol import STOP_ASKED, payload_size
from mpifed.runlog import ITER_FIELDS, column
from mpifed.schedule import learning_rate
from mpifed.session import Session, gather_rank_facts


class InjectedFault(RuntimeError):
    """Raised on purpose by debug.fail_rank, to test that one failing rank ends the whole job."""


def partitions(s: Session) -> Partition:
    """Every client's sample indices into the train split: the node's shared copy when the session has
    one, else split here (mpifed.learn.partition)."""
    return s.parts if s.parts is not None else split_clients(s.job, s.dataset, s.profile_names)


@dataclass
class ClientSetup:
    """What one client prepares before the first round."""

    part: np.ndarray
    samples: DeviceSamples      # this client's samples, converted once onto its device
    batch: int                  # the batch it will train with (after the memory model's cap)
    max_batch: int              # 0 when sizing is off
    memory: dict                # fitted memory model (static_bytes, per_sample_bytes, ...), or {}
    message: str                # why the batch was capped, or ""
    guard: BudgetGuard | None   # binds an emulated memory budget
    budget: mem.Budget | None = None  # what it was sized against, and what bound that (None: not sized)


def prepare_client(s: Session) -> ClientSetup:
    """Partition, load this client's samples, and size the batch with the memory model."""
    job, client = s.job, s.client
    profile = s.profile(client)
    part = partitions(s)[client]
    samples = DeviceSamples(s.dataset, part, s.device)
    requested = int(s.batches[client])
    if not job.memory.size_clients:
        return ClientSetup(part, samples, requested, 0, {}, "", None)
    name = f"client {client} (rank {s.world.rank}, profile {s.profile_names[client]})"
    step = mem.StepSpec(optimizer="none" if job.train.local_steps == 1 else "sgd", momentum=0.0,
                        weight_decay=job.optim.weight_decay, keep_grads=True)
    sized_against = mem.client_budget(s.device, profile.memory, s.world.local_size)
    budget = sized_against.bytes
    # held outside the step: this client's samples, the update buffer, the E>1 start copy
    # (and, for the per-coordinate teacher, up to n squares)
    held = (samples.nbytes + 4 * payload_size(s.model)
            + 4 * s.model.n_params * ((job.train.local_steps > 1) + job.scaling.per_coordinate))
    sizing = mem.size_client(s.model.module, s.task.input_shape, s.task.classes, step, s.device,
                             int(budget), requested, name, strict=job.memory.strict, margin=job.memory.margin,
                             multiple_of=job.memory.multiple_of, extra_static_bytes=int(held), task=s.task)
    guard = None
    if profile.memory and job.memory.enforce:
        guard = mem.enforce_budget(s.device, int(profile.memory), sizing.model, name)
    batch, largest, record, message = sizing.batch, sizing.max_batch, sizing.model.as_record(), sizing.message
    if s.device.type == "cuda" and job.memory.verify:
        def real_step(b: int) -> int:
            return mem.measured_peak(s.model.module, s.task.input_shape, s.task.classes, step, s.device,
                                     b, seed=job.run.seed, task=s.task).total

        verified = mem.verify_batch(real_step, batch, name, int(budget), sizing.model)
        # the step alone on both sides: the measurement counts from what was allocated before it
        record.update(verified_batch=verified.batch, verified_peak=verified.peak,
                      predicted_peak=sizing.model.peak(verified.batch) - held)
        if verified.failed:
            batch = largest = verified.batch
            message = (f"{name}: a real step at batch {verified.failed[0]} ran out of device memory although the "
                       f"memory model predicted it fits; training with batch {batch}, which ran "
                       f"(peak {mem.format_bytes(verified.peak)})")
    return ClientSetup(part, samples, batch, largest, record, message, guard, sized_against)


def run_client(s: Session, setup: ClientSetup) -> int:
    """This client's rounds; 0, or why the run stopped early (mpifed.protocol's STOP_ASKED, STOP_DIVERGED)."""
    job, world, model = s.job, s.world, s.model
    client = s.client
    profile = s.profile(client)
    slowed = replace(profile, speed=profile.speed * job.debug.slow_speed)  # debug.slow_rank's drift
    part = setup.part
    sampler = ClientSampler(part, job.run.seed, client)
    batch, weight = int(s.batches[client]), s.weight(client)
    _report_setup(s, setup)

    protocol = s.protocol()
    update = torch.zeros(protocol.layout.update_size, dtype=torch.float32, device=s.device)
    local_opt = local_optimizer(s)
    row = np.full(len(ITER_FIELDS), np.nan)
    nbytes, nbytes_up = model.size * 4, protocol.nbytes_up

    def draw(b: int) -> torch.Tensor:
        return torch.from_numpy(sampler.next(b)).to(s.device)

    if s.start_round:
        sampler.cursor = protocol.receive_state()
    for rnd in range(s.start_round, job.train.rounds):
        row[:] = np.nan
        emul = 0.0
        start = time.perf_counter()
        protocol.share_batches(s.batches)  # the server may have grown (noise scale) or re-split (re-plan) them
        batch, weight = int(s.batches[client]), s.weight(client)
        protocol.share_model(model.flat)
        emul += profiles.sleep(profiles.link_seconds(profile, nbytes), s.stop, s.exchange)
        t_down = time.perf_counter() - start

        if job.debug.fail_rank == world.rank and job.debug.fail_round == rnd:
            raise InjectedFault(f"debug.fail_rank = {world.rank}: failing on purpose at debug.fail_round = {rnd} (round {rnd + 1})")

        t0 = time.perf_counter()
        if setup.guard is not None:
            setup.guard.check(batch)
        lr = learning_rate(job.optim, rnd, job.train.rounds, s.global_batch)
        native = profiles.native_start()
        loss, acc = local_steps(s, local_opt, lr, draw, setup.samples, batch, rnd * job.train.local_steps, update)
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        measured = profiles.native_seconds(native, s.device.type == "cuda")
        pace = slowed if job.debug.slow_rank == world.rank and rnd >= job.debug.slow_round else profile
        emul += profiles.sleep(profiles.compute_delay(pace, measured), s.stop, s.exchange)
        t_compute = time.perf_counter() - t0

        t0 = time.perf_counter()
        model.buffers_into(update)
        link_up = profiles.sleep(profiles.link_seconds(profile, nbytes_up), s.stop, s.exchange)  # the emulated link
        emul += link_up
        hit = job.debug.corrupt_rank == world.rank and job.debug.corrupt_round == rnd
        sent = protocol.send_update(rnd, update, weight, job.debug.corrupt if hit else "")
        t_up = link_up + sent.comm_seconds
        t_encode = time.perf_counter() - t0 - t_up

        values = dict(t_down=t_down, t_compute=t_compute, t_encode=t_encode, t_up=t_up, t_emul=emul,
                      t_iter=time.perf_counter() - start, batch=batch * job.train.local_steps,
                      bytes_up=nbytes_up, bytes_down=nbytes, loss=loss, grad_norm=sent.grad_norm, acc=acc)
        for key, value in values.items():
            row[column(key)] = value
        protocol.gather_rows(row)
        stop = protocol.agree_stop(STOP_ASKED if s.stop else 0)
        if s.state_due(rnd + 1, stop):
            protocol.send_state(sampler.cursor)
        if stop:
            return stop
    return 0


def local_steps(s: Session, local_opt, lr: float, draw: Callable[[int], torch.Tensor], samples, batch: int,
                key: int, update: torch.Tensor, client: int | None = None) -> tuple[float, float]:
    """E=1: the gradient of one batch into `update`. E>1: E SGD steps, the model delta into `update`.

    `draw(b)` gives the positions in `samples` (mpifed.learn.samples) of b samples, and local step e
    augments with key + e. The loss is the task's (cross-entropy unless the data brings its own).
    Training draws from the client's sampler; the start-up probes (mpifed.probes) run this same
    function with draws of their own, so what they time is the step that training runs.
    `client` (default: this rank's own) keys the augmentation; a pooled worker passes each client it trains.
    Returns the mean loss over the local steps and the task's metric on their batches (accuracy: correct
    over counted), scored on the same forward output outside autograd, so training is what it was."""
    job, model = s.job, s.model
    client = s.client if client is None else client
    steps = job.train.local_steps
    module = model.module
    module.train()
    if steps > 1:  # the starting point, kept in `update` itself: the delta is taken in place
        update[: model.n_params].copy_(model.flat[: model.n_params])
    for group in local_opt.param_groups:
        group["lr"] = lr
    losses, correct, counted = [], 0, 0
    for step in range(steps):
        x, y = samples.batch(draw(batch))
        if job.data.augment:
            x = augment(x, job.run.seed, client, key + step)
        module.zero_grad(set_to_none=False)
        output = module(x)
        loss = s.task.loss(output, y)
        with torch.no_grad():  # scored outside autograd: the gradient is the same as without it
            hits, n = s.task.metric(output, y)
        del output  # gone before backward, as it was: a next-token output is batch x positions x vocabulary
        correct, counted = correct + hits, counted + n
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
    return float(torch.stack(losses).mean()), float(correct) / counted if counted else float("nan")


def _report_setup(s: Session, setup: ClientSetup) -> None:
    """Once, at start-up: this rank's static facts for the run log's /ranks table."""
    client = s.client
    p = s.profile(client)
    gather_rank_facts(s, dict(
        role=s.world.role, host=s.world.host, device=str(s.device), profile=s.profile_names[client],
        emulated=p.emulated, speed=p.speed, memory_budget=p.memory, bandwidth=p.bandwidth, latency=p.latency,
        data_size=len(setup.part), requested_batch=p.batch or s.job.train.batch, max_batch=setup.max_batch,
        batch=int(s.batches[client]), memory_model=setup.memory, message=setup.message, **budget_facts(setup.budget)))


def budget_facts(budget: mem.Budget | None) -> dict:
    """A rank's /ranks columns for the budget it was sized against, and what bound it (the start-up
    report groups the ranks by `budget_source`)."""
    if budget is None:
        return dict(sized_budget=0, budget_bound="", budget_source="")
    return dict(sized_budget=budget.bytes, budget_bound=budget.bound, budget_source=budget.source)
