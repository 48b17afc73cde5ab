"""Synthetic data sizes are checked against the node's free memory before anything is allocated."""

from __future__ import annotations

import re

import pytest

from mpifed.config import load_job
from mpifed.data import DatasetError
from mpifed.learn.datamemory import EVAL_BYTES, LABEL_BYTES, SHARED_IMAGE_BYTES, check_data_memory, synthetic_bytes
from mpifed.learn.loading import check_learning, forget_data
from mpifed.memory.host import HostMemory

GiB = 2**30
ONE_GIB = HostMemory(GiB, "cgroup /sys/fs/cgroup/job memory.max", "1.00 GiB, 0 B in use")


def job(*overrides: str):
    return load_job(overrides=list(overrides))


def refusal(loaded, ranks: int, available: HostMemory = ONE_GIB) -> str:
    with pytest.raises(DatasetError) as info:
        check_data_memory(loaded, ranks, available)
    return str(info.value)


def test_the_count_holds_every_ranks_labels_the_nodes_images_and_the_servers_test_tensors():
    assert synthetic_bytes(100, 10, 10, 3, node_copy=True) == 100 * (3 * LABEL_BYTES + SHARED_IMAGE_BYTES) \
        + 10 * 3 * LABEL_BYTES + 10 * EVAL_BYTES
    assert synthetic_bytes(100, 10, 4, 3, node_copy=False) == 110 * 3 * LABEL_BYTES + 4 * EVAL_BYTES
    assert SHARED_IMAGE_BYTES == 32 * 32 * 3 + 8 and EVAL_BYTES == 4 * 3 * 32 * 32 + 8


def test_the_default_job_fits_in_a_gibibyte():
    check_data_memory(job(), 16, ONE_GIB)


def test_a_huge_train_size_is_refused_naming_the_field_the_bytes_and_the_largest_that_fits():
    loaded = job("data.train_size=10000000000")
    message = refusal(loaded, 3)
    need = synthetic_bytes(10**10, 2000, 2000, 3, node_copy=True)
    assert message.startswith("data.train_size = 10,000,000,000 and data.test_size = 2,000: the synthetic data")
    assert f"({need:,} bytes) on this node (3 ranks)" in message
    assert f"({GiB:,} bytes) is available, bound by cgroup /sys/fs/cgroup/job memory.max (1.00 GiB" in message
    largest = int(re.search(r"lower data.train_size to at most ([\d,]+), or run", message)[1].replace(",", ""))
    assert synthetic_bytes(largest, 2000, 2000, 3, True) <= GiB < synthetic_bytes(largest + 1, 2000, 2000, 3, True)
    check_data_memory(job(f"data.train_size={largest}"), 3, ONE_GIB)  # the advice is taken: it fits


def test_a_huge_test_size_is_refused_pointing_at_the_test_split():
    message = refusal(job("data.test_size=1000000000"), 2)
    assert "data.test_size = 1,000,000,000" in message and "lower data.test_size (or data.eval_size)" in message


def test_the_shared_image_copy_counts_only_where_the_node_holds_one():
    size = GiB // (LABEL_BYTES + SHARED_IMAGE_BYTES)  # fits one rank's labels, not the node's images too
    check_data_memory(job(f"data.train_size={size}", "data.test_size=1"), 1, ONE_GIB)  # one rank: no window
    refusal(job(f"data.train_size={size}", "data.test_size=1"), 2)
    check_data_memory(job(f"data.train_size={size}", "data.test_size=1", 'data.share="rank"'), 2, ONE_GIB)


def test_a_dataset_not_sized_by_the_job_is_not_counted():
    check_data_memory(job('data.dataset="fashionmnist"', "data.train_size=10000000000"), 3,
                      HostMemory(1, "MemAvailable", ""))


def test_rank_0s_check_refuses_before_allocating():
    forget_data()
    try:
        with pytest.raises(DatasetError, match="data.train_size = 10,000,000,000"):
            check_learning(job("data.train_size=10000000000"), 3)  # numpy would raise MemoryError at 74.5 GiB
    finally:
        forget_data()
