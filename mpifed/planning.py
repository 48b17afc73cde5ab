"""Start-up performance model and batch plan (job table [plan]): one collective step, run by every
rank after the clients have prepared (data loaded, memory caps known) and before the batches are
agreed. With plan.mode = "off" it does nothing and sends nothing.

  1. all ranks run probe rounds (mpifed.probes.probe_rounds): the real broadcast, every client's
     real step (its model, data, device and emulated speed) at once, the real update path and the
     server's step, with each client at plan.points + 1 batch sizes (probe_grid: up to its profile
     cap, and its own batch), plan.repeats times each;
  2. rank 0 gathers the tables (pickled: set-up only); per client it fits t_k(b) = max(t_floor,
     a + c b) to the median step per size and measures the spread s_k of the repeats (fit_client);
     from the server's times it takes t_bcast, t_up and t_server (probe_terms);
  3. rank 0 builds a perf Profile, picks the batches by mode, predicts the round
     (mpifed.perf.predict_round) and sends each client its batch.

The prediction the server logs every round as t_iter_pred (on every rank's row: a client's round
spans the same broadcast-to-update interval, so its t_iter is the round time too) is

    t_round = t_bcast + M + t_up + t_server,   M = median of max_k [t_k(b_k) + link_k] exp(s_k Z_k)

M is the slowest of K jittering clients (mpifed.perf.straggler), link_k the emulated link delays of
client k's profile (latency + bytes / bandwidth, down and up). Rounds 0 and 1 are predicted by the
start-up fit alone; from then on each term carries a factor that follows what the rounds before measured
(mpifed.perf.online), and /models keeps the start-up prediction (perf.round.t_round) for comparison.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mpifed import probes, profiles
from mpifed.client import ClientSetup
from mpifed.config import PLAN_MODES, JobError
from mpifed.perf import (ClientProfile, CollectiveSample, ComputeCurve, OnlineModel, Profile, Replanner,
                         RoundPrediction, fit_collective, plan_batches, plan_throughput, save_profile)
from mpifed.perf.straggler import spreads
from mpifed.perf.report import predict_for
from mpifed.placement import SERVER
from mpifed.session import Session, all_batches

WARMUP_STEPS = 1
"""Untimed probe rounds per batch size before the timed ones (first-touch allocation, lazy init)."""
MIN_SECONDS = 1e-6
"""Floor of a predicted term: alpha-beta fits need a positive time (a term the overlap hid)."""


@dataclass(frozen=True)
class StartupPlan:
    """What rank 0 knows after the start-up step: the fitted profile, the batches and the prediction."""

    mode: str
    profile: Profile
    memory_caps: list[int]      # per client, from the memory model (0 = not sized)
    requested: list[int]        # per client, what the job asked for after the memory caps
    batches: list[int]          # per client, what it trains with
    prediction: RoundPrediction
    seconds: float              # wall time of the start-up step
    links: tuple[float, ...] = ()  # per client, the emulated link seconds its curve includes

    def replanner(self, batches: Sequence[int], dead_band: float) -> Replanner:
        """Training's re-planner (plan.replan): this plan's caps, the batches in force (the plan's, or a
        resumed run's)."""
        return Replanner([c.max_batch for c in self.profile.clients], [int(b) for b in batches],
                         dead_band=dead_band)

    def online_model(self) -> OnlineModel:
        """Training's model of the round, calibrated by every round it predicts (mpifed.perf.online)."""
        return OnlineModel(self.profile, self.links)

    def model_attrs(self) -> dict[str, dict]:
        """/models attributes: perf.client<k>, perf.comm, perf.round."""
        p, pred = self.profile, self.prediction
        out = {}
        for k, c in enumerate(p.clients):
            out[f"perf.client{k}"] = dict(c.curve.to_dict(), max_batch=c.max_batch, memory_cap=self.memory_caps[k],
                                          requested=self.requested[k], batch=self.batches[k],
                                          link=self.links[k] if self.links else 0.0,
                                          predicted_step=pred.t_clients[k], device=c.device,
                                          profile_batches=np.array([b for b, _ in c.samples], dtype=np.int64),
                                          profile_seconds=np.array([t for _, t in c.samples]))
        out["perf.comm"] = dict(up=p.up, model_bytes=p.model_bytes, payload_bytes=p.payload_bytes,
                                bcast_seconds=pred.t_collectives["bcast"], up_seconds=pred.t_collectives[p.up])
        out["perf.round"] = dict(mode=self.mode, t_round=pred.t_round, t_compute_max=pred.t_compute_max,
                                 t_comm=pred.t_comm, t_server=pred.t_server, slowest_client=pred.slowest_client,
                                 bound_by=pred.bound_by, global_batch=pred.global_batch,
                                 throughput=pred.throughput, startup_seconds=self.seconds,
                                 batches=np.array(self.batches, dtype=np.int64))
        return out

    def describe(self) -> list[str]:
        """Rank 0's start-up report: batches, predicted round and its parts, per-client curves."""
        pred, p = self.prediction, self.profile
        ms = lambda t: f"{1e3 * t:.1f}"  # noqa: E731
        lines = [f"plan ({self.mode}, start-up profile {self.seconds:.1f} s): batches "
                 f"{', '.join(map(str, self.batches))} (job: {', '.join(map(str, self.requested))}), "
                 f"global batch {pred.global_batch}",
                 f"predicted round {ms(pred.t_round)} ms = broadcast {ms(pred.t_collectives['bcast'])} + slowest "
                 f"client {ms(pred.t_compute_max)} (client {pred.slowest_client}) + update "
                 f"{ms(pred.t_collectives[p.up])} + server {ms(pred.t_server)}; {pred.throughput:,.0f} samples/s, "
                 f"bound by {pred.bound_by}"]
        for k, c in enumerate(p.clients):
            lines.append(f"  client {k} ({c.device}): t(b) = max({ms(c.curve.t_floor)}, {ms(c.curve.a)} + "
                         f"{1e3 * c.curve.c:.3f} b) ms (fit rms {100 * c.curve.rel_rms:.1f}%, jitter "
                         f"{100 * c.curve.spread:.0f}%), cap {c.max_batch}, "
                         f"step at b={self.batches[k]}: {ms(pred.t_clients[k])} ms")
        return lines

    def record(self, writer, run_dir: Path) -> None:
        """Rank 0, new logs only: /models attributes (before the first round, when the log turns SWMR)
        and profile.json, which `mpifed plan` reads to ask what other batches would do."""
        for name, values in self.model_attrs().items():
            writer.set_model_attrs(name, values)
        save_profile(self.profile, run_dir / "profile.json")


def probe_grid(cap: int, points: int, batch: int) -> list[int]:
    """points + 1 batch sizes, sorted: `points` geometric from cap/16 to cap, where round batches lie
    (a balanced split rarely gives a client less than a sixteenth of the largest), and the client's
    own batch (at most cap), where the job will run. The line is fitted where it is used, not on
    batch 1, whose step is all fixed overhead. Sizes may repeat on small caps: every client's grid
    has the same length, because the probe rounds step all clients at once."""
    low = max(1, cap // 16)
    return sorted([int(round(b)) for b in np.geomspace(low, cap, points)] + [max(1, min(batch, cap))])


def probe_terms(server: np.ndarray, clients: Sequence[np.ndarray]) -> tuple[float, float, float]:
    """(t_bcast, t_up, t_server) seconds from the probe rounds' tables (probes.PROBE_COLUMNS), each the
    median over the timed rounds, split as the run log splits a round:

      t_server  the server's t_decode (decode, scaling policy, optimizer step);
      t_bcast   the server's t_down (its broadcast);
      t_up      the rest of the round's critical path: server t_down + t_up - the slowest client's
                t_compute of the same round, minus t_bcast. It holds the clients' encoding, the
                collectives and whatever part of the broadcast the clients' compute did not overlap.

    The slowest client's compute is subtracted round by round, because the prediction adds it back
    as the slowest of K draws (mpifed.perf.straggler), not as one client's median."""
    slowest = np.max(np.column_stack([c[:, 1] for c in clients]), axis=1)
    t_bcast = float(np.median(server[:, 2]))
    path = float(np.median(server[:, 2] + server[:, 3] - slowest))
    return t_bcast, max(path - t_bcast, MIN_SECONDS), float(np.median(server[:, 4]))


def fit_client(table: np.ndarray, link: float, jitter: float) -> tuple[ComputeCurve, tuple[tuple[int, float], ...]]:
    """Client curve from its probe rounds: the median step per batch size fitted by
    ComputeCurve.fit, with its own jitter (mpifed.perf.straggler.spreads) and the emulated link's
    seconds added. Returns the curve and the (batch, median seconds) samples."""
    samples = [(int(b), float(t)) for b, t in table[:, :2]]
    sizes = sorted({b for b, _ in samples})
    medians = tuple((b, float(np.median([t for bb, t in samples if bb == b]))) for b in sizes)
    return ComputeCurve.fit(medians).with_spread(jitter).shifted(link), medians


def profile_cap(mode: str, memory_cap: int, global_batch: int, profile_max: int) -> int:
    """Largest batch a client times: plan.profile_max, else the global batch (no balanced split
    gives one client more) or, for maximize, the memory cap; never above the memory cap (0 = none)."""
    wanted = profile_max or (memory_cap if mode == "maximize" else global_batch)
    if wanted <= 0:
        raise JobError("plan.mode = 'maximize' needs a largest batch: turn on memory.size_clients "
                       "(the memory model's cap) or set plan.profile_max")
    return min(wanted, memory_cap) if memory_cap else wanted


def plan_cap(mode: str, memory_cap: int, global_batch: int, profiled: int) -> int:
    """Largest batch the planner may give a client: the profiled range for maximize (no
    extrapolation when choosing the global batch), else the memory cap and the global batch."""
    if mode == "maximize":
        return profiled
    return min(memory_cap, global_batch) if memory_cap else global_batch


def choose_batches(mode: str, profile: Profile, requested: Sequence[int], min_fraction: float) -> list[int]:
    """predict: the job's batches; balance: the same global batch split so that all clients finish
    together; maximize: the global batch with the best predicted throughput within the caps."""
    if mode == "predict":
        return [int(b) for b in requested]
    if mode == "balance":
        return plan_batches(profile.curves, profile.max_batches, int(sum(requested)))
    if mode == "maximize":
        return plan_throughput(profile.curves, profile.max_batches, lambda b: predict_for(profile, b),
                               min_fraction=min_fraction).batches
    raise ValueError(f"plan.mode = {mode!r}: choose one of {', '.join(PLAN_MODES)}")


def _device_label(s: Session, client: int) -> str:
    speed = s.profile(client).speed
    return f"{s.device}" + (f", emulated {speed:g}x" if speed < 1 else "")


def plan_startup(s: Session, setup: ClientSetup | None) -> StartupPlan | None:
    """The collective start-up step (see the module docstring). Clients get their planned batch in
    setup.batch; rank 0 gets the StartupPlan and s.t_iter_pred; everyone else gets None."""
    cfg = s.job.plan
    if cfg.mode == "off":
        return None
    start = time.perf_counter()
    comm = s.world.comm
    # the global batch the job would train with: requested batches after the memory caps
    global_batch = int(all_batches(s, 0 if setup is None else setup.batch).sum())
    grid, info = [], None
    if setup is not None:
        client = s.client
        cap = profile_cap(cfg.mode, setup.max_batch, global_batch, cfg.profile_max)
        if cap < 2:
            if 0 < setup.max_batch < 2:
                why = f"its memory holds batch {setup.max_batch} at most; give its profile more memory"
            else:
                why = f"the job's global batch is {global_batch}; raise train.batch"
            raise JobError(f"client {client}: the planner times at least two batch sizes, but its largest "
                           f"batch is {cap} ({why})")
        grid = probe_grid(cap, cfg.points, setup.batch)
        info = dict(memory_cap=setup.max_batch, batch=setup.batch, device=_device_label(s, client),
                    cap=plan_cap(cfg.mode, setup.max_batch, global_batch, cap))
    if s.world.is_server:  # the probes may take minutes (a slow emulated client): say what start-up does
        print(f"mpifed: start-up: timing probe rounds of every client at {cfg.points + 1} batch sizes for the "
              f"performance model (plan.mode = {cfg.mode!r})", file=sys.stderr, flush=True)
    table = probes.probe_rounds(s, setup, grid or [0] * (cfg.points + 1), cfg.repeats, WARMUP_STEPS)
    s.exchange.arrive()
    gathered = comm.gather((info, table), root=0)  # once, at start-up: pickling is fine here
    batches = None
    if s.world.is_server:
        plan = _plan(s, gathered, start)
        batches = [None] * s.world.size  # one per rank, for the scatter
        for k, b in enumerate(plan.batches):
            batches[s.placement.rank_of(k)] = b
    s.exchange.arrive()  # clients wait politely while the server fits the plan
    mine_planned = comm.scatter(batches, root=0)
    if setup is not None:
        setup.batch = int(mine_planned)
        return None
    s.t_iter_pred = plan.prediction.t_round
    return plan


def _plan(s: Session, gathered: list, start: float) -> StartupPlan:
    """Rank 0: fit the curves and terms from the probe rounds, build the Profile, choose and predict
    the batches."""
    cfg, p = s.job.plan, s.world.size
    per_client = s.placement.by_client(gathered)
    server, infos, tables = gathered[SERVER][1], [g[0] for g in per_client], [g[1] for g in per_client]
    t_bcast, t_up, t_server = probe_terms(server, tables)
    model_bytes, up_bytes = 4 * s.model.size, probes.update_bytes(s)
    up = probes.update_collective(s)
    jitter = spreads(np.column_stack([t[:, 1] for t in tables]), np.column_stack([t[:, 0] for t in tables]))
    clients, links = [], []
    for k, (info, table) in enumerate(zip(infos, tables)):
        link = profiles.link_seconds(s.profile(k), model_bytes) + profiles.link_seconds(s.profile(k), up_bytes)
        curve, samples = fit_client(table, link, jitter[k])
        clients.append(ClientProfile(k, s.placement.rank_of(k), info["device"], int(info["cap"]), curve, samples))
        links.append(link)
    comm_model = fit_collective([CollectiveSample("bcast", p, model_bytes, t_bcast),
                                 CollectiveSample(up, p, up_bytes, t_up)])
    profile = Profile(p, model_bytes, up_bytes, tuple(clients), comm_model, up, 0, t_server)
    requested = [int(info["batch"]) for info in infos]
    try:
        batches = choose_batches(cfg.mode, profile, requested, cfg.min_fraction)
    except ValueError as err:
        raise JobError(f"plan.mode = {cfg.mode!r}: {err}") from None
    return StartupPlan(cfg.mode, profile, [int(info["memory_cap"]) for info in infos], requested, batches,
                       predict_for(profile, batches), time.perf_counter() - start, tuple(links))


def other_sizes(nbytes: int, points: int = 5) -> list[int]:
    """Sizes of the bare collectives `mpifed profile` times besides the round's own, to give the
    alpha-beta fit its shape: geometric from 64 B to 4x `nbytes` (multiples of 4), without `nbytes`."""
    sizes = {4 * max(1, math.ceil(b / 4)) for b in np.geomspace(64, 4 * max(nbytes, 64), points)}
    return sorted(sizes - {nbytes})
