"""Set-up shared by the server and the clients: everything a round needs, built once, in one place.

Set-up may use mpi4py's pickling lowercase calls (they run once); the per-round path may not.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

import numpy as np
import torch

from mpifed.cluster import StopRequest, StoppedEarly, World, pick_device
from mpifed.config import ClientProfiles, DeviceProfile, Job, client_batches, resolve_clients
from mpifed.data import load_dataset
from mpifed.dataplane import open_plane
from mpifed.datasets import DATASETS
from mpifed.exchange import Exchange
from mpifed.flat import FlatModel
from mpifed.learn.loading import forget_data, load_data, make_model
from mpifed.learn.partition import Partition, split_clients
from mpifed.learn.tasks import Task
from mpifed.nodeshare import share_on_node
from mpifed.placement import Placement
from mpifed.protocol import STOP_ASKED, STOP_DIVERGED, RoundProtocol, round_protocol
from mpifed.seeding import Purpose, forked_torch_rng


@dataclass
class Session:
    world: World
    job: Job
    device: torch.device
    model: FlatModel
    exchange: Exchange
    profile_names: ClientProfiles  # per client
    batches: np.ndarray            # per client, samples per local step
    dataset: object                # a sample set (mpifed.learn.samples): train on clients, test on the server
    placement: Placement           # which rank trains which client
    task: Task = None              # the data's shapes, loss and metric (mpifed.learn.tasks)
    shared: list = field(default_factory=list)  # the node's windows (mpifed.nodeshare): the train split, the partition
    parts: Partition | None = None  # every client's samples, the node's shared copy (None: clients split it)
    stop: StopRequest = field(default_factory=StopRequest.install)  # SIGTERM/SIGUSR1/SIGINT seen by this rank
    start_round: int = 0           # > 0 when resuming
    resumed_from: dict | None = None  # the checkpoint being resumed (server only)
    max_batches: list[int] = field(default_factory=list)  # memory-model caps (server only; 0 = unsized)
    data_sizes: list[int] = field(default_factory=list)   # samples per client (server only)
    t_iter_pred: float = float("nan")  # the model's prediction of the next round, s (server; NaN: no plan)

    def checkpoint_due(self, done: int) -> bool:
        every = self.job.checkpoint.every  # and after the last round, so a finished run can be extended
        return bool(every) and (done % every == 0 or done == self.job.train.rounds)

    def state_due(self, done: int, stop: int) -> bool:
        """Whether round `done` ends with a checkpoint (every rank sends its state): when one is due, when
        a signal stops the run, and when it stops as diverged with checkpoints on."""
        return (stop == STOP_ASKED or self.checkpoint_due(done)
                or (stop == STOP_DIVERGED and bool(self.job.checkpoint.every)))

    @property
    def n_clients(self) -> int:
        return self.placement.n_clients

    @property
    def client(self) -> int | None:
        """The client this rank trains (None on the server)."""
        return self.placement.client_on(self.world.rank)

    def protocol(self) -> RoundProtocol:
        """This rank's side of the round (mpifed.protocol), with its own update channel."""
        return round_protocol(self.job, self.model, self.exchange, self.placement, self.world.rank,
                              self.batches_may_change)

    @property
    def global_batch(self) -> int:
        return int(self.batches.sum())

    @property
    def batches_may_change(self) -> bool:
        """Rounds begin with a broadcast of the batches: the noise-scale controller or the re-planner
        may move them between rounds."""
        return self.job.scaling.grow_batch or self.job.plan.replan

    def profile(self, client: int) -> DeviceProfile:
        return self.job.profile(self.profile_names[client])

    def weight(self, client: int) -> float:
        """Aggregation weight b_k / B: the union of client batches is one large batch."""
        return float(self.batches[client]) / self.global_batch


