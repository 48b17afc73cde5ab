"""Memory model: the largest batch a client device can hold (the paper's first component).

A training step (zero_grad, forward, cross-entropy, backward, optimizer step) peaks in one of two
phases, and each phase's peak is a line in the batch size b:

    forward/backward:  static + b * per_sample     (parameters, buffers, optimizer state, gradients,
                                                    library workspaces; activations kept for backward
                                                    and the batch itself)
    optimizer update:  update + b * update_per_sample   (parameters, gradients, optimizer state and
                                                    the update's temporaries; the batch is still alive)
    peak(b) = max of the two

The update phase matters at small batches: SGD with weight decay holds parameters, gradients,
momentum and one gradient-sized temporary, which can outweigh a few samples' activations.

Two ways to get the numbers, both kept so they can be compared:
- analytic: walk one training step on the meta device (no real allocation) under a dispatch mode
  that counts the bytes of every storage until it dies; fitted at two batch sizes. On CUDA it adds
  the memory the CUDA libraries keep (cuBLAS/cuBLASLt workspaces), measured once by a tiny step.
- measured: run real steps at a few small batches on the device and fit. Ground truth on CUDA is
  torch.cuda.max_memory_allocated; on the CPU it is the CPU allocator's own accounting, read from
  torch.profiler's memory events (every allocation and free through c10's CPU allocator, in order),
  not process RSS (which the OS and glibc round, cache and share).

Sizing: max_batch() inverts the model under a budget minus a safety margin; enforce_budget() makes
an emulated budget binding (CUDA: per-process memory fraction; CPU: the estimate is checked before
a batch runs). A client calls `size_client` once at start-up; see its docstring.

Known gap (H100, torch 2.11, cuDNN 9.19): the walk does not see cuDNN's convolution workspaces,
which are allocated inside the kernels and grow with the batch. They cost resnet18 and resnet50 at
most 7% and 2.6%, vgg11 8%, and the small CNN up to 63% at batches of 1024 and more, where cuDNN
picks workspace-hungry algorithms; see mpifed/bench/memory_cuda.py for the validation.
"""

from __future__ import annotations

import copy
import gc
import math
import weakref
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mpifed.errors import InputError
from mpifed.units import format_bytes, parse_bytes

__all__ = [
    "DEFAULT_MARGIN", "ANALYTIC_FIT_BATCHES", "DEFAULT_PROBES", "StepSpec", "StepPeak",
    "MemoryModel", "MemoryBudgetError", "BudgetGuard", "ClientSizing", "analytic_peak",
    "analytic_memory_model", "measured_peak", "measured_memory_model", "library_overhead_bytes",
    "max_batch", "device_budget", "enforce_budget", "size_client", "training_step", "parse_bytes",
    "indexed_device",
    "format_bytes",
]

DEFAULT_MARGIN = 0.05
"""Fraction of the budget kept free (default 0.05). It covers the CUDA caching allocator's
fragmentation under a memory fraction and the model's own error (the issue's target is <= 5% on
CUDA); larger margins waste memory, since 1.15x the max batch must not fit. On an H100 with an
8 GiB budget it held for resnet18 and resnet50; vgg11 and the small CNN need the cuDNN workspace
the walk does not model (module docstring)."""

ANALYTIC_FIT_BATCHES = (16, 32)
"""Batch sizes the analytic walk is fitted at (default 16 and 32). On the meta device a walk costs
the same at any batch; 16 and up keeps CPU kernels on the path they take for real batches (ATen
switches small batches to an im2col convolution with its own workspace)."""

DEFAULT_PROBES = (2, 4, 8, 16)
"""Batch sizes the measured model probes on the device (default 2, 4, 8, 16): small enough to fit
any device that can train at all, spread enough for a least-squares slope."""

CUDA_BLOCK_BYTES = 512
"""The CUDA caching allocator rounds every request up to a multiple of 512 bytes (c10 kMinBlockSize)
and max_memory_allocated counts the rounded size; the analytic walk rounds the same way."""

