"""Random generators derived from (seed, purpose, keys...): never the global RNG.

Each purpose gets its own stream so that, e.g., changing the batch size does not change the data
partition, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
from enum import IntEnum

import numpy as np
import torch


class Purpose(IntEnum):
    SYNTHETIC = 1
    PARTITION = 2
    SAMPLE = 3
    AUGMENT = 4
    INIT = 5
    CODEC = 6
    CLIENTS = 7


def rng(seed: int, purpose: Purpose, *keys: int) -> np.random.Generator:
    """A generator for (seed, purpose, keys). numpy's SeedSequence pads short entropy with zeros, so
    key lists that differ only by trailing zeros share a stream ((s, p, k) is (s, p, k, 0)): within a
    purpose, give each use a fixed number of keys or a non-zero last key."""
    return np.random.default_rng([seed, int(purpose), *keys])


def torch_generator(seed: int, purpose: Purpose, *keys: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int(rng(seed, purpose, *keys).integers(2**63 - 1)))
    return gen


@contextlib.contextmanager
def forked_torch_rng(seed: int, purpose: Purpose, *keys: int):
    """Seed torch's global RNG inside the block only (for nn.init), restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng(seed, purpose, *keys).integers(2**63 - 1)))
        yield
