"""Datasets, partitions among clients, and per-client batch sampling.

Every dataset is held the way torchvision holds CIFAR: `data` as uint8 (N, H, W, C) and integer
`targets`. The synthetic default is generated in that format, the real ones come from torchvision's
own dataset classes, so one code path normalizes, partitions and samples them all. A client turns
only its own partition into float tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mpifed.datasets import DATASETS, DEBIAN_FILES, DEBIAN_PACKAGES, missing_message as _missing_message  # noqa: F401
from mpifed.errors import InputError
from mpifed.learn.partition import Partition
from mpifed.learn.tasks import Task
from mpifed.seeding import Purpose, rng, torch_generator

_SYNTHETIC_DATA_SEED = 20250101  # fixed: the task stays the same when run.seed changes


class DatasetError(InputError, RuntimeError):
    """A dataset is missing or unreadable; the message says where the files go."""


@dataclass
class ImageSet:
    """uint8 images (N, H, W, C) with int64 labels, as torchvision's CIFAR classes hold them.

    pad_to: the side a model needs (VGG's five poolings need 32); smaller images are zero-padded to
    it, others are fed at their own size. One of the sample sets of mpifed.learn.samples.
    """

    data: np.ndarray
    targets: np.ndarray
    num_classes: int
    name: str
    pad_to: int = 0
    clients = None  # no natural partition

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def channels(self) -> int:
        return self.data.shape[3]

    @property
    def side(self) -> int:
        return max(self.data.shape[1], self.pad_to)

    @property
    def labels(self) -> np.ndarray:
        return self.targets

    @property
    def task(self) -> Task:
        return Task.classification((self.channels, self.side, self.side), self.num_classes)

    def images(self, indices: np.ndarray) -> np.ndarray:
        return self.data[indices]

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(data=self.data, targets=self.targets)

    def tensors(self, indices: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float32 (n, C, side, side) images and int64 labels of `indices` (all if None)."""
        if indices is None:
            indices = np.arange(len(self))
        x = torch.from_numpy(np.ascontiguousarray(self.images(indices))).permute(0, 3, 1, 2).float().div_(255)
        if x.shape[-1] < self.side:  # MNIST 28x28 -> 32x32 for a model that needs it
            pad = (self.side - x.shape[-1]) // 2
            x = F.pad(x, (pad, pad, pad, pad))
        spec = DATASETS[self.name]
        mean, std = spec.mean, spec.std
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        return x.contiguous(), torch.from_numpy(np.asarray(self.targets[indices], dtype=np.int64))


class SyntheticSet(ImageSet):
    """A learnable CIFAR-shaped task: each class is a few smooth colour patterns plus noise.

    Class prototypes are random 4x4 colour fields upsampled to 32x32 (so a CNN finds them with a
    few filters); each sample adds its own low-frequency distortion and pixel noise, so the task is
    not separable at a glance and accuracy climbs over hundreds of steps rather than one. Sample i
    comes from its own seeded stream, so a client generates only its own partition.
    """

    MODES = 3

    def __init__(self, train: bool, size: int, noise: float, classes: int = DATASETS["synthetic"].classes,
                 distort: float = 1.2):
        self.split, self.noise, self.distort = (1 if train else 2), noise, distort
        labels = rng(_SYNTHETIC_DATA_SEED, Purpose.SYNTHETIC, self.split)
        targets = labels.integers(classes, size=size)
        self.which = targets * self.MODES + labels.integers(self.MODES, size=size)
        self.protos = self._prototypes(classes)
        super().__init__(np.empty((0, 32, 32, 3), np.uint8), targets.astype(np.int64), classes, "synthetic")

    @classmethod
    def of_labels(cls, split: int, noise: float, distort: float, targets: np.ndarray, which: np.ndarray,
                  classes: int, pad_to: int = 0) -> SyntheticSet:
        """The set whose labels another rank drew (`targets`, `which`: its arrays, e.g. in a node's window)."""
        self = cls.__new__(cls)
        self.split, self.noise, self.distort, self.which = split, noise, distort, which
        self.protos = cls._prototypes(classes)
        ImageSet.__init__(self, np.empty((0, 32, 32, 3), np.uint8), targets, classes, "synthetic", pad_to)
        return self

    @classmethod
    def _prototypes(cls, classes: int) -> np.ndarray:
        protos = rng(_SYNTHETIC_DATA_SEED, Purpose.SYNTHETIC, 0).standard_normal((classes * cls.MODES, 3, 4, 4))
        return _smooth(protos.astype(np.float32))

    def images(self, indices: np.ndarray) -> np.ndarray:
        n = len(indices)
        coarse = np.empty((n, 3, 4, 4), np.float32)
        pixels = np.empty((n, 3, 32, 32), np.float32)
        for j, i in enumerate(indices):
            gen = rng(_SYNTHETIC_DATA_SEED, Purpose.SYNTHETIC, self.split, int(i) + 1)
            coarse[j] = gen.standard_normal((3, 4, 4), dtype=np.float32)
            pixels[j] = gen.standard_normal((3, 32, 32), dtype=np.float32)
        x = self.protos[self.which[indices]] + self.distort * _smooth(coarse) + self.noise * pixels
        return np.clip(128 + 40 * x, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)



def synthetic(train: bool, size: int, noise: float, classes: int = DATASETS["synthetic"].classes) -> ImageSet:
    return SyntheticSet(train, size, noise, classes)


def _smooth(coarse: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(coarse)
    return F.interpolate(t, size=(32, 32), mode="bicubic", align_corners=False).numpy()


def _torchvision_class(name: str):
    from torchvision import datasets

    return getattr(datasets, DATASETS[name].torchvision)


def _damaged_file(cls, train: bool, root: str) -> tuple[Path, str] | None:
    """The first file of the split that is there but cannot be whole, and why: torchvision reports
    one only as a bad shape or checksum, naming no file. MNIST-style IDX files are read with their
    header's sizes; CIFAR's are checked against the checksums torchvision holds for them."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import check_integrity

    if issubclass(cls, MNIST):
        for stem in _IDX_NAMES[train]:
            path = Path(root) / cls.__name__ / "raw" / stem
            try:
                read_idx(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as err:
                return path, str(err).removeprefix(f"{path.name}: ").removesuffix(" (truncated?)")
        return None
    files = [*(cls.train_list if train else cls.test_list), (cls.meta["filename"], cls.meta["md5"])]
    for file, md5 in files:
        path = Path(root) / cls.base_folder / file
        if path.is_file() and not check_integrity(str(path), md5):
            return path, f"its {path.stat().st_size} bytes do not have the checksum of the published file"
    return None


def _damaged_message(name: str, train: bool, path: Path, why: str) -> str:
    """A split whose file is there but truncated or corrupt: which file, and to delete it first, since
    data.download leaves a file that exists in place (torchvision's MNIST classes check only that it exists)."""
    return (f"{name} ({'train' if train else 'test'} split): {path} is truncated or corrupt ({why}); delete it, "
            f"then download it again (--set data.download=true) or put a whole copy in its place")


def load_dataset(name: str, train: bool, root: str = "data", download: bool = False,
                 size: int = 12000, noise: float = 2.5, pad_to: int = 0) -> ImageSet:
    """Load a split. Real datasets go through torchvision's own classes (and their file checks);
    Fashion-MNIST, when torchvision's files are not under `root`, from Debian's package files.
    `pad_to`: the image side the model needs (0: the data's own)."""
    if name == "synthetic":
        data = synthetic(train, size, noise)
        data.pad_to = pad_to
        return data
    if name in DEBIAN_FILES and not download and not _torchvision_files(name, root) and Path(DEBIAN_FILES[name]).is_dir():
        return _debian_idx(name, train, pad_to)
    cls = _torchvision_class(name)
    try:
        ds = cls(root=root, train=train, download=download)
    except Exception as err:  # RuntimeError when missing; files of the wrong format fail in the parsers
        damaged = _damaged_file(cls, train, root)
        raise DatasetError(_damaged_message(name, train, *damaged) if damaged else
                           _missing_message(name, train, root, download, err)) from None
    data = np.asarray(ds.data)
    if data.ndim == 3:  # MNIST-style (N, 28, 28)
        data = data[..., None]
    targets = np.asarray(ds.targets, dtype=np.int64)
    return ImageSet(data, targets, len(ds.classes), name, pad_to)


_IDX_NAMES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _torchvision_files(name: str, root: str) -> bool:
    raw = Path(root) / DATASETS[name].torchvision / "raw"
    return raw.is_dir() and any(raw.iterdir())


def _debian_idx(name: str, train: bool, pad_to: int, folder: str | None = None) -> ImageSet:
    folder = Path(folder or DEBIAN_FILES[name])
    images, labels = (folder / f"{stem}.gz" for stem in _IDX_NAMES[train])
    try:
        x, y = read_idx(images), read_idx(labels)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(f"{name} ({'train' if train else 'test'} split): cannot read {folder}: {err}; reinstall "
                           f"it (apt-get install --reinstall {DEBIAN_PACKAGES[name]})") from None
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"{name}: {images.name} holds {x.shape} and {labels.name} {y.shape}: not images and "
                           f"labels of one split; reinstall {DEBIAN_PACKAGES[name]}")
    return ImageSet(x[..., None], y.astype(np.int64), DATASETS[name].classes, name, pad_to)


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, as torchvision's read_sn3_pascalvincent_tensor reads it),
    gzipped or not: magic 0x0000 TT DD (TT the type, DD the number of dimensions), DD big-endian
    int32 sizes, then the values."""
    import gzip
    import zlib

    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise ValueError(f"{path.name} is not a whole gzip file ({err})") from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path.name} is not an IDX file (bad magic number)")
    dims = raw[3]
    if len(raw) < 4 + 4 * dims:
        raise ValueError(f"{path.name}: the header of {dims} sizes is cut short (truncated?)")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">i4", dims, 4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    held, want = len(raw) - 4 - 4 * dims, int(np.prod(shape)) * dtype.itemsize
    if held != want:  # checked in bytes: a cut inside a multi-byte value would fail in frombuffer
        raise ValueError(f"{path.name}: header says {shape} ({want} bytes of values) but it holds {held} bytes "
                         f"(truncated?)")
    values = np.frombuffer(raw, dtype, offset=4 + 4 * dims)
    return values.reshape(shape).astype(values.dtype.newbyteorder("="))


# --------------------------------------------------------------------------- partitions

def partition(labels: np.ndarray, weights: np.ndarray, scheme: str, seed: int,
              alpha: float = 0.5, volume_sigma: float = 1.0) -> Partition:
    """Split sample indices among len(weights) clients; reproducible from `seed`.

    weights: relative data volume of each client (its profile's `data`).
    iid: a shuffled split in proportion to weights. volume: the same, with weights further drawn
    from log-normal(volume_sigma). dirichlet: per class, shares drawn from Dirichlet(alpha) and
    scaled by weights (label skew). Every client's indices ascending, as one flat array (Partition).
    """
    gen = rng(seed, Purpose.PARTITION)
    weights = np.asarray(weights, dtype=np.float64)
    n = len(labels)
    if len(weights) > n:
        raise DatasetError(f"{len(weights)} clients but only {n} training samples; use fewer clients "
                           f"or a larger dataset (data.train_size for synthetic)")
    if scheme == "volume":
        weights = weights * gen.lognormal(0.0, volume_sigma, size=len(weights))
    if scheme in ("iid", "volume"):
        owner = np.empty(n, dtype=np.int64)
        owner[gen.permutation(n)] = np.repeat(np.arange(len(weights)), _sizes(n, weights))
        return Partition.of_owners(owner, len(weights))
    if scheme == "dirichlet":
        return _dirichlet(labels, weights, alpha, gen)
    raise ValueError(f"unknown partition scheme {scheme!r}; use iid, dirichlet or volume")


def _sizes(n: int, weights: np.ndarray) -> np.ndarray:
    """Client sizes proportional to weights (largest remainder), every client >= 1 sample."""
    shares = weights / weights.sum() * n
    sizes = np.floor(shares).astype(np.int64)
    order = np.argsort(-(shares - sizes), kind="stable")
    sizes[order[: n - sizes.sum()]] += 1
    for client in np.flatnonzero(sizes == 0):
        sizes[np.argmax(sizes)] -= 1
        sizes[client] = 1
    return sizes


def _dirichlet(labels: np.ndarray, weights: np.ndarray, alpha: float, gen: np.random.Generator) -> Partition:
    k = len(weights)
    owner = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        idx = gen.permutation(np.flatnonzero(labels == cls))
        shares = gen.dirichlet(np.full(k, alpha)) * weights
        cuts = np.floor(np.cumsum(shares / shares.sum())[:-1] * len(idx)).astype(np.int64)
        bounds = np.concatenate([[0], np.clip(cuts, 0, len(idx)), [len(idx)]])
        owner[idx] = np.repeat(np.arange(k), np.diff(np.maximum.accumulate(bounds)))
    return _fill_empty(owner, k)


def _fill_empty(owner: np.ndarray, k: int) -> Partition:
    """A client left empty by the draw takes the last (largest) sample of the largest partition, so
    every client can train; the label skew is unchanged in any way that matters. Clients in id order,
    each seen once: one emptied as a donor after its turn stays empty (only when no client has two)."""
    parts = Partition.of_owners(owner, k)
    sizes = parts.sizes.copy()
    empty = np.flatnonzero(sizes == 0)
    if not len(empty):
        return parts
    held: dict[int, list[int]] = {}  # the clients touched: their samples now, ascending
    pending, done = list(empty), 0
    while done < len(pending):
        client = int(pending[done])
        done += 1
        if sizes[client]:
            continue
        donor = int(np.argmax(sizes))
        mine = held.setdefault(donor, parts[donor].tolist())
        held[client] = [mine.pop()]
        owner[held[client][0]] = client
        sizes[donor] -= 1
        sizes[client] = 1
        if not sizes[donor] and donor > client:
            pending.insert(done + int(np.searchsorted(pending[done:], donor)), donor)
    return Partition.of_owners(owner, k)


class ClientSampler:
    """Batches drawn without replacement from a partition, epoch after epoch, reshuffled each epoch.

    The only state is `cursor` (samples drawn so far), so a checkpoint stores one integer and the
    batch size may change between rounds (the planner) without breaking reproducibility.
    """

    def __init__(self, indices: np.ndarray, seed: int, client: int, cursor: int = 0):
        self.indices, self.seed, self.client, self.cursor = indices, seed, client, cursor
        self._epoch, self._perm = -1, indices

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = rng(self.seed, Purpose.SAMPLE, self.client, epoch).permutation(len(self.indices))
        return self._perm

    def next(self, batch: int) -> np.ndarray:
        """Positions (into `indices`) of the next `batch` samples."""
        n, out = len(self.indices), []
        while batch > 0:
            epoch, offset = divmod(self.cursor, n)
            take = min(batch, n - offset)
            out.append(self._permutation(epoch)[offset: offset + take])
            self.cursor += take
            batch -= take
        return np.concatenate(out)


def augment(x: torch.Tensor, seed: int, client: int, step: int) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded image, and a horizontal flip with p=0.5."""
    gen = torch_generator(seed, Purpose.AUGMENT, client, step)
    n, size = x.shape[0], x.shape[-1]
    padded = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]: dy[i] + size, dx[i]: dx[i] + size]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out
