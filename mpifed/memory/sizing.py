"""Start-up self-sizing of a client: its max batch, its batch, and on CUDA one step that confirms it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from mpifed.learn.tasks import Task
from mpifed.memory.analytic import analytic_memory_model, analytic_peak, library_overhead_bytes
from mpifed.memory.budget import MemoryBudgetError, max_batch
from mpifed.memory.measured import measured_memory_model
from mpifed.memory.model import DEFAULT_MARGIN, MemoryModel, StepSpec
from mpifed.units import format_bytes


@dataclass(frozen=True)
class ClientSizing:
    """What start-up sizing decided for one client: its max batch, the batch it trains with, the model
    behind them, and the warning when the requested batch was capped."""

    max_batch: int
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


def walk_sees(model: nn.Module) -> bool:
    """Whether the analytic walk sees a step of `model` as the device runs it. Recurrent layers run as
    one fused kernel (oneDNN on the CPU, cuDNN on CUDA) with workspaces of their own, while the meta
    walk decomposes them into per-step ops: measured, LEAF's LSTM needs 2.2x what its walk counts."""
    return not any(isinstance(m, nn.RNNBase) for m in model.modules())


def size_client(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                step: str | StepSpec, device: str | torch.device, budget_bytes: int,
                requested_batch: int, client: str, strict: bool = False,
                margin: float = DEFAULT_MARGIN, multiple_of: int = 1,
                extra_static_bytes: int = 0, task: Task | None = None) -> ClientSizing:
    """Start-up self-sizing: analytic model (measured steps where the walk cannot see: `walk_sees`, or a
    model the meta device cannot run), max batch under the budget, batch capped by it.

    strict: refuse (MemoryBudgetError) instead of capping when the requested batch does not fit.
    extra_static_bytes: memory the client holds outside the step (flat gradient buffers, codecs).
    task: the data's task (mpifed.learn.tasks), when not classification of float inputs.
    """
    device = torch.device(device)
    try:
        if not walk_sees(model):
            raise NotImplementedError
        memory = analytic_memory_model(model, input_shape, num_classes, step, device, task=task)
    except (NotImplementedError, RuntimeError):  # the meta walk cannot run (or see) this model: measure
        memory = measured_memory_model(model, input_shape, num_classes, step, device, task=task)
        largest = max_batch(memory.plus_static(extra_static_bytes), budget_bytes, margin, multiple_of, client)
        return _capped(memory.plus_static(extra_static_bytes), largest, requested_batch, budget_bytes, client,
                       strict, margin)
    memory = memory.plus_static(extra_static_bytes)
    largest = max_batch(memory, budget_bytes, margin, multiple_of, client)
    # The line is fitted at two batches (ANALYTIC_FIT_BATCHES), and a step's peak is not exactly linear
    # in the batch: below them it can peak a few percent above the line (late backward, gradients grown
    # and activations not yet freed), and at large batches some buffers grow faster than the batch
    # (resnet18 in 8 GiB: the line allows 1797, whose walk needs 6% more than the budget). So an exact
    # walk at the answer confirms it and steps down while it does not fit.
    overhead = library_overhead_bytes(device)
    usable = budget_bytes * (1 - margin)
    while largest > 0:
        need = analytic_peak(model, input_shape, num_classes, step, device, largest, overhead, task).total
        excess = need + extra_static_bytes - usable
        if excess <= 0:
            break
        # step down by as many samples as the excess is worth, so a large batch takes one or two walks
        samples = math.ceil(excess / max(memory.per_sample_bytes, 1.0))
        largest -= max(multiple_of, math.ceil(samples / multiple_of) * multiple_of)
    if largest < 1:
        raise MemoryBudgetError(client, int(budget_bytes), memory.peak(multiple_of), multiple_of,
                                f" with a {margin:.0%} safety margin")
    return _capped(memory, largest, requested_batch, budget_bytes, client, strict, margin)


def _capped(memory: MemoryModel, largest: int, requested_batch: int, budget_bytes: int, client: str,
            strict: bool, margin: float) -> ClientSizing:
    """The requested batch, or the largest that fits (refused instead when strict)."""
    if requested_batch <= largest:
        return ClientSizing(largest, requested_batch, memory, "")
    need = memory.peak(requested_batch)
    if strict:
        raise MemoryBudgetError(client, int(budget_bytes), need, requested_batch,
                                f"; the largest batch that fits is {largest}")
    message = (f"{client}: batch {requested_batch} needs {format_bytes(need)} but the budget is "
               f"{format_bytes(budget_bytes)} (max batch {largest} with a {margin:.0%} margin); "
               f"capped to {largest}")
    return ClientSizing(largest, largest, memory, message)
