"""The memory model's form: peak(b) per phase of one training step, and the step it describes.

Every default a client sizes itself with lives here, so the walk, the probes and the sizing agree."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpifed.config import DEFAULT_MARGIN  # noqa: F401 - the job's memory.margin default, the sizing's too


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


def as_spec(step: str | StepSpec) -> StepSpec:
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
                  keep_grads: bool = False, loss: Callable = F.cross_entropy) -> torch.Tensor:
    """One step in the order the memory model assumes; clients should train in the same order.
    `loss(output, target)`: the task's (cross-entropy by default).

    Gradients are zeroed first (set to None unless `keep_grads`); `mark` is called at phase
    boundaries: "forward_backward", "update", "end".
    """
    mark("forward_backward")
    model.zero_grad(set_to_none=not keep_grads)
    value = loss(model(x), y)
    value.backward()
    mark("update")
    if optimizer is not None:
        optimizer.step()
    mark("end")
    return value.detach()
