"""Measured peaks: real steps on the device, read from the allocator's own accounting."""

from __future__ import annotations

import copy
import gc
import os
from typing import Sequence

import torch
from torch import nn

from mpifed.learn.tasks import Task, as_task
from mpifed.memory.analytic import clear_library_workspaces
from mpifed.memory.budget import indexed_device
from mpifed.memory.model import DEFAULT_PROBES, MemoryModel, StepPeak, StepSpec, as_spec, training_step


def measured_peak(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                  step: str | StepSpec, device: str | torch.device, batch: int,
                  seed: int = 0, task: Task | None = None) -> StepPeak:
    """Peak bytes of a real steady-state step at `batch` on `device` (on a copy of `model`).

    CUDA: torch.cuda.max_memory_allocated per phase, after reset_peak_memory_stats, counted from
    what was allocated before the copy (cuBLAS workspaces are cleared first so they count, as in a
    fresh client). Raises torch.cuda.OutOfMemoryError if it does not fit.
    CPU: the CPU allocator's accounting from torch.profiler memory events (see mpifed.memory).
    """
    device = indexed_device(device) if torch.device(device).type == "cuda" else torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    task = as_task(task, input_shape, num_classes)
    if device.type == "cuda":
        return _cuda_peak(model, task, as_spec(step), device, batch, generator)
    if device.type == "cpu":
        return _cpu_peak(model, task, as_spec(step), batch, generator)
    raise ValueError(f"cannot measure memory on device {device}; use cpu or cuda")


def _cuda_peak(model, task, spec, device, batch, generator) -> StepPeak:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    clear_library_workspaces()
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
    x, y = task.example(batch, device, generator)
    training_step(probe, opt, x, y, keep_grads=spec.keep_grads, loss=task.loss)
    training_step(probe, opt, x, y, mark, spec.keep_grads, loss=task.loss)
    return StepPeak(peaks["forward_backward"], peaks["update"], peaks["reserved"])


def _cpu_peak(model, task, spec, batch, generator) -> StepPeak:
    from torch.profiler import ProfilerActivity, profile, record_function

    # Kineto (the profiler's backend) prints a stage line per window to stderr, which says nothing to a
    # user; read before its first window, so the user's own setting still wins. A failed recording
    # still shows: its ranges are missing and _profiled_phase_peaks says so.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
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
        x, y = task.example(batch, "cpu", generator)
        training_step(probe, opt, x, y, keep_grads=spec.keep_grads, loss=task.loss)
        training_step(probe, opt, x, y, mark, spec.keep_grads, loss=task.loss)
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
                          probes: Sequence[int] = DEFAULT_PROBES, seed: int = 0,
                          task: Task | None = None) -> MemoryModel:
    """The memory model fitted (least squares) to real steps at the `probes` batch sizes."""
    device = torch.device(device)
    peaks = [measured_peak(model, input_shape, num_classes, step, device, b, seed, task) for b in probes]
    return MemoryModel.fit(probes, peaks, "measured", device.type)