OPTIMIZERS = ("sgd", "adam", "none")


@dataclass(frozen=True)
class StepSpec:
    """How a client's training step holds memory, beyond the model and the batch.

    optimizer: sgd (one momentum buffer per parameter when momentum > 0), adam (two buffers), or
    none (the client only computes gradients, as FedSGD clients with E=1 do; the server steps).
    momentum, weight_decay, nesterov: defaults 0.9, 5e-4, False from OptimConfig. Weight decay
    matters: the update allocates a gradient-sized temporary for it.
    keep_grads: False (default, torch's zero_grad(set_to_none=True)) frees gradients before the
    forward pass; True when the loop zeroes them in place or they live in a flat buffer, so they
    are held through the whole step.
    The learning rate does not change memory and is fixed at 0.01.
    """

    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    keep_grads: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")

    def build(self, params, device_type: str) -> torch.optim.Optimizer | None:
        """The optimizer torch would run on `device_type`: foreach on CUDA (torch's default there),
        per-tensor loops elsewhere. Named explicitly so a meta walk follows the CUDA code path."""
        foreach = device_type == "cuda"
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.01, momentum=self.momentum, nesterov=self.nesterov,
                                   weight_decay=self.weight_decay, foreach=foreach)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=0.01, weight_decay=self.weight_decay, foreach=foreach)
        return None


def _spec(step: str | StepSpec) -> StepSpec:
    return step if isinstance(step, StepSpec) else StepSpec(optimizer=step)


@dataclass(frozen=True)
class StepPeak:
    """Peak bytes of one training step, per phase; reserved: the CUDA allocator's peak reserved
    bytes over the step (what a memory fraction limits; 0 off CUDA)."""

    forward_backward: int
    update: int
    reserved: int = 0

    @property
    def total(self) -> int:
        return max(self.forward_backward, self.update)


@dataclass(frozen=True)
class MemoryModel:
    """peak(b) = max(static + b * per_sample, update + b * update_per_sample), in bytes.

    method: "analytic" or "measured"; device: the device type it describes ("cuda", "cpu");
    fit_batches: the batch sizes it was fitted at.
    """

    static_bytes: float
    per_sample_bytes: float
    update_bytes: float
    update_per_sample_bytes: float
    method: str
    device: str
    fit_batches: tuple[int, ...]

    def peak(self, batch: int) -> int:
        """Predicted peak bytes of one training step at `batch` samples."""
        return int(math.ceil(max(self.static_bytes + batch * self.per_sample_bytes,
                                 self.update_bytes + batch * self.update_per_sample_bytes)))

    def plus_static(self, nbytes: float) -> "MemoryModel":
        """The model with `nbytes` more held through the whole step (e.g. a client's flat gradient
        buffer and compression payloads, which live outside the training step)."""
        return MemoryModel(self.static_bytes + nbytes, self.per_sample_bytes,
                           self.update_bytes + nbytes, self.update_per_sample_bytes,
                           self.method, self.device, self.fit_batches)

    def as_record(self) -> dict:
        """Plain fields for the run log's /models group."""
        return asdict(self)

    @classmethod
    def fit(cls, batches: Sequence[int], peaks: Sequence[StepPeak], method: str,
            device: str) -> "MemoryModel":
        """Least-squares lines through (batch, phase peak) for both phases."""
        if len(set(batches)) < 2:
            raise ValueError(f"a memory model needs peaks at two or more batch sizes, got {list(batches)}")
        static, per_sample = _line(batches, [p.forward_backward for p in peaks])
        update, update_per_sample = _line(batches, [p.update for p in peaks])
        return cls(static, per_sample, update, update_per_sample, method, device, tuple(batches))


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, max(slope, 0.0)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, x: torch.Tensor,
                  y: torch.Tensor, mark: Callable[[str], None] = lambda phase: None,
                  keep_grads: bool = False) -> torch.Tensor:
    """One step in the order the memory model assumes; clients should train in the same order.

    Gradients are zeroed first (set to None unless `keep_grads`); `mark` is called at phase
    boundaries: "forward_backward", "update", "end".
    """
    mark("forward_backward")
    model.zero_grad(set_to_none=not keep_grads)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    mark("update")
    if optimizer is not None:
        optimizer.step()
    mark("end")
    return loss.detach()


