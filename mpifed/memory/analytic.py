"""Analytic peaks: one training step walked on meta tensors, every storage counted until it dies."""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mpifed.learn.tasks import Task, as_task
from mpifed.memory.budget import indexed_device
from mpifed.memory.model import (ANALYTIC_FIT_BATCHES, CUDA_BLOCK_BYTES, MemoryModel, StepPeak, StepSpec,
                                 as_spec, training_step)


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
                  overhead_bytes: int | None = None, task: Task | None = None) -> StepPeak:
    """Peak bytes of a steady-state training step at `batch`, from a walk on meta tensors.

    The walk runs two steps (the first creates optimizer state) and reports the second, as a real
    loop would see it from its second step on. `overhead_bytes`: memory the device's libraries keep
    (default: library_overhead_bytes(device), 0 on the CPU). `num_classes` is checked against the
    model's output so a mismatched head fails here, not in training. `task` (mpifed.learn.tasks): inputs,
    targets and loss of another task than classification of float inputs (token ids, a user's loss).
    """
    task = as_task(task, input_shape, num_classes)
    device = torch.device(device)
    spec = as_spec(step)
    if overhead_bytes is None:
        overhead_bytes = library_overhead_bytes(device)
    shadow = _meta_copy(model)
    opt = spec.build(shadow.parameters(), device.type)
    x, y = task.example(batch, "meta")
    tracker = _LiveBytes(CUDA_BLOCK_BYTES if device.type == "cuda" else 1,
                         _cpu_conv_workspace if device.type == "cpu" else None)
    with tracker:
        for tensor in [*shadow.parameters(), *shadow.buffers(), x, y]:
            tracker.hold(tensor)
        problem = task.output_problem(tuple(shadow(x[:1]).shape))
        if problem:
            raise ValueError(problem)
        training_step(shadow, opt, x, y, keep_grads=spec.keep_grads, loss=task.loss)
        training_step(shadow, opt, x, y, tracker.mark, spec.keep_grads, loss=task.loss)
    return StepPeak(tracker.phases["forward_backward"] + overhead_bytes,
                    tracker.phases["update"] + overhead_bytes)


def analytic_memory_model(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                          step: str | StepSpec = "sgd", device: str | torch.device = "cpu",
                          batches: Sequence[int] = ANALYTIC_FIT_BATCHES, task: Task | None = None) -> MemoryModel:
    """The memory model from meta walks at `batches` (no device memory is touched, except on CUDA
    one tiny step that measures the libraries' workspaces)."""
    device = torch.device(device)
    overhead = library_overhead_bytes(device)
    peaks = [analytic_peak(model, input_shape, num_classes, step, device, b, overhead, task)
             for b in batches]
    return MemoryModel.fit(batches, peaks, "analytic", device.type)


def clear_library_workspaces() -> None:
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
    clear_library_workspaces()
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
