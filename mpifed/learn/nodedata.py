"""The training split held once per node (data.share = "node"), read by every rank of the node.

Every rank loads the job's dataset (mpifed.learn.loading; a built-in's files or a user's factory),
then the node's ranks move its raw arrays into one MPI shared-memory window (mpifed.nodeshare) and
drop their own copies. The synthetic set, which is generated sample by sample, is generated straight
into the window, each rank of the node writing its share of the samples, so start-up does not grow
with the ranks either.
"""

from __future__ import annotations

import numpy as np

from mpifed.data import SyntheticSet
from mpifed.nodeshare import NodeArrays, share_on_node

GENERATE_ROWS = 2048  # synthetic samples generated at a time (about 6 MiB of float temporaries)


def hold_on_node(comm, train, wait) -> tuple[object, NodeArrays]:
    """`train` backed by the node's shared copy of its arrays, and the window (free it at the end)."""
    if isinstance(train, SyntheticSet):
        shared = share_on_node(comm, wait=wait, fill=_synthetic_fill(train))
    else:
        shared = share_on_node(comm, make=train.arrays, wait=wait)
    return train.with_arrays(shared.arrays), shared


def _synthetic_fill(train: SyntheticSet):
    n = len(train)
    spec = {"data": ((n, 32, 32, 3), np.uint8), "targets": ((n,), np.int64)}

    def write(name: str, view: np.ndarray, start: int, stop: int) -> None:
        if name == "targets":
            view[start:stop] = train.targets[start:stop]
            return
        for first in range(start, stop, GENERATE_ROWS):
            last = min(first + GENERATE_ROWS, stop)
            view[first:last] = train.images(np.arange(first, last))

    return spec, write
