"""`mpifed bench memory`: mpifed's predicted max batch against an OOM-driven search, same model.

What a user does without a memory model is Lightning's batch-size finder (mode "binsearch") or
Accelerate's find_executable_batch_size: try a batch, grow it until a step fails, then binary-search
between the last batch that ran and the first that failed. Every trial runs real steps, and every
failed trial is a crash the framework has to survive. mpifed instead walks the model once on meta
tensors and inverts peak(b) under the budget: no step runs, none fails.

    mpifed bench memory --model resnet18 --budget 1GiB --device cpu
    mpifed bench memory --model resnet50 --budget 8GiB --device cuda

A trial is what measured_peak runs: a fresh copy of the model and two steps (the first creates the
optimizer state; Lightning runs steps_per_trial=3). It fails on CUDA with a real OutOfMemoryError
under the per-process memory fraction that makes the budget binding; on the CPU, which has no
allocator limit to hit, with a peak (allocator accounting) above the budget. The CPU accounting
runs under torch.profiler, which slows the search's steps somewhat; the ratio is reported as
measured and is flattering to mpifed by that much.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable

import click

from mpifed.commands.memory import build, model_options, resolve_device


@dataclass(frozen=True)
class SearchResult:
    """Outcome of an OOM-driven search: the batch found, trials run, how many failed, seconds."""

    batch: int
    trials: int
    failures: int
    seconds: float
    tried: tuple[tuple[int, bool], ...]


def oom_search(fits: Callable[[int], bool], start: int = 2, limit: int = 1 << 20) -> SearchResult:
    """Double from `start` until `fits` fails, then binary-search; Lightning's binsearch mode.

    `fits(b)` runs a trial and says whether it ran. Returns the largest batch that ran (0 if even
    `start`, and then 1, failed) and the trial log. `limit` stops doubling at an absurd size.
    """
    began = time.perf_counter()
    tried: list[tuple[int, bool]] = []

    def trial(b: int) -> bool:
        ok = fits(b)
        tried.append((b, ok))
        return ok

    low, high, b = 0, None, start
    while b <= limit:
        if not trial(b):
            high = b
            break
        low, b = b, b * 2
    if high is None:
        high = limit + 1
    if low == 0 and start > 1:  # even the first try failed: look below it
        low_try = 1
        if trial(low_try):
            low = low_try
    while high - low > 1 and low > 0:
        mid = (low + high) // 2
        if trial(mid):
            low = mid
        else:
            high = mid
    failures = sum(1 for _, ok in tried if not ok)
    return SearchResult(low, len(tried), failures, time.perf_counter() - began, tuple(tried))


def trial_fits(model, shape, classes, step, device, budget_bytes: int, task=None) -> Callable[[int], bool]:
    """The trial a searching user runs: real steps at b; CUDA fails with OOM (the memory fraction
    must already be set), the CPU with an accounted peak above the budget."""
    import torch

    from mpifed.memory import measured_peak

    def fits(b: int) -> bool:
        try:
            peak = measured_peak(model, shape, classes, step, device, b, task=task)
        except torch.cuda.OutOfMemoryError:
            ok = False
        else:
            ok = device.type == "cuda" or peak.total <= budget_bytes
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        return ok

    return fits


@click.command("memory")
@model_options
@click.option("--start", type=int, default=2, show_default=True,
              help="First batch the search tries (Lightning's init_val default is 2).")
def memory(model_name, model_opts, dataset, data_opts, optimizer, budget, device_name, margin, multiple_of, start):
    """Time mpifed's max batch against an OOM-driven search (double until failure, then bisect)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from mpifed import memory as mem
    from mpifed.units import format_bytes, parse_bytes

    console = Console()
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = mem.indexed_device(device)
    model, task = build(model_name, dataset, model_opts, data_opts)
    shape, classes = task.input_shape, task.classes
    if not budget:
        raise click.UsageError("bench memory needs --budget, the emulated device memory, e.g. --budget 1GiB")
    budget_bytes = parse_bytes(budget)
    margin = mem.DEFAULT_MARGIN if margin is None else margin
    if device.type == "cuda":
        mem.enforce_budget(device, budget_bytes,
                           mem.analytic_memory_model(model, shape, classes, optimizer, device, task=task),
                           f"bench ({model_name})")

    began = time.perf_counter()
    sizing = mem.size_client(model, shape, classes, optimizer, device, budget_bytes, 1, f"bench ({model_name})",
                             margin=margin, multiple_of=multiple_of, task=task)
    ours_seconds = time.perf_counter() - began
    console.print(f"mpifed: max batch {sizing.max_batch} in {ours_seconds:.2f} s, 0 steps run, 0 failed")

    fits = trial_fits(model, shape, classes, optimizer, device, budget_bytes, task)
    ours_ran = fits(sizing.max_batch)
    over = math.ceil(1.15 * sizing.max_batch)
    over_ran = fits(over)
    console.print(f"check: batch {sizing.max_batch} {'ran' if ours_ran else 'FAILED'}; "
                  f"1.15x = {over} {'ran (prediction timid)' if over_ran else 'does not fit'}")

    console.print("OOM-driven search (double until a step fails, then binary search) ...")
    search = oom_search(fits, start=start)
    table = Table(title=f"max batch of {model_name} / {dataset} / {optimizer} on {device}, "
                        f"budget {format_bytes(budget_bytes)}")
    for col in ("method", "max batch", "trials", "failed steps", "seconds"):
        table.add_column(col, justify="right")
    table.add_row("mpifed (analytic)", str(sizing.max_batch), "0", "0", f"{ours_seconds:.2f}")
    table.add_row("OOM search", str(search.batch), str(search.trials), str(search.failures), f"{search.seconds:.2f}")
    console.print(table)
    console.print("trials: " + ", ".join(f"{b}{'' if ok else ' (failed)'}" for b, ok in search.tried))
    ratio = ours_seconds / search.seconds if search.seconds > 0 else float("nan")
    console.print(f"mpifed's time / search's time = {ratio:.3f}; mpifed's batch / search's batch = "
                  f"{sizing.max_batch / search.batch if search.batch else float('nan'):.3f} "
                  f"(margin {margin:.0%} kept free)")
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
