import pickle

import numpy as np
import pytest
import torch

from conftest import write_mnist
from mpifed.data import (ClientSampler, DatasetError, ImageSet, _missing_message, _torchvision_class, augment,
                         load_dataset, partition, synthetic)
from mpifed.datasets import DATASETS


def test_synthetic_is_deterministic_and_subsets_match_the_whole():
    a, b = synthetic(True, 300, 2.5), synthetic(True, 300, 2.5)
    xa, ya = a.tensors()
    xb, yb = b.tensors(np.array([7, 3, 250]))
    assert torch.equal(xa[[7, 3, 250]], xb) and torch.equal(ya[[7, 3, 250]], yb)
    assert xa.shape == (300, 3, 32, 32) and a.num_classes == 10
    assert not torch.equal(xa[:50], synthetic(False, 300, 2.5).tensors()[0][:50])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "volume"])
def test_partitions_cover_disjointly_and_reproduce_from_the_seed(scheme):
    labels = synthetic(True, 2000, 2.5).targets
    parts = partition(labels, np.ones(5), scheme, seed=3)
    allidx = np.concatenate(parts)
    assert len(allidx) == 2000 and len(np.unique(allidx)) == 2000
    assert all(len(p) >= 1 for p in parts)
    again = partition(labels, np.ones(5), scheme, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    other = partition(labels, np.ones(5), scheme, seed=4)
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other))


def test_partition_volumes_follow_weights_and_dirichlet_skews_labels():
    labels = synthetic(True, 3000, 2.5).targets
    sizes = [len(p) for p in partition(labels, np.array([1.0, 2.0, 3.0]), "iid", 0)]
    assert sizes == [500, 1000, 1500]
    skewed = partition(labels, np.ones(4), "dirichlet", 0, alpha=0.1)
    shares = [np.bincount(labels[p], minlength=10) / len(p) for p in skewed]
    assert max(s.max() for s in shares) > 0.4  # iid would give ~0.1 per class


def test_sampler_walks_epochs_without_replacement_and_resumes_from_its_cursor():
    part = np.arange(100, 110)
    s = ClientSampler(part, seed=1, client=2)
    first = np.concatenate([s.next(4) for _ in range(5)])  # 20 draws = 2 epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    resumed = ClientSampler(part, seed=1, client=2, cursor=8)
    assert np.array_equal(resumed.next(6), first[8:14])


def test_augment_is_seeded_and_keeps_shape():
    x = torch.randn(6, 3, 32, 32)
    a, b = augment(x, 0, 1, 5), augment(x, 0, 1, 5)
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, augment(x, 0, 1, 6))