def open_session(world: World, job: Job) -> Session:
    device = pick_device(world, job.run.device)
    polite = job.comm.wait == "sleep" or (job.comm.wait == "auto" and world.oversubscribed)
    chunk = int(job.comm.chunk_mib * 2**20)
    timeout = job.comm.timeout
    train, test, task, natural, shared = _load_data(world, job, Exchange(world.comm, polite, chunk, timeout=timeout))
    natural = natural if job.data.partition == "natural" else None  # before the placement
    names = resolve_clients(job, world.size, natural)
    placement = Placement.of_job(len(names), world.size, job.clients.per_round)
    plane, plane_name, plane_reason = open_plane(job.comm.data, world.comm, device, timeout,
                                                 world.local_size == world.size, chunk)
    exchange = Exchange(world.comm, polite, chunk, timeout=timeout, placement=placement, data=plane)
    exchange.data_plane = (plane_name, plane_reason)
    if plane is None:
        exchange.agree_pieces(device)
    dataset = test if world.is_server else train
    parts, windows = None, []
    if shared is not None:
        parts, held = _node_partition(world, job, train, names, shared, exchange.wait)
        windows = [shared, held]
    forget_data()  # the cache held both splits: this rank keeps the one it uses
    with forked_torch_rng(job.run.seed, Purpose.INIT):  # same init on every rank, global RNG untouched
        module = make_model(job, task)
    model = FlatModel(module, device)
    batches = client_batches(job, names)
    return Session(world, job, device, model, exchange, names, batches, dataset, placement, task=task,
                   shared=windows, parts=parts)


def all_batches(s: Session, mine: int) -> np.ndarray:
    """Every client's batch, on every rank (the server passes 0)."""
    everyone = np.zeros(s.world.size, dtype=np.int64)
    s.exchange.wait([s.world.comm.Iallgather(np.array([mine], dtype=np.int64), everyone)], "allgather")
    return everyone[s.placement.client_ranks]


def gather_rank_facts(s: Session, facts: dict | None) -> list[dict] | None:
    """Once, at start-up: every rank's static facts (the run log's /ranks row) to the server, pickled;
    the server (facts None) gets one dict per rank, rank 0 first."""
    s.exchange.arrive()  # clients prepare at their own pace: the server waits politely
    return s.world.comm.gather(facts, root=0)


def stop_if_asked(s: Session) -> None:
    """A start-up stop point: when any rank got SIGTERM, SIGUSR1 or Ctrl-C, every rank stops here
    together (one tiny allreduce) instead of going on with start-up until round 1 is done."""
    stop = s.exchange.any(bool(s.stop))
    s.stop.at_once = False  # from here on every rank reaches the same stop points: they agree there
    if stop:
        raise StoppedEarly(signal.Signals(s.stop.signal).name if s.stop else "another rank's signal")


def agree_batches(s: Session, mine: int) -> None:
    """Every rank learns every client's batch (after each sized itself): the weights b_k / B."""
    s.batches = all_batches(s, mine)


def restore_batches(s: Session, state: dict | None) -> None:
    """Resuming: train with the batches the checkpoint was written with, whatever start-up sizing
    or planning chose this time, so the resumed rounds are those of the interrupted run."""
    batches = np.zeros(s.n_clients, dtype=np.int64)
    if state is not None:
        batches[:] = state["batches"].numpy()
    s.exchange.broadcast(batches)
    s.batches = batches


def _node_partition(world: World, job: Job, train, names: ClientProfiles, shared, wait):
    """Every client's samples, split by each node's leader into a window of the node (the node's ranks
    read them; O(samples) once a node, not once a rank), and that window."""
    held = share_on_node(world.comm, make=lambda: split_clients(job, train, names).arrays(), wait=wait,
                         node=shared.node)
    return Partition(held["indices"], held["offsets"]), held


def _load_data(world: World, job: Job, exchange: Exchange):
    """(train, test, task, natural clients, the node's window or None), after rank 0 downloaded what
    data.download asks for. data.share = "node": each node's leader loads, the node shares its train
    split (mpifed.learn.nodedata), and test is None on the other ranks; else every rank loads both."""
    d = job.data
    if d.download and d.dataset in DATASETS and d.dataset != "synthetic":
        if world.is_server:  # one download per job, before anyone reads the files
            for split in (True, False):
                load_dataset(d.dataset, split, d.root, download=True)
        exchange.arrive()  # the clients wait politely, and no longer than comm.timeout
    if d.share == "node" and world.local_size > 1:  # one copy per node, which the server's rank maps too
        from mpifed.learn.nodedata import hold_on_node

        held = hold_on_node(world.comm, job, exchange.wait)
        return held.train, held.test, held.task, held.natural_clients, held.shared
    bundle = load_data(job)
    return bundle.train, bundle.test, bundle.task, bundle.natural_clients, None
