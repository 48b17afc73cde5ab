"""The training split held once per node (data.share = "node"), loaded by one rank of the node.

The node's leader (its first rank; rank 0 is the leader of its node) alone loads the job's dataset
(mpifed.learn.loading: a built-in's files or the user's factory) and moves the training split's raw
arrays into one MPI shared-memory window (mpifed.nodeshare), with a small description of the set (its
kind, the task's shapes) that the node's other ranks rebuild it from. So loading costs one rank's time
and one transient copy per node, however many ranks the node runs, and a dataset factory is called once
per node: one that draws from a global RNG no longer gives ranks different data. Only a factory whose
Data brings its own loss or metric is called on every rank too (functions never travel between ranks),
and its samples are still the leader's. A leader's failure reaches the node's ranks (each raises it).

The synthetic set is not generated at start-up at all: it is made on demand, sample by sample, into
the window. Sample i is a pure function of i (its own seeded stream, mpifed.data.SyntheticSet), so any
rank may generate any sample and two ranks that both generate it write the same bytes. The window holds
the images (allocated, untouched: no memory until written) and one flag byte per sample. A rank that
reads samples (`images`) first generates the unflagged ones into their rows, then `sync()`
(MPI_Win_sync: a memory barrier) and sets their flags; a rank that sees a flag set calls `sync()` before
it reads the rows. So a set flag always means whole rows; a rank that sees a flag still unset generates
the sample itself, at worst twice, never wrongly. Within a round every client trains on one rank and
partitions do not overlap, so in practice each sample is generated once per node, by the first rank
that reads it; a job reads only the samples of the clients it draws, so start-up and memory do not
grow with the clients that are never trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mpifed.data import ImageSet, SyntheticSet
from mpifed.learn.samples import ArraySet, WindowSet
from mpifed.learn.tasks import Task
from mpifed.nodeshare import Blank, NodeArrays, share_on_node

GENERATE_ROWS = 2048  # synthetic samples generated at a time (about 6 MiB of float temporaries)


@dataclass
class NodeData:
    """What a rank gets: the train split (the node's copy), the task, the natural clients (0: none), the
    test split (on rank 0, the server; None elsewhere) and the window (free it at the end)."""

    train: object
    task: Task
    natural_clients: int
    test: object | None
    shared: NodeArrays


def hold_on_node(comm, job, wait) -> NodeData:
    """The job's training split, loaded by each node's leader alone and held once per node; collective
    over `comm`."""
    from mpifed.learn.loading import load_data

    bundle = None

    def make():
        nonlocal bundle
        bundle = load_data(job)
        return _shared_arrays(bundle.train, bundle.task)

    shared = share_on_node(comm, make=make, wait=wait, writable=("data", "made"))
    about = shared.about
    task = _task(about["task"])
    if bundle is None and about["own_functions"]:  # the user's loss or metric: from their factory's Data
        task = load_data(job).task
    test = bundle.test if bundle is not None and comm.rank == 0 else None  # the server's; other leaders drop theirs
    return NodeData(_rebuild(shared, about), task, about["natural_clients"], test, shared)


def _shared_arrays(train, task: Task) -> tuple[dict, dict]:
    """The leader's arrays for the window, and what the other ranks need to rebuild the set."""
    about = dict(task=dict(kind=task.kind, input_shape=list(task.input_shape), classes=task.classes,
                           input_dtype=str(task.input_dtype).removeprefix("torch."),
                           target_shape=list(task.target_shape)),
                 own_functions=task.loss_fn is not None or task.metric_fn is not None,
                 natural_clients=0 if train.clients is None else int(train.clients.max()) + 1)
    if isinstance(train, SyntheticSet):
        n = len(train)
        arrays = dict(data=Blank((n, 32, 32, 3), np.uint8), made=np.zeros(n, np.uint8), targets=train.targets,
                      which=train.which)
        return arrays, dict(about, set="synthetic", split=train.split, noise=train.noise, distort=train.distort,
                            classes=train.num_classes, pad_to=train.pad_to)
    if isinstance(train, ImageSet):
        return train.arrays(), dict(about, set="images", classes=train.num_classes, name=train.name,
                                    pad_to=train.pad_to)
    kind = {ArraySet: "arrays", WindowSet: "windows"}[type(train)]
    return train.arrays(), dict(about, set=kind)


def _task(plain: dict) -> Task:
    return Task(plain["kind"], tuple(plain["input_shape"]), plain["classes"], getattr(torch, plain["input_dtype"]),
                tuple(plain["target_shape"]))


def _rebuild(shared: NodeArrays, about: dict):
    """The train split over the window's arrays (the task's functions are not needed by a split)."""
    a, kind, task = shared.arrays, about["set"], _task(about["task"])
    if kind == "synthetic":
        source = SyntheticSet.of_labels(about["split"], about["noise"], about["distort"], a["targets"], a["which"],
                                        about["classes"], about["pad_to"])
        return MadeOnDemand(source, a["data"], a["made"], shared)
    if kind == "images":
        return ImageSet(a["data"], a["targets"], about["classes"], about["name"], about["pad_to"])
    if kind == "arrays":
        return ArraySet(a["inputs"], a["targets"], task, a.get("clients"))
    return WindowSet(a["text"], a["starts"], task, a.get("clients"))


class MadeOnDemand(ImageSet):
    """The synthetic training images in the node's window, each generated by the first rank that reads
    it (the module docstring says why that is safe)."""

    def __init__(self, source: SyntheticSet, data: np.ndarray, made: np.ndarray, shared: NodeArrays):
        super().__init__(data, source.targets, source.num_classes, source.name, source.pad_to)
        self.source, self.made, self.shared = source, made, shared

    def prepare(self, indices: np.ndarray) -> int:
        """Generate the samples of `indices` that no rank of the node has made yet; returns how many."""
        indices = np.asarray(indices, dtype=np.int64)
        missing = np.unique(indices[self.made[indices] == 0])
        for first in range(0, len(missing), GENERATE_ROWS):
            rows = missing[first: first + GENERATE_ROWS]
            self.data[rows] = self.source.images(rows)
        if len(missing):
            self.shared.sync()  # the rows are in memory before any rank can see their flags
            self.made[missing] = 1
        return len(missing)

    def images(self, indices: np.ndarray) -> np.ndarray:
        self.prepare(indices)
        self.shared.sync()  # flags seen (set here or by another rank) before their rows are read
        return self.data[indices]
