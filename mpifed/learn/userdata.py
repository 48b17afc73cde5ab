"""The interface between a user's dataset factory and mpifed: `Data`, and how it becomes sample sets.

A dataset factory named in the job (`data.dataset = "my_data.py:make"`) returns a `Data`:

    from mpifed.learn import Data

    def make(seed: int, size: int = 1000) -> Data:      # seed and root are given when named
        x, y, writer = ...                                # numpy arrays or torch tensors
        return Data(train=(x[:900], y[:900]), test=(x[900:], y[900:]), classes=10,
                    clients=writer[:900])                 # optional: the natural partition

With data.share = "node" (the default) one rank per node calls the factory and the node's ranks share
what it returns; with several nodes, or data.share = "rank", or a Data that brings its own loss or
metric, more ranks call it, so keep it deterministic: draw any randomness from `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass
class Data:
    """What a dataset factory returns.

    train, test: (inputs, targets) as numpy arrays or torch tensors (n samples on the first axis), or a
        torch Dataset whose items are (input, target) pairs (read once, item by item, into arrays).
        Inputs are fed to the model as they are: float features or images become float32 (normalize
        them in the factory); integer inputs of a next-token task are token ids (int64). Targets are
        integers: one per sample, or one per position of a sequence (n, T).
    classes: number of labels, for a classification task; or
    vocab: vocabulary size, for next-token prediction (inputs and targets are token ids < vocab).
    clients: optional natural partition, one value per training sample naming its client (a writer,
        a speaker, a hospital; any integers or strings); `data.partition = "natural"` uses it.
    loss: optional loss(output, target) -> mean loss tensor, instead of cross-entropy.
    metric: optional metric(output, target) -> (correct, counted), instead of accuracy; the test
        accuracy logged is the sum of correct over the sum of counted.
    """

    train: Any
    test: Any
    classes: int = 0
    vocab: int = 0
    clients: Any = None
    loss: Callable | None = None
    metric: Callable | None = None


class DataProblem(ValueError):
    """What is wrong with a factory's Data, said in the user's terms."""


def as_arrays(split: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of a split given as a pair of arrays/tensors or as a torch Dataset."""
    if isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = (_numpy(v) for v in split)
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__"):
        items = [split[i] for i in range(len(split))]
        if not items:
            raise DataProblem(f"{what} is empty")
        try:
            x = np.stack([_numpy(item[0]) for item in items])
            y = np.stack([_numpy(item[1]) for item in items])
        except (TypeError, IndexError, ValueError) as err:
            raise DataProblem(f"{what}: the items of a Dataset must be (input, target) pairs of equal "
                              f"shapes ({err})") from None
    else:
        raise DataProblem(f"{what} must be (inputs, targets) arrays or tensors, or a torch Dataset of "
                          f"(input, target) pairs; got {type(split).__name__}")
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise DataProblem(f"{what}: inputs and targets must hold the same number of samples on their first "
                          f"axis; got shapes {x.shape} and {y.shape}")
    if len(y) == 0:
        raise DataProblem(f"{what} is empty")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataProblem(f"{what}: targets must be integers (class or token ids); got {y.dtype}")
    return x, y


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def natural_ids(clients: Any, n: int) -> np.ndarray:
    """Client labels (any values, one per training sample) -> int64 ids 0..C-1 in sorted label order."""
    labels = _numpy(clients)
    if labels.ndim != 1 or len(labels) != n:
        raise DataProblem(f"clients must give one client per training sample ({n}); got shape {labels.shape}")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64).reshape(-1)
