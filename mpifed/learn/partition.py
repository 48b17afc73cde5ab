"""Which training samples each client holds, as two arrays whatever the number of clients.

A partition is one flat array of sample indices and one of offsets (compressed sparse rows): client k
holds `indices[offsets[k]:offsets[k + 1]]`, in ascending order. A million clients are two arrays, not a
million numpy objects on every rank, and with data.share = "node" the node's leader computes them once
into the node's shared window (mpifed.session), where every rank of the node reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Partition:
    """Client k's sample indices are `self[k]` (a view, ascending); `len()` is the number of clients."""

    indices: np.ndarray  # int64: every client's samples, client after client
    offsets: np.ndarray  # int64, clients + 1: where each client's samples begin (and the last ends)

    @classmethod
    def of_owners(cls, owner: np.ndarray, clients: int) -> Partition:
        """From the client of each sample (-1: none); each client's samples in ascending order."""
        held = np.flatnonzero(owner >= 0) if (owner < 0).any() else None
        which = owner if held is None else owner[held]
        order = np.argsort(which, kind="stable")  # stable: ascending sample indices within a client
        indices = order if held is None else held[order]
        sizes = np.bincount(which, minlength=clients)
        return cls(indices.astype(np.int64, copy=False), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, client: int) -> np.ndarray:
        return self.indices[self.offsets[client]: self.offsets[client + 1]]

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    @property
    def sizes(self) -> np.ndarray:
        """Samples per client."""
        return np.diff(self.offsets)

    def arrays(self) -> dict[str, np.ndarray]:
        """Its arrays, for holding them once per node (mpifed.nodeshare)."""
        return dict(indices=self.indices, offsets=self.offsets)


def split_clients(job, train, names) -> Partition:
    """Every client's sample indices into `train`: the data's natural clients, or a split by the job's
    scheme weighted by the clients' profiles' data volumes (`names`: mpifed.config.ClientProfiles)."""
    from mpifed.data import partition
    from mpifed.learn.loading import natural_partition

    d = job.data
    if d.partition == "natural":
        return natural_partition(train.clients, len(names))
    weights = names.per_client(np.array([job.profile(name).data for name in names.names], dtype=np.float64))
    return partition(train.labels, weights, d.partition, job.run.seed, d.alpha, d.volume_sigma)
