"""What the start-up performance model times: the real code paths of one round, not stand-ins.

  client_step   one client's local training at batch b (E steps of forward/backward on its own
                samples, on its own device), *plus* the sleep that emulates its profile's speed:
                the emulation is part of that client's real step time.
  server_step   the server's work between the update arriving and the next round (scaling policy
                and optimizer step), on scratch tensors so the model and its momentum stay untouched.
  probe_rounds  whole rounds at start-up built from the two: the model's broadcast, every client's
                step at once, the whole update path (the codec's encode, its collectives through
                mpifed.exchange with the job's waiting mode, the server's decode, the dense tail)
                and the server step, at the round's real sizes.

Why whole rounds rather than bare MPI calls (mpifed.perf.measure_collectives) and a client timed
alone: rounds wait politely on an oversubscribed node, fp16/bf16 sums run a Python reduction
operator, gathered codecs validate and decode on the server, and K clients share the cores while
they step; none of that is in a bare Reduce or a lone step, and all of it is in the round time the
model has to predict.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from mpifed import profiles
from mpifed.client import ClientSetup, local_steps
from mpifed.config import DeviceProfile
from mpifed.learn.samples import LazySamples
from mpifed.optimizers import local_optimizer, server_optimizer
from mpifed.scaling import ClientRound, ServerScalingPolicy
from mpifed.seeding import Purpose, rng, torch_generator
from mpifed.session import Session, stop_if_asked

PROBE_SAMPLES, PROBE_SERVER_GRADIENT, PROBE_UPDATE = 1, 2, 3
PROBE_POOL = 1024  # samples a pooled worker's timed steps draw from: made once, not inside the timings
"""The first key of each probe stream (Purpose.PROBE, apart from training's): which draw it feeds."""


def client_step(s: Session, setup: ClientSetup) -> Callable[[int], None]:
    """step(b): this client's E local steps at batch b (training's own mpifed.client.local_steps),
    emulated slow-down included; blocks until done (profile_step with the client's own data)."""
    return profile_step(s, s.profile(s.client), setup.samples, s.client)


def profile_step(s: Session, profile: DeviceProfile, samples, key: int) -> Callable[[int], None]:
    """step(b): E local steps at batch b on `samples` (mpifed.learn.samples), slowed down to `profile`'s speed.

    Samples are drawn with a private generator (keyed by `key`), so no training sampler is advanced,
    into a scratch update. The model's parameters may change (E > 1 runs SGD with lr 0, which leaves
    them as they are but costs the same); round 0's broadcast overwrites them anyway."""
    job = s.job
    gen = torch_generator(job.run.seed, Purpose.PROBE, PROBE_SAMPLES, key)
    local_opt = local_optimizer(s)
    update = torch.zeros(s.model.n_params, dtype=torch.float32, device=s.device)
    on_gpu = s.device.type == "cuda"

    pool = len(samples)
    if isinstance(samples, LazySamples):  # timed steps read samples already made (the node's are made on demand)
        pool = min(pool, PROBE_POOL)
        samples.prepare(np.arange(pool))

    def draw(b: int) -> torch.Tensor:
        return torch.randint(pool, (b,), generator=gen).to(s.device)

    def step(batch: int) -> None:
        start = profiles.native_start()
        local_steps(s, local_opt, 0.0, draw, samples, batch, 0, update, key)
        if on_gpu:
            torch.cuda.synchronize(s.device)
        profiles.sleep(profiles.compute_delay(profile, profiles.native_seconds(start, on_gpu)), s.stop, s.exchange)

    return step


def server_step(s: Session) -> Callable[[], None]:
    """step(): the server's scaling policy and optimizer step on a scratch copy of the parameters."""
    job, model = s.job, s.model
    n = model.n_params
    scratch = torch.zeros(n, dtype=torch.float32, device=s.device, requires_grad=True)
    scratch.grad = torch.randn(n, generator=torch_generator(job.run.seed, Purpose.PROBE, PROBE_SERVER_GRADIENT),
                               dtype=torch.float32).to(s.device) * 1e-3
    opt = server_optimizer(s, [scratch])
    sizes = [p.numel() for p in model.params]
    policy = ServerScalingPolicy(job.scaling, sizes, job.run.seed)
    layer_sq = torch.ones(len(sizes), dtype=torch.float32, device=s.device)
    # the per-coordinate teacher's statistic, where the job uses it (any values above g^2 time the same)
    coordinate_sq = 2 * scratch.grad.square() if job.scaling.per_coordinate else None
    batches = s.batches.tolist()
    done = [0]

    def step() -> None:
        grad = scratch.grad
        scaled, _ = policy.apply(done[0], grad, ClientRound(batches, weighted_sq=layer_sq, coordinate_sq=coordinate_sq))
        if scaled is not grad:
            grad.copy_(scaled)
        opt.step()
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        done[0] += 1

    return step


def update_bytes(s: Session) -> int:
    """Bytes one client uploads per round: the codec's payload plus the dense float32 tail."""
    return s.protocol().nbytes_up


def update_collective(s: Session) -> str:
    """The collective that carries the update: "reduce" for summable codecs, "gatherv" for the others."""
    return s.protocol().up_collective


PROBE_COLUMNS = ("batch", "t_compute", "t_down", "t_up", "t_decode")
"""What probe_rounds records per timed round, named (and measured) like the run log's /iter columns:
clients fill batch and t_compute, the server t_down, t_up and t_decode; the rest is NaN."""


def probe_rounds(s: Session, setup: ClientSetup | None, grid: Sequence[int], repeats: int,
                 warmup: int = 1) -> np.ndarray:
    """Rounds of the real path at start-up, through training's own protocol (mpifed.protocol): the
    server broadcasts, every client steps at its batch grid[i] (client_step) and sends its update
    (send_update: the codec, the norms, the dense tail), the server receives and decodes it
    (receive_update) and runs its step (server_step). Each grid size is run `warmup` times untimed and then
    `repeats` times in a row, as training repeats one size: cycling through the sizes instead made
    a step ~16% slower (the CPU's kernel and allocator caches are rebuilt for each new shape).
    Returns this rank's (repeats * len(grid), len(PROBE_COLUMNS)) table.

    Why rounds rather than each part alone: on shared cores a client's step is as slow as the other
    ranks make it (K clients stepping at once, the server waking to poll, a slow client's emulation
    sleeping), and the broadcast and update overlap the clients' compute; only a round has all of
    that. Collective: every rank calls it with grids of the same length (the server's is ignored)."""
    model, client = s.model, s.client
    protocol = s.protocol()  # a throwaway channel: its error feedback is discarded
    scratch = torch.zeros(model.size, dtype=torch.float32, device=s.device)  # never the model's own buffer
    update = torch.zeros(protocol.layout.update_size, dtype=torch.float32, device=s.device)
    update[: model.n_params] = torch.from_numpy(
        (1e-3 * rng(s.job.run.seed, Purpose.PROBE, PROBE_UPDATE, s.world.rank).standard_normal(model.n_params)
         ).astype(np.float32))
    aggregate = torch.zeros(protocol.layout.aggregate_size, dtype=torch.float32, device=s.device)
    weights = s.batches / s.batches.sum()
    step = server_step(s) if client is None else client_step(s, setup)
    order = [i for i in range(len(grid)) for _ in range(warmup + repeats)]
    timed = np.array([j % (warmup + repeats) >= warmup for j in range(len(order))])
    table = np.full((len(order), len(PROBE_COLUMNS)), np.nan)
    for j, i in enumerate(order):
        stop_if_asked(s)  # outside the timing: a slow client's round at a large probe size takes long
        row = table[j]
        start = time.perf_counter()
        protocol.share_model(scratch)
        t0 = time.perf_counter()
        if client is not None:
            step(int(grid[i]))
            row[:2] = grid[i], time.perf_counter() - t0
            protocol.send_update(0, update, 1.0)  # weight 1: the same work, and the update stays as it is
            continue
        row[2] = t0 - start
        _, row[3] = protocol.receive_update(0, aggregate, weights)
        step()
        row[4] = time.perf_counter() - t0 - row[3]
    return table[timed]
