"""What the built-in synthetic data takes in memory on a node, checked before any of it is allocated.

data.train_size and data.test_size are the only job fields that size a dataset, and numpy answers a
size the node cannot hold with a MemoryError deep inside generation (or, in the node's shared window,
the OOM killer). Rank 0 checks the bytes against what the host has left for the job (the memory
model's own measure, mpifed.memory.host: MemAvailable, memory cgroups, SLURM) and refuses with one line
that names the field. The count is a lower bound, so a job that fits is never refused: a client's own
copy of its samples and its training step are the memory model's to size.
"""

from __future__ import annotations

from mpifed.data import DatasetError
from mpifed.memory.host import HostMemory, host_memory
from mpifed.units import format_bytes

LABEL_BYTES = 16            # a sample's label and its class mode (int64 each), on every rank of the node
SHARED_IMAGE_BYTES = 3 * 32 * 32 + 8    # a training image (uint8) and label in the node's shared copy
EVAL_BYTES = 3 * 32 * 32 * 4 + 8        # an evaluated test sample as the server holds it (float32, label)


def synthetic_bytes(train_size: int, test_size: int, evaluated: int, ranks_on_node: int, node_copy: bool) -> int:
    """At least what the synthetic data takes on rank 0's node: every rank's labels of both splits, the
    node's shared copy of the training images (data.share = "node" with several ranks on the node) and
    the server's `evaluated` test samples as tensors."""
    per_train = ranks_on_node * LABEL_BYTES + (SHARED_IMAGE_BYTES if node_copy else 0)
    return train_size * per_train + test_size * ranks_on_node * LABEL_BYTES + evaluated * EVAL_BYTES


def check_data_memory(job, ranks_on_node: int, available: HostMemory | None = None) -> None:
    """Refuse (DatasetError) synthetic data sizes whose arrays would not fit in the node's free memory."""
    d = job.data
    if d.dataset != "synthetic":
        return
    node_copy = d.share == "node" and ranks_on_node > 1
    evaluated = min(d.eval_size or d.test_size, d.test_size)
    need = synthetic_bytes(d.train_size, d.test_size, evaluated, ranks_on_node, node_copy)
    available = available or host_memory()
    if need <= available.bytes:
        return
    rest = synthetic_bytes(0, d.test_size, evaluated, ranks_on_node, node_copy)
    largest = (available.bytes - rest) // synthetic_bytes(1, 0, 0, ranks_on_node, node_copy)
    fix = (f"lower data.train_size to at most {largest:,}" if largest >= 1 else
           f"lower data.test_size (or data.eval_size), which alone take {format_bytes(rest)}")
    raise DatasetError(
        f"data.train_size = {d.train_size:,} and data.test_size = {d.test_size:,}: the synthetic data needs at "
        f"least {format_bytes(need)} ({need:,} bytes) on this node ({ranks_on_node} rank"
        f"{'s' if ranks_on_node > 1 else ''}), but {format_bytes(available.bytes)} ({available.bytes:,} bytes) is "
        f"available, bound by {available}; {fix}, or run on a node with more memory")