# ---------------------------------------------------------------- analytic: a walk on meta tensors

class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates, until the storage dies.

    A weakref callback on the storage fires when its last tensor goes, so frees are seen exactly
    when the real allocator would see them. Only storages on the meta device are counted (host-side
    scalars such as Adam's step counters do not live in device memory).
    """

    def __init__(self, granularity: int, workspace: Callable | None):
        super().__init__()
        self.granularity = granularity
        self.workspace = workspace
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()
        self.phases: dict[str, int] = {}
        self._phase: str | None = None

    def hold(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        nbytes = -(-storage.nbytes() // self.granularity) * self.granularity
        if key in self._alive or nbytes == 0:
            return
        self._alive.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def mark(self, phase: str) -> None:
        """Close the running phase (record its peak) and start `phase` from the live bytes now."""
        if self._phase is not None:
            self.phases[self._phase] = self.peak
        self._phase = None if phase == "end" else phase
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.hold(tensor)
        if self.workspace is not None:
            self.peak = max(self.peak, self.live + self.workspace(func, args))
        return out


def _cpu_conv_workspace(func, args) -> int:
    """Bytes of the im2col buffer ATen's slow CPU convolution allocates inside the kernel.

    ATen takes oneDNN for float32 CPU convolutions except small single-sample ones (ConvParams::
    use_mkldnn in aten/src/ATen/native/Convolution.cpp); the slow path unfolds the input into a
    (N, C*kh*kw, Hout*Wout) buffer in forward and again in backward. A meta walk cannot see it.
    """
    aten = torch.ops.aten
    if func is aten.convolution.default:
        x, w, _, stride, padding, dilation, transposed, _, groups = args
    elif func is aten.convolution_backward.default:
        _, x, w, _, stride, padding, dilation, transposed, _, groups, _ = args
    else:
        return 0
    if transposed or x.dim() != 4 or x.dtype != torch.float32:
        return 0
    n, c, h, wd = x.shape
    kh, kw = w.shape[-2:]
    strided = any(s != 1 for s in stride)
    dilated = any(d != 1 for d in dilation)
    mkldnn = ((strided or dilated or n >= 16 or kh != 1 or kw != 1 or torch.get_num_threads() > 1)
              and (groups > 1 or (kh > 3 and kw > 3) or n > 1 or n * c * h * wd > 20480))
    if mkldnn or (kh == kw == 1 and not strided and not any(padding)):
        return 0
    hout = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wout = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n * (c // groups) * kh * kw * hout * wout * x.element_size()


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device, without first copying its weights anywhere."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo).train()


def analytic_peak(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                  step: str | StepSpec, device: str | torch.device, batch: int,
                  overhead_bytes: int | None = None) -> StepPeak:
    """Peak bytes of a steady-state training step at `batch`, from a walk on meta tensors.

    The walk runs two steps (the first creates optimizer state) and reports the second, as a real
    loop would see it from its second step on. `overhead_bytes`: memory the device's libraries keep
    (default: library_overhead_bytes(device), 0 on the CPU). `num_classes` is checked against the
    model's output so a mismatched head fails here, not in training.
    """
    device = torch.device(device)
    spec = _spec(step)
    if overhead_bytes is None:
        overhead_bytes = library_overhead_bytes(device)
    shadow = _meta_copy(model)
    opt = spec.build(shadow.parameters(), device.type)
    x = torch.empty((batch, *input_shape), device="meta")
    y = torch.empty((batch,), dtype=torch.long, device="meta")
    tracker = _LiveBytes(CUDA_BLOCK_BYTES if device.type == "cuda" else 1,
                         _cpu_conv_workspace if device.type == "cpu" else None)
    with tracker:
        for tensor in [*shadow.parameters(), *shadow.buffers(), x, y]:
            tracker.hold(tensor)
        out_shape = shadow(x[:1]).shape
        if out_shape[-1] != num_classes:
            raise ValueError(f"the model outputs {out_shape[-1]} classes but num_classes={num_classes}; "
                             "build the model with the dataset's class count")
        training_step(shadow, opt, x, y, keep_grads=spec.keep_grads)
        training_step(shadow, opt, x, y, tracker.mark, spec.keep_grads)
    return StepPeak(tracker.phases["forward_backward"] + overhead_bytes,
                    tracker.phases["update"] + overhead_bytes)


def analytic_memory_model(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                          step: str | StepSpec = "sgd", device: str | torch.device = "cpu",
                          batches: Sequence[int] = ANALYTIC_FIT_BATCHES) -> MemoryModel:
    """The memory model from meta walks at `batches` (no device memory is touched, except on CUDA
    one tiny step that measures the libraries' workspaces)."""
    device = torch.device(device)
    overhead = library_overhead_bytes(device)
    peaks = [analytic_peak(model, input_shape, num_classes, step, device, b, overhead)
             for b in batches]
    return MemoryModel.fit(batches, peaks, "analytic", device.type)


def _clear_library_workspaces() -> None:
    # cuBLAS/cuBLASLt keep one workspace per (handle, stream), allocated through the caching
    # allocator on first use; clearing them makes "first use" repeatable within one process.
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def library_overhead_bytes(device: str | torch.device) -> int:
    """Bytes the CUDA libraries keep allocated after a training step (cuBLAS/cuBLASLt workspaces,
    one per thread that runs a GEMM: the caller's and autograd's), measured with a tiny
    conv+linear step. 0 on the CPU, whose libraries allocate nothing that outlives an op."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    device = indexed_device(device)
    torch.cuda.synchronize(device)
    _clear_library_workspaces()
    before = torch.cuda.memory_allocated(device)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10)).to(device)
    x = torch.zeros(2, 3, 8, 8, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    training_step(tiny, StepSpec().build(tiny.parameters(), "cuda"), x, y)
    del tiny, x, y
    gc.collect()
    torch.cuda.synchronize(device)
    return max(torch.cuda.memory_allocated(device) - before, 0)


# ---------------------------------------------------------------- measured: real steps on the device

def _random_batch(batch: int, input_shape: Sequence[int], num_classes: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn((batch, *input_shape), generator=generator)
    y = torch.randint(0, num_classes, (batch,), generator=generator)
    return x, y


def measured_peak(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                  step: str | StepSpec, device: str | torch.device, batch: int,
                  seed: int = 0) -> StepPeak:
    """Peak bytes of a real steady-state step at `batch` on `device` (on a copy of `model`).

    CUDA: torch.cuda.max_memory_allocated per phase, after reset_peak_memory_stats, counted from
    what was allocated before the copy (cuBLAS workspaces are cleared first so they count, as in a
    fresh client). Raises torch.cuda.OutOfMemoryError if it does not fit.
    CPU: the CPU allocator's accounting from torch.profiler memory events (see module docstring).
    """
    device = indexed_device(device) if torch.device(device).type == "cuda" else torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    if device.type == "cuda":
        return _cuda_peak(model, input_shape, num_classes, _spec(step), device, batch, generator)
    if device.type == "cpu":
        return _cpu_peak(model, input_shape, num_classes, _spec(step), batch, generator)
    raise ValueError(f"cannot measure memory on device {device}; use cpu or cuda")


def _cuda_peak(model, input_shape, num_classes, spec, device, batch, generator) -> StepPeak:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    _clear_library_workspaces()
    base = torch.cuda.memory_allocated(device)
    peaks: dict[str, int] = {"reserved": 0}
    phase: list[str] = []

    def mark(name: str) -> None:
        torch.cuda.synchronize(device)
        if phase:
            peaks[phase.pop()] = torch.cuda.max_memory_allocated(device) - base
            peaks["reserved"] = max(peaks["reserved"], torch.cuda.max_memory_reserved(device))
        torch.cuda.reset_peak_memory_stats(device)
        if name != "end":
            phase.append(name)

    probe = copy.deepcopy(model).to(device).train()
    opt = spec.build(probe.parameters(), "cuda")
    x, y = (t.to(device) for t in _random_batch(batch, input_shape, num_classes, generator))
    training_step(probe, opt, x, y, keep_grads=spec.keep_grads)
    training_step(probe, opt, x, y, mark, spec.keep_grads)
    return StepPeak(peaks["forward_backward"], peaks["update"], peaks["reserved"])


def _cpu_peak(model, input_shape, num_classes, spec, batch, generator) -> StepPeak:
    from torch.profiler import ProfilerActivity, profile, record_function

    ranges: list = []

    def mark(name: str) -> None:
        if ranges:
            ranges[-1].__exit__(None, None, None)
        if name != "end":
            ranges.append(record_function(f"mpifed.memory::{name}"))
            ranges[-1].__enter__()

    # Everything the step holds is created inside the window, so the running sum of allocations
    # minus frees is exactly the bytes live at each moment.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        probe = copy.deepcopy(model).to("cpu").train()
        opt = spec.build(probe.parameters(), "cpu")
        x, y = _random_batch(batch, input_shape, num_classes, generator)
        training_step(probe, opt, x, y, keep_grads=spec.keep_grads)
        training_step(probe, opt, x, y, mark, spec.keep_grads)
        del probe, opt, x, y
    return StepPeak(**_profiled_phase_peaks(prof, ("forward_backward", "update")))


def _profiled_phase_peaks(prof, phases: Sequence[str]) -> dict[str, int]:
    events = prof.profiler.kineto_results.events()
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    windows = {e.name().split("::", 1)[1]: (e.start_ns(), e.end_ns())
               for e in events if e.name().startswith("mpifed.memory::")}
    missing = [p for p in phases if p not in windows]
    if missing:
        raise RuntimeError(f"the profiler recorded no {missing} range; CPU memory accounting failed")
    peaks = {p: 0 for p in phases}
    live = 0
    for when, nbytes in memory:
        live += nbytes
        for name in phases:
            start, end = windows[name]
            if start <= when <= end:
                peaks[name] = max(peaks[name], live)
    # A phase opens with what the previous one left live; count that even if no event falls inside.
    for name in phases:
        start = windows[name][0]
        before = sum(n for when, n in memory if when < start)
        peaks[name] = max(peaks[name], before)
    return peaks


def measured_memory_model(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                          step: str | StepSpec = "sgd", device: str | torch.device = "cpu",
                          probes: Sequence[int] = DEFAULT_PROBES, seed: int = 0) -> MemoryModel:
    """The memory model fitted (least squares) to real steps at the `probes` batch sizes."""
    device = torch.device(device)
    peaks = [measured_peak(model, input_shape, num_classes, step, device, b, seed) for b in probes]
    return MemoryModel.fit(probes, peaks, "measured", device.type)


# ---------------------------------------------------------------- budgets and sizing

class MemoryBudgetError(InputError, ValueError):
    """A client's memory budget cannot hold the batch it must train with."""

    def __init__(self, client: str, budget: int, need: int, batch: int, detail: str = ""):
        self.client, self.budget, self.need, self.batch = client, budget, need, batch
        super().__init__(
            f"{client}: memory budget {format_bytes(budget)} ({budget} bytes) cannot hold batch {batch}: "
            f"it needs {format_bytes(need)} ({need} bytes){detail}. Give this client a larger "
            f"profile memory or a smaller batch, model or optimizer state.")


def max_batch(model_memory: MemoryModel, budget_bytes: int, margin: float = DEFAULT_MARGIN,
              multiple_of: int = 1, client: str = "this device") -> int:
    """Largest batch b (a multiple of `multiple_of`) with peak(b) <= budget * (1 - margin).

    margin: fraction of the budget kept free (default DEFAULT_MARGIN). multiple_of: round down to
    a multiple (e.g. 8 for tensor cores; default 1). Raises MemoryBudgetError naming `client`
    when not even batch `multiple_of` fits.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin={margin}: must be in [0, 1), the fraction of the budget kept free")
    if multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of}: must be a positive batch granularity")
    usable = budget_bytes * (1 - margin)
    m = model_memory

    def limit(fixed: float, per_sample: float) -> float:
        if per_sample > 0:
            return (usable - fixed) / per_sample
        return math.inf if fixed <= usable else -1.0  # a flat phase fits at any batch, or at none

    best = min(limit(m.static_bytes, m.per_sample_bytes), limit(m.update_bytes, m.update_per_sample_bytes))
    batch = int(best) if math.isfinite(best) else 1 << 30
    while batch > 0 and m.peak(batch) > usable:  # float rounding at the boundary
        batch -= 1
    batch -= batch % multiple_of
    if batch < 1:
        need = m.peak(multiple_of)
        raise MemoryBudgetError(client, int(budget_bytes), int(math.ceil(need / (1 - margin))),
                                multiple_of, f" with a {margin:.0%} safety margin "
                                f"({format_bytes(need)} for the step itself)")
    return batch


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ValueError("cannot read the free host memory (/proc/meminfo); give this client a profile "
                     "memory budget, e.g. memory = '4GiB'")


def indexed_device(device: str | torch.device) -> torch.device:
    """torch.device with an index on CUDA ('cuda' -> the current device), as the CUDA memory APIs need."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cuda_total(device: torch.device, nbytes: float, what: str) -> int:
    """The device's total memory; a budget above it is an error naming `what`."""
    total = torch.cuda.get_device_properties(device).total_memory
    if nbytes > total:
        raise ValueError(f"{what} {format_bytes(nbytes)} exceeds {device}'s {format_bytes(total)}; lower it")
    return total


def device_budget(device: str | torch.device, profile_bytes: float = 0) -> int:
    """Bytes a client may use: its profile budget if set (> 0), else what the device has free
    (CUDA: free memory plus what this process's allocator already holds; CPU: MemAvailable).
    A profile budget larger than a CUDA device's total memory is an error."""
    device = indexed_device(device)
    if device.type == "cuda":
        _cuda_total(device, profile_bytes, "profile memory")
        if profile_bytes > 0:
            return int(profile_bytes)
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    return int(profile_bytes) if profile_bytes > 0 else _meminfo_available()


@dataclass(frozen=True)
class BudgetGuard:
    """Makes a budget binding. check(batch) raises MemoryBudgetError before a batch that the model
    says will not fit runs; on CUDA the allocator's memory fraction is the hard limit as well."""

    model: MemoryModel
    budget_bytes: int
    client: str

    def check(self, batch: int) -> None:
        need = self.model.peak(batch)
        if need > self.budget_bytes:
            raise MemoryBudgetError(self.client, self.budget_bytes, need, batch,
                                    " (emulated budget enforced before the step runs)")


def enforce_budget(device: str | torch.device, budget_bytes: int, model_memory: MemoryModel,
                   client: str) -> BudgetGuard:
    """Bind `budget_bytes` on `device`: on CUDA set the per-process memory fraction (the caching
    allocator then raises OutOfMemoryError past the budget, as a smaller device would); on every
    device return a guard whose check(batch) runs before each step."""
    device = indexed_device(device)
    if device.type == "cuda":
        total = _cuda_total(device, budget_bytes, f"{client}: budget")
        torch.cuda.set_per_process_memory_fraction(budget_bytes / total, device)
    return BudgetGuard(model_memory, int(budget_bytes), client)


@dataclass(frozen=True)
class ClientSizing:
    """What start-up sizing decided for one client (a row of the run log's /ranks table)."""

    client: str
    budget_bytes: int
    max_batch: int
    requested_batch: int
    batch: int
    model: MemoryModel
    message: str  # empty when the requested batch fits


@dataclass(frozen=True)
class Verified:
    """The outcome of `verify_batch`: the batch whose real step ran, and what it took."""

    batch: int
    peak: int                 # measured peak bytes of that step
    failed: tuple[int, ...]   # batches that ran out of memory before it


def verify_batch(run_step: Callable[[int], int], batch: int, client: str, budget_bytes: int,
                 model_memory: MemoryModel, shrink: float = 0.9) -> Verified:
    """One real training step at `batch` before the first round; on out-of-memory, retry at
    `shrink` x the batch until a step runs. run_step(b) returns the step's measured peak bytes.

    Why: the analytic walk sees what PyTorch allocates for the model, not the workspaces a library
    picks at run time (cuDNN's convolution algorithms grow with the batch), so on CUDA a predicted
    batch is confirmed on the device before the job relies on it, and the measured peak is logged
    beside the prediction. Costs one step when the prediction holds."""
    failed: list[int] = []
    while batch >= 1:
        try:
            return Verified(batch, int(run_step(batch)), tuple(failed))
        except torch.cuda.OutOfMemoryError:
            failed.append(batch)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch = min(batch - 1, int(batch * shrink))
    raise MemoryBudgetError(client, int(budget_bytes), model_memory.peak(1), 1,
                            f"; a real step ran out of device memory at every batch tried "
                            f"({', '.join(map(str, failed))})")


def size_client(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                step: str | StepSpec, device: str | torch.device, budget_bytes: int,
                requested_batch: int, client: str, strict: bool = False,
                margin: float = DEFAULT_MARGIN, multiple_of: int = 1,
                extra_static_bytes: int = 0) -> ClientSizing:
    """Start-up self-sizing: analytic model, max batch under the budget, batch capped by it.

    strict: refuse (MemoryBudgetError) instead of capping when the requested batch does not fit.
    extra_static_bytes: memory the client holds outside the step (flat gradient buffers, codecs).
    """
    device = torch.device(device)
    memory = analytic_memory_model(model, input_shape, num_classes, step, device)
    memory = memory.plus_static(extra_static_bytes)
    largest = max_batch(memory, budget_bytes, margin, multiple_of, client)
    # The line is fitted at batches >= 16; below them a step can peak a few percent above it (late
    # backward, when gradients have grown and activations are not yet freed), so an exact walk
    # confirms the answer and steps down while it does not fit.
    overhead = library_overhead_bytes(device)
    usable = budget_bytes * (1 - margin)
    while largest > 0:
        need = analytic_peak(model, input_shape, num_classes, step, device, largest, overhead).total
        excess = need + extra_static_bytes - usable
        if excess <= 0:
            break
        # step down by as many samples as the excess is worth, so a large batch takes one or two walks
        samples = math.ceil(excess / max(memory.per_sample_bytes, 1.0))
        largest -= max(multiple_of, math.ceil(samples / multiple_of) * multiple_of)
    if largest < 1:
        raise MemoryBudgetError(client, int(budget_bytes), memory.peak(multiple_of), multiple_of,
                                f" with a {margin:.0%} safety margin")
    if requested_batch <= largest:
        return ClientSizing(client, int(budget_bytes), largest, requested_batch, requested_batch, memory, "")
    need = memory.peak(requested_batch)
    if strict:
        raise MemoryBudgetError(client, int(budget_bytes), need, requested_batch,
                                f"; the largest batch that fits is {largest}")
    message = (f"{client}: batch {requested_batch} needs {format_bytes(need)} but the budget is "
               f"{format_bytes(budget_bytes)} (max batch {largest} with a {margin:.0%} margin); "
               f"capped to {largest}")
    return ClientSizing(client, int(budget_bytes), largest, requested_batch, largest, memory, message)
