"""The datasets mpifed trains on, in one table: the job's choices, the data layer and `mpifed memory` read it.

Torch-free, so the command line lists the datasets without paying for a torch import.
"""

from __future__ import annotations

from dataclasses import dataclass



@dataclass(frozen=True)
class DatasetSpec:
    """One dataset as the data layer feeds it.

    mean, std: per-channel statistics of the training set, for normalization.
    classes: number of labels.
    torchvision: its class in torchvision.datasets; empty for synthetic, which mpifed generates.
    files: where its files go under data.root, for the message when they are missing.
    side: height and width of its images, as models get them (a VGG pads them to 32: mpifed.models.MIN_SIDE).
    train_samples: the training split's size, known before loading it (jobs are checked against it).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: int
    torchvision: str = ""
    files: str = ""
    side: int = 32
    train_samples: int = 0   # the training split's size, where fixed (0: synthetic's is data.train_size)

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one model input."""
        return self.channels, self.side, self.side


# Statistics: the usual published values; synthetic's measured.
DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec((0.5, 0.5, 0.5), (0.19, 0.19, 0.19), 10),
    "cifar10": DatasetSpec((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, "CIFAR10",
                           "<root>/cifar-10-batches-py/ (extract cifar-10-python.tar.gz into <root>)",
                           train_samples=50000),
    "cifar100": DatasetSpec((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100, "CIFAR100",
                            "<root>/cifar-100-python/ (extract cifar-100-python.tar.gz into <root>)",
                            train_samples=50000),
    "mnist": DatasetSpec((0.1307,), (0.3081,), 10, "MNIST",
                         "<root>/MNIST/raw/ (the four uncompressed *-idx?-ubyte files)", 28, 60000),
    "fashionmnist": DatasetSpec((0.2860,), (0.3530,), 10, "FashionMNIST",
                                "<root>/FashionMNIST/raw/ (the four uncompressed *-idx?-ubyte files)", 28,
                                60000),
}
