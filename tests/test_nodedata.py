"""In process: the partition held as one flat array (CSR) gives every client the indices the list of
arrays gave, and the synthetic set made on demand gives the bytes of the set generated at once."""

from __future__ import annotations

import numpy as np
import pytest

from mpifed.data import SyntheticSet, _sizes, partition
from mpifed.learn.loading import natural_partition
from mpifed.learn.nodedata import MadeOnDemand
from mpifed.learn.partition import Partition
from mpifed.seeding import Purpose, rng


def listed_partition(labels, weights, scheme, seed, alpha=0.5, volume_sigma=1.0):
    """The partition as it was, one array per client: the reference the flat partition must equal."""
    gen = rng(seed, Purpose.PARTITION)
    weights = np.asarray(weights, dtype=np.float64)
    n = len(labels)
    if scheme == "volume":
        weights = weights * gen.lognormal(0.0, volume_sigma, size=len(weights))
    if scheme in ("iid", "volume"):
        cuts = np.cumsum(_sizes(n, weights))[:-1]  # the sizes are computed as they were
        return [np.sort(p) for p in np.split(gen.permutation(n), cuts)]
    k = len(weights)
    parts = [[] for _ in range(k)]
    for cls in np.unique(labels):
        idx = gen.permutation(np.flatnonzero(labels == cls))
        shares = gen.dirichlet(np.full(k, alpha)) * weights
        cuts = np.floor(np.cumsum(shares / shares.sum())[:-1] * len(idx)).astype(np.int64)
        for client, piece in enumerate(np.split(idx, cuts)):
            parts[client].append(piece)
    out = [np.sort(np.concatenate(p)) for p in parts]
    for client in range(k):
        if len(out[client]) == 0:
            donor = int(np.argmax([len(p) for p in out]))
            out[client], out[donor] = out[donor][-1:], out[donor][:-1]
    return out


def listed_natural(ids, n):
    sizes = np.bincount(ids)
    chosen = np.sort(np.argsort(-sizes, kind="stable")[:n])
    order = np.argsort(ids, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[bounds[c]: bounds[c + 1]]) for c in chosen]


def same(flat: Partition, listed: list[np.ndarray]) -> None:
    assert len(flat) == len(listed) and flat.indices.dtype == np.int64 and flat.offsets[-1] == len(flat.indices)
    for k, want in enumerate(listed):
        assert np.array_equal(flat[k], want), k
    assert flat.sizes.tolist() == [len(p) for p in listed]


@pytest.mark.parametrize("scheme", ["iid", "volume", "dirichlet"])
def test_the_flat_partition_gives_every_client_the_indices_of_the_listed_one(scheme):
    draw = np.random.default_rng(5)
    for seed, n, k, alpha in ((0, 500, 7, 0.5), (1, 5000, 100, 0.5), (2, 300, 40, 0.01), (3, 60, 60, 0.05),
                              (4, 1000, 3, 10.0)):
        labels = draw.integers(0, 10, size=n)
        weights = draw.choice([1.0, 2.0, 0.5], size=k)
        same(partition(labels, weights, scheme, seed, alpha, 3.0), listed_partition(labels, weights, scheme, seed,
                                                                                    alpha, 3.0))


def test_dirichlet_fills_clients_left_empty_as_the_listed_partition_did():
    labels = np.repeat(np.arange(3), 8)
    flat = partition(labels, np.ones(20), "dirichlet", 7, alpha=0.01)
    assert (flat.sizes >= 1).all()  # a tiny alpha leaves many clients empty before the fill
    same(flat, listed_partition(labels, np.ones(20), "dirichlet", 7, alpha=0.01))


def test_the_flat_natural_partition_gives_the_listed_one():
    ids = np.random.default_rng(3).integers(0, 50, size=2000)
    for n in (50, 30, 1):
        same(natural_partition(ids, n), listed_natural(ids, n))


class Window:
    """What MadeOnDemand needs of the node's window, in one process."""

    syncs = 0

    def sync(self):
        Window.syncs += 1


def test_made_on_demand_generates_only_what_is_read_with_the_bytes_of_the_whole_set():
    whole = SyntheticSet(True, 1000, 2.5)
    expect = whole.images(np.arange(len(whole)))
    data, made = np.zeros((len(whole), 32, 32, 3), np.uint8), np.zeros(len(whole), np.uint8)
    source = SyntheticSet.of_labels(1, 2.5, 1.2, whole.targets, whole.which, whole.num_classes)
    lazy = MadeOnDemand(source, data, made, Window())
    draw = np.random.default_rng(0)
    picked = draw.choice(len(whole), 40, replace=False)
    assert np.array_equal(lazy.images(picked), expect[picked]) and made.sum() == 40
    assert lazy.prepare(picked) == 0  # made once: read again, not generated again
    again = np.concatenate([picked[:5], draw.choice(len(whole), 600)])  # repeats, made and not made
    assert np.array_equal(lazy.images(again), expect[again])
    left = len(whole) - int(made.sum())
    assert left > 0 and lazy.prepare(np.arange(len(whole))) == left
    assert np.array_equal(data, expect) and made.all()
    x, y = lazy.tensors(picked)
    wx, wy = whole.tensors(picked)
    assert np.array_equal(x.numpy(), wx.numpy()) and np.array_equal(y.numpy(), wy.numpy())