def _write_cifar10(root, n=20):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    gen = np.random.default_rng(0)

    def batch(name):
        data = gen.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = gen.integers(0, 10, size=n).tolist()
        with open(base / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
        return data, labels

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    batch("test_batch")
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return train


def test_cifar10_loads_through_torchvision_from_files_in_the_real_format(tmp_path, monkeypatch):
    import os

    from torchvision.datasets import cifar

    train = _write_cifar10(tmp_path)
    # Our small files have the real layout but not the published md5s: check existence only.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    ds = load_dataset("cifar10", train=True, root=str(tmp_path))
    assert len(ds) == 100 and ds.num_classes == 10 and ds.data.shape == (100, 32, 32, 3)
    first = train[0][0][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(ds.data[0], first) and ds.targets[0] == train[0][1][0]
    x, y = ds.tensors(np.array([0, 1]))
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.int64


def test_mnist_loads_from_idx_files_at_its_own_size_and_is_padded_for_a_model_that_needs_32(tmp_path):
    images = write_mnist(tmp_path, train=12, test=5)
    ds = load_dataset("mnist", train=False, root=str(tmp_path))
    assert len(ds) == 5 and ds.channels == 1
    assert np.array_equal(ds.data[..., 0], images)
    x, _ = ds.tensors()
    assert x.shape == (5, 1, 28, 28) and ds.task.input_shape == (1, 28, 28)
    padded = load_dataset("mnist", train=False, root=str(tmp_path), pad_to=32)
    x32, _ = padded.tensors()
    assert x32.shape == (5, 1, 32, 32) and torch.equal(x32[:, :, 2:30, 2:30], x)


def test_missing_dataset_says_where_the_files_go(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py.*data.download = true") as info:
        load_dataset("cifar10", train=True, root=str(tmp_path))
    message = str(info.value)
    # mpifed's own options, not torchvision's keyword argument ("You can use download=True ...")
    assert "--set data.download=true" in message and "--set data.root=DIR" in message
    assert "download=True" not in message and str(tmp_path / "cifar-10-batches-py") in message
    # with data.download already on, the download itself failed: say so instead of suggesting it
    failed = _missing_message("cifar10", True, str(tmp_path), True, OSError("<urlopen error timed out>"))
    assert "data.download is on" in failed and "--set data.download" not in failed and "timed out" in failed


def test_dataset_files_in_the_wrong_format_say_which_and_where(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (raw / f"{split}-{kind}-ubyte").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=rf"mnist \(test split\): {raw}/t10k-images-idx3-ubyte is truncated or "
                                           rf"corrupt \(.*bad magic number\)\); delete it"):
        load_dataset("mnist", train=False, root=str(tmp_path))


@pytest.mark.parametrize("download", [False, True])
def test_a_truncated_idx_file_is_named_with_what_to_do(tmp_path, download):
    """torchvision said only "shape '[12, 28, 28]' is invalid for input of size 9308", and mpifed then
    suggested data.download, which leaves a file that exists in place (on too: torchvision finds it)."""
    write_mnist(tmp_path, train=12, test=5)
    cut = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    cut.write_bytes(cut.read_bytes()[:-3])
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", train=True, root=str(tmp_path), download=download)
    assert str(info.value) == (f"mnist (train split): {cut} is truncated or corrupt (header says (12,) (12 bytes of "
                               f"values) but it holds 9 bytes); delete it, then download it again (--set "
                               f"data.download=true) or put a whole copy in its place")
    assert len(load_dataset("mnist", train=False, root=str(tmp_path))) == 5  # the other split's files are whole


def test_a_truncated_cifar_file_is_named_with_what_to_do(tmp_path, monkeypatch):
    """torchvision checks CIFAR's files against its checksums and says only "not found or corrupted"."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    _write_cifar10(tmp_path)
    base = tmp_path / CIFAR10.base_folder
    published = lambda name: calculate_md5(str(base / name))  # noqa: E731 - our files stand for the published ones
    for split in ("train_list", "test_list"):
        monkeypatch.setattr(CIFAR10, split, [[name, published(name)] for name, _ in getattr(CIFAR10, split)])
    monkeypatch.setattr(CIFAR10, "meta", dict(CIFAR10.meta, md5=published("batches.meta")))
    assert len(load_dataset("cifar10", train=True, root=str(tmp_path))) == 100
    cut = base / "data_batch_3"
    cut.write_bytes(cut.read_bytes()[:1000])
    with pytest.raises(DatasetError, match=rf"^cifar10 \(train split\): {cut} is truncated or corrupt \(its 1000 "
                                           rf"bytes do not have the checksum of the published file\); delete it, then "
                                           rf"download it again \(--set data.download=true\) or put a whole copy"):
        load_dataset("cifar10", train=True, root=str(tmp_path))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_table_matches_what_the_data_layer_feeds(name):
    """`mpifed memory` sizes models with the table's input shape and class count: the data layer must agree."""
    spec = DATASETS[name]
    assert len(spec.std) == spec.channels
    if name == "synthetic":
        ds = synthetic(True, 4, 2.5)
        assert ds.num_classes == spec.classes
    else:
        ds = ImageSet(np.zeros((4, spec.side, spec.side, spec.channels), np.uint8), np.zeros(4, np.int64),
                      spec.classes, name)
        assert _torchvision_class(name).__name__ == spec.torchvision and "<root>" in spec.files
    x, _ = ds.tensors()
    assert x.shape == (4, *spec.input_shape)
