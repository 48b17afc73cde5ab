"""How a tensor reaches MPI is the exchange's business: a CPU tensor's own memory, a device tensor's
kept host buffer (the model's broadcast in pieces whose copies overlap MPI). The roles hand it tensors
either way."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import MPIRUN
from mpifed.exchange import STAGE_BYTES, Exchange


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


_PIECES = """
import sys
import torch
from mpi4py import MPI
from mpifed.exchange import STAGE_BYTES, Exchange
comm = MPI.COMM_WORLD
for device in sys.argv[1:]:
    ex = Exchange(comm, polite=True, timeout=30.0)
    ex.stage_bytes = 4000  # 2,501 values: 1,000 a piece, the last one short
    t = torch.full((2501,), -1.0, device=device)
    if comm.rank == 0:
        t.copy_(torch.arange(2501, dtype=torch.float32))
    for _ in range(2):  # the second time through the kept host buffer
        ex.broadcast_tensor(t)
        if comm.rank != 0:
            t.add_(0.0)  # a kernel queued after the copy to the device sees its values
    ok = torch.equal(t.cpu(), torch.arange(2501, dtype=torch.float32))
    oks = comm.gather(ok, root=0)
    if comm.rank == 0:
        print(device, "equal on every rank" if all(oks) else f"differs: {oks}", flush=True)
"""


@pytest.mark.mpi
def test_the_model_broadcast_travels_in_pieces_on_every_device(tmp_path):
    """broadcast_tensor's stage_bytes pieces, the same calls on every rank; on CUDA (.ci/gpu-check) the
    root's pieces copied on a side stream and handed to MPI one by one."""
    if MPIRUN is None:
        pytest.skip("mpirun not found; install the MPICH wheel: pip install -e '.[mpich]'")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    proc = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-c", _PIECES, *devices], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [f"{d} equal on every rank" for d in devices], proc.stdout + proc.stderr


def test_the_broadcast_goes_in_pieces_only_where_every_rank_stages_a_device_tensor():
    """agree_pieces: the pieces must match on every rank; on CPU tensors they only cost (README)."""
    for devices, pieces in ((["cuda", "cuda"], STAGE_BYTES), (["cpu", "cuda"], 2**20), (["cpu", "cpu"], 2**20)):
        ex = Exchange(SimpleNamespace(rank=0, size=2, allgather=lambda mine, d=devices: d), polite=False,
                      chunk_bytes=2**20)
        ex.agree_pieces(torch.device(devices[0]))
        assert ex.stage_bytes == pieces
