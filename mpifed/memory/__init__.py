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

from mpifed.memory.analytic import analytic_memory_model, analytic_peak, library_overhead_bytes
from mpifed.memory.budget import (Budget, BudgetGuard, MemoryBudgetError, client_budget, device_budget, enforce_budget,
                                  indexed_device, max_batch)
from mpifed.memory.host import HostMemory, host_memory
from mpifed.memory.measured import measured_memory_model, measured_peak
from mpifed.memory.model import (ANALYTIC_FIT_BATCHES, CUDA_BLOCK_BYTES, DEFAULT_MARGIN, DEFAULT_PROBES, OPTIMIZERS,
                                 MemoryModel, StepPeak, StepSpec, training_step)
from mpifed.memory.sizing import ClientSizing, Verified, size_client, verify_batch
from mpifed.units import format_bytes, parse_bytes

__all__ = [
    "DEFAULT_MARGIN", "ANALYTIC_FIT_BATCHES", "DEFAULT_PROBES", "CUDA_BLOCK_BYTES", "OPTIMIZERS", "StepSpec",
    "StepPeak", "MemoryModel", "MemoryBudgetError", "BudgetGuard", "ClientSizing", "Verified", "analytic_peak",
    "analytic_memory_model", "measured_peak", "measured_memory_model", "library_overhead_bytes",
    "max_batch", "Budget", "client_budget", "HostMemory", "host_memory", "device_budget", "enforce_budget",
    "size_client", "verify_batch", "training_step",
    "indexed_device", "parse_bytes", "format_bytes",
]
