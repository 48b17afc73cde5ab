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
    PROBE = 8


def rng(seed: int, purpose: Purpose, *keys: int) -> np.random.Generator:
    """A generator for (seed, purpose, keys); distinct arguments never share a stream.

    The purpose and keys are SeedSequence's spawn key, each as two 32-bit words: numpy pads the seed to
    its pool size before a spawn key and mixes in every word after it, so neither a trailing zero
    ((s, p, k) against (s, p, k, 0)) nor a key of 2**32 or more (which numpy splits into words) can make
    two key lists alias, as appending them to the seed's entropy did. Keys must be in [0, 2**64)."""
    if not 0 <= seed < 2**128:
        raise ValueError(f"a seed must be in [0, 2**128), got {seed}")
    words = []
    for key in (int(purpose), *map(int, keys)):
        if not 0 <= key < 2**64:
            raise ValueError(f"random stream keys must be in [0, 2**64), got {key} in {keys}")
        words += (key & 0xFFFFFFFF, key >> 32)
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=words))


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
