"""How a tensor reaches MPI is the exchange's business: a CPU tensor's own memory, a device tensor's
kept host buffer. The roles hand it tensors either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpifed.exchange import Exchange


def test_a_cpu_tensor_travels_in_its_own_memory():
    ex = Exchange(MPI.COMM_SELF, polite=False)
    t = torch.arange(6, dtype=torch.float32)
    host = ex.host(t)
    host[0] = 42.0  # what MPI writes there is the tensor
    assert t[0].item() == 42.0
    assert np.shares_memory(ex.to_host(t), t.numpy())
    ex.broadcast_tensor(t)  # root of a one-rank world: nothing changes, nothing is copied
    assert t.tolist() == [42.0, 1, 2, 3, 4, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_device_tensor_is_staged_through_one_kept_buffer():
    ex = Exchange(MPI.COMM_SELF, polite=False)
    t = torch.arange(6, dtype=torch.float32, device="cuda")
    host = ex.to_host(t)
    assert host.tolist() == [0, 1, 2, 3, 4, 5]
    host[:] = 7.0
    ex.to_device(t)
    assert t.cpu().tolist() == [7.0] * 6
    assert ex.host(t) is host  # the same buffer every round: no allocation per round
    assert torch.from_numpy(host).is_pinned()  # page-locked: the copies are DMA
    host[:] = 3.0
    ex.to_device(t)  # queued on the stream, not waited for
    ex.host(t)[:] = 5.0  # handing the buffer out again waits for that copy first
    assert t.cpu().tolist() == [3.0] * 6
