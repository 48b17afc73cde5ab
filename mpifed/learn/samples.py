"""Sample sets: what a split of any dataset looks like to the rest of mpifed.

Every set (the built-in image sets of mpifed.data, a user's arrays, Shakespeare's windows) answers
the same few questions, so one code path partitions, samples, trains and evaluates them all:

    len(ds)              samples in the split
    ds.tensors(indices)  the model's inputs and the targets of those samples, as torch tensors
    ds.labels            one integer label per sample, for label-skewed partitions (dirichlet)
    ds.clients           the natural partition (a client id per sample), or None
    ds.task              shapes and loss (mpifed.learn.tasks)
    ds.arrays()          the raw arrays it reads, for holding them once per node (mpifed.nodeshare)

A set keeps its raw arrays (uint8 images, token ids) and converts only the samples asked for, so a
rank that trains many clients reads one node-shared copy instead of holding its own float copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mpifed.learn.tasks import Task


@dataclass
class ArraySet:
    """A user's samples as arrays: inputs (n, ...) fed to the model as they are (float32, or int64 token
    ids), integer targets (n,) or (n, T)."""

    inputs: np.ndarray
    targets: np.ndarray
    task: Task
    clients: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def labels(self) -> np.ndarray | None:
        return self.targets if self.targets.ndim == 1 else None

    def tensors(self, indices: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if indices is None:
            indices = np.arange(len(self))
        x = torch.from_numpy(np.ascontiguousarray(self.inputs[indices])).to(self.task.input_dtype)
        return x, torch.from_numpy(np.asarray(self.targets[indices], dtype=np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        return _with_clients(dict(inputs=self.inputs, targets=self.targets), self.clients)


@dataclass
class WindowSet:
    """Sequences cut from one long token array: sample j is text[s : s + T] in and text[s + T] out,
    s = starts[j]. Shakespeare's ~4.5 million characters make ~4.5 million windows; held as windows
    they would take 80x the text."""

    text: np.ndarray
    starts: np.ndarray
    task: Task
    clients: np.ndarray | None = None
    _labels: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def seq_len(self) -> int:
        return self.task.input_shape[0]

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = self.text[self.starts + self.seq_len].astype(np.int64)
        return self._labels

    def tensors(self, indices: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts if indices is None else self.starts[indices]
        window = starts[:, None] + np.arange(self.seq_len + 1)
        tokens = torch.from_numpy(self.text[window].astype(np.int64))
        return tokens[:, :-1].contiguous(), tokens[:, -1].contiguous()

    def arrays(self) -> dict[str, np.ndarray]:
        return _with_clients(dict(text=self.text, starts=self.starts), self.clients)


def _with_clients(arrays: dict[str, np.ndarray], clients: np.ndarray | None) -> dict[str, np.ndarray]:
    """The natural partition (a client id per sample: as large as the starts) is shared too."""
    return arrays if clients is None else dict(arrays, clients=clients)


class DeviceSamples:
    """Samples converted once and kept on the training device: a client that holds one partition."""

    def __init__(self, dataset, indices: np.ndarray | None, device: torch.device):
        x, y = dataset.tensors(indices)
        self.xs, self.ys = x.to(device), y.to(device)

    def __len__(self) -> int:
        return len(self.ys)

    @property
    def nbytes(self) -> int:
        return self.xs.nbytes + self.ys.nbytes

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.xs[positions], self.ys[positions]


class LazySamples:
    """Samples converted batch by batch from the dataset's raw (node-shared) arrays: a worker that
    trains many clients holds no copy of its own. The conversion is elementwise, so a batch equals
    the same rows of DeviceSamples bit for bit."""

    def __init__(self, dataset, device: torch.device):
        self.dataset, self.device = dataset, device

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def nbytes(self) -> int:
        return 0  # the raw arrays are the node's, not this rank's

    def prepare(self, indices: np.ndarray) -> None:
        """Make the samples a round will read, before its timers start: a set made on demand
        (mpifed.learn.nodedata.MadeOnDemand) generates them now, not inside the measured steps."""
        prepare = getattr(self.dataset, "prepare", None)
        if prepare is not None:
            prepare(indices)

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.dataset.tensors(positions.cpu().numpy())
        return x.to(self.device), y.to(self.device)
