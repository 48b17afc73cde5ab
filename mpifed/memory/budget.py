"""Budgets: what a client may use, the largest batch under it, and making it binding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mpifed.errors import InputError
from mpifed.memory.host import host_memory
from mpifed.memory.model import DEFAULT_MARGIN, MemoryModel
from mpifed.units import format_bytes


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
    (CUDA: free memory plus what this process's allocator already holds; CPU: the host's, the smallest
    of MemAvailable, the memory cgroups' room and SLURM's allocation: mpifed.memory.host).
    A profile budget larger than a CUDA device's total memory is an error."""
    return client_budget(device, profile_bytes).bytes


@dataclass(frozen=True)
class Budget:
    """A client's memory budget and what set it, for the start-up report and the run log."""

    bytes: int
    source: str   # what bound it: "profile memory", "cuda:0 free memory", "cgroup /sys/fs/cgroup/x memory.max"
    bound: str    # the source with its numbers, as the report and /ranks/budget_bound show it


def client_budget(device: str | torch.device, profile_bytes: float = 0, ranks_on_node: int = 1) -> Budget:
    """A client's budget: its profile's memory if set (> 0); else on CUDA the device's free memory; on a
    CPU the host's available memory (mpifed.memory.host), shared evenly by the `ranks_on_node` ranks."""
    device = indexed_device(device)
    if device.type == "cuda":
        _cuda_total(device, profile_bytes, "profile memory")
    if profile_bytes > 0:
        return Budget(int(profile_bytes), "profile memory", f"profile memory {format_bytes(profile_bytes)}")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device)
        return Budget(int(free), f"{device} free memory", f"{device} free memory {format_bytes(free)}")
    host = host_memory()
    share = f", shared by {ranks_on_node} ranks" if ranks_on_node > 1 else ""
    return Budget(host.bytes // max(1, ranks_on_node), host.source, f"{host}{share}")


@dataclass(frozen=True)
class BudgetGuard:
    """Makes a budget binding. check(batch) raises MemoryBudgetError before a batch that the model
    says will not fit runs; on CUDA the allocator's memory fraction is the hard limit as well."""

    model: MemoryModel
    budget_bytes: int
    client: str

    def check(self, batch: int, client: str = "") -> None:
        """`client`: who runs the step, where one guard serves several clients (a profile's, pooled)."""
        need = self.model.peak(batch)
        if need > self.budget_bytes:
            raise MemoryBudgetError(client or self.client, self.budget_bytes, need, batch,
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
