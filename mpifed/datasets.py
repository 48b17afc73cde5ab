"""The datasets mpifed trains on, in one table: the job's choices, the data layer and `mpifed memory` read it.

Torch-free, so the command line lists the datasets, and a launch finds a dataset's missing folder
(mpifed.jobcheck), without paying for a torch import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path



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


DEBIAN_FILES = {"fashionmnist": "/usr/share/datasets/fashion-mnist"}
"""Where a Debian package puts a dataset's original files (dataset-fashion-mnist: the gzipped IDX files)."""

DEBIAN_PACKAGES = {"fashionmnist": "dataset-fashion-mnist"}

# torchvision's advice names its own argument ("You can use download=True to download it"); mpifed's is a job field.
_TORCHVISION_HINT = re.compile(r"\s*[^.]*\bdownload=True\b[^.]*\.?")


def missing_message(name: str, train: bool, root: str, download: bool, err: Exception | str) -> str:
    """Why a dataset did not load (an exception, or the reason itself), where its files go, and the job
    fields (data.root, data.download) that fix it."""
    where = DATASETS[name].files.replace("<root>", str(Path(root)))
    reason = (_TORCHVISION_HINT.sub("", str(err)).strip().rstrip(".") or f"{type(err).__name__} reading the files")
    if download:
        fix = "data.download is on, so the download failed or gave bad files: check the network, or put them there"
    else:
        fix = ("set data.root to their parent directory (--set data.root=DIR), or data.download = true "
               "(--set data.download=true) to download them where the network allows")
    debian = (f" Or install Debian's package: apt-get install {DEBIAN_PACKAGES[name]} (files in "
              f"{DEBIAN_FILES[name]}, read when {where} is empty)." if name in DEBIAN_PACKAGES else "")
    return (f"{name} ({'train' if train else 'test'} split) not found or corrupt: {reason}. "
            f"The files go in {where}; {fix}.{debian}")


def files_missing(name: str, root: str, download: bool) -> str:
    """Before torch: why built-in dataset `name` certainly cannot load from `root` (its folder is missing
    or empty and nothing will fetch it), as missing_message says it; "" when it may load (whether
    its files are whole is the loader's to say)."""
    spec = DATASETS.get(name)
    if spec is None or not spec.torchvision or download:
        return ""
    folder = Path(spec.files.split(" (")[0].replace("<root>", str(Path(root))))
    if (folder.is_dir() and any(folder.iterdir())) or (name in DEBIAN_FILES and Path(DEBIAN_FILES[name]).is_dir()):
        return ""
    return missing_message(name, True, root, False, f"{folder} is {'empty' if folder.is_dir() else 'not there'}")
