"""Random streams: one per (seed, purpose, keys), and no two different key lists share one."""

import numpy as np
import pytest

from mpifed.seeding import Purpose, rng


def _draws(seed: int, purpose: Purpose, *keys: int) -> np.ndarray:
    return rng(seed, purpose, *keys).integers(2**63, size=4)


def test_the_same_keys_give_the_same_stream():
    assert np.array_equal(_draws(7, Purpose.SAMPLE, 3, 1), _draws(7, Purpose.SAMPLE, 3, 1))


@pytest.mark.parametrize("keys, others", [
    ((2,), (2, 0)),          # numpy's SeedSequence pads short entropy with zeros: these aliased
    ((), (0,)),              # a purpose without keys against one use of it with key 0
    ((), (0, 0)),
    ((2**32,), (0, 1)),      # a key of 2**32 or more is split into 32-bit words
    ((1, 2**32 + 3), (1, 3, 1)),
])
def test_key_lists_that_differ_never_share_a_stream(keys, others):
    assert not np.array_equal(_draws(1, Purpose.CODEC, *keys), _draws(1, Purpose.CODEC, *others))


def test_seeds_and_purposes_are_kept_apart():
    # a seed of 2**32 or more is several words too; it must not shift into the purpose or keys
    assert not np.array_equal(_draws(5 + 3 * 2**32, Purpose.PARTITION), _draws(5, Purpose.SAMPLE, 2))
    assert not np.array_equal(_draws(0, Purpose.SAMPLE, 1), _draws(0, Purpose.AUGMENT, 1))


def test_keys_outside_the_stream_space_are_refused():
    with pytest.raises(ValueError, match="keys must be in"):
        rng(0, Purpose.SAMPLE, -1)
    with pytest.raises(ValueError, match="keys must be in"):
        rng(0, Purpose.SAMPLE, 2**64)
