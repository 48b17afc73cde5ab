"""comm.data = "nccl" under real MPI, on gloo (this machine has no GPU): torch.distributed carries the model
and the updates, MPI the control and the rows. With two clients every sum has a single order (the server
adds zeros), so each run computes what the MPI path computes, bit for bit; and a rank stuck outside a
gloo collective is named by rank 0's roll call as in an MPI one."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import h5py
import mpi4py
import numpy as np
import pytest
import torch

from conftest import MPIRUN, ok, train
from mpifed.dataplane import choose_plane, mpi_cuda_aware
from mpifed.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from same_results import compare_runs  # noqa: E402

pytestmark = pytest.mark.mpi

POOLED = ["--set", "clients.count=6", "--set", "clients.per_round=4"]
TEACHER = ["--set", 'scaling.method="teacher"', "--set", "scaling.small_batch=4", "--set", "scaling.per_layer=false",
           "--set", "scaling.only_outside_critical=false"]  # the per-coordinate squares in the tail
NAN = ["--set", "debug.corrupt_rank=2", "--set", "debug.corrupt_round=4", "--set", 'debug.corrupt="nan"']
CASES = {  # each encoded where the update lies (protocol's direct path) but pooled top-k's error feedback
    "none": [*TEACHER, "--set", "checkpoint.every=3", "--set", 'plan.mode="predict"', *NAN],  # + the probe rounds
    "fp16": ["--set", 'compress.codec="fp16"', *TEACHER, *NAN],  # encoded on the device, summed by gloo in 16 bits
    "bf16-pooled": ["--set", 'compress.codec="bf16"', *POOLED],  # a worker's sum, encoded on the device
    "powersgd": ["--set", 'compress.codec="powersgd"'],  # allreduces on every rank
    "topk": ["--set", 'compress.codec="topk"', "--set", "checkpoint.every=3", "--set", "debug.corrupt_rank=1",
             "--set", "debug.corrupt_round=4", "--set", 'debug.corrupt="garbage"'],  # encoded on the device with
    # its error feedback there; a garbage payload rejected by client, as on MPI
    "qsgd-pooled": ["--set", 'compress.codec="qsgd"', *POOLED, "--set", "debug.corrupt_rank=1", "--set",
                    "debug.corrupt_round=3", "--set", 'debug.corrupt="truncate"'],  # each client's payload encoded
    # on the device, one short
    "topk-pooled": ["--set", 'compress.codec="topk"', "--set", "compress.options={density = 0.05, "
                    "error_feedback = true}", *POOLED],  # payloads point to point, residuals moving
}
EXPECTED = ("run.h5 attrs['data_plane']", "run.h5 attrs['data_plane_reason']", "run.h5 attrs['job']['comm']['data']")


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_gloo_data_plane_computes_what_mpi_computes(tmp_path, case):
    runs = {plane: tmp_path / plane / "run" for plane in ("mpi-host", "nccl")}
    for plane, run in runs.items():  # one run name, two folders: the job differs in comm.data alone
        run.parent.mkdir()
        ok(train(3, run.parent, "run", *CASES[case], "--set", f'comm.data="{plane}"', "--set", "comm.timeout=60"))
    with h5py.File(runs["nccl"] / "run.h5") as f:
        assert f.attrs["data_plane"] == "nccl (gloo)" and "comm.data" in f.attrs["data_plane_reason"]
    with h5py.File(runs["mpi-host"] / "run.h5") as f:
        assert f.attrs["data_plane"] == "mpi-host"
    differences = compare_runs(runs["mpi-host"], runs["nccl"])
    assert [d for d in differences if not d.startswith(EXPECTED)] == []
    assert len(differences) == 3, differences  # the choice itself is logged
    a, b = (torch.load(run / "model.pt", weights_only=True) for run in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if NAN[-1] in CASES[case]:
        with h5py.File(runs["nccl"] / "run.h5") as f:  # a NaN in the sum: the step skipped, as on MPI
            norms = f["server/grad_norm"][:]
            assert not np.isfinite(norms[4]) and np.isfinite(np.delete(norms, 4)).all()
    if case == "none":
        _table_of_compute_against_exchange(runs)


def _table_of_compute_against_exchange(runs):
    """analysis/data_planes.py on the two runs: a row per plane, its ratios those of the logs' medians."""
    script = Path(__file__).resolve().parents[1] / "analysis" / "data_planes.py"
    proc = subprocess.run([sys.executable, str(script), *map(str, runs.values()), "--allreduce", "0.001"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [line.strip("| ").split(" | ") for line in proc.stdout.splitlines()[2:]]
    assert [row[1] for row in rows] == ["mpi-host", "nccl (gloo)"]
    for row, run in zip(rows, runs.values()):
        with h5py.File(run / "run.h5") as f:
            steady = [r for r in range(3, 6) if r + 1 not in f["eval/round"][:]]  # rounds 4 and 5
            compute = np.median(f["iter/t_compute"][steady, 1:].max(axis=1))
            rnd = np.median(f["iter/t_iter"][steady, 0])
        assert row[3] == str(len(steady))
        assert row[-2] == f"{rnd / compute:.2f}x" and row[-1] == f"{rnd / (compute + 0.001):.2f}x"


_STUCK = """
import time
import numpy as np
import torch
from mpi4py import MPI
from mpifed.cluster import ABORT_GRACE_SECONDS
from mpifed.dataplane import TorchPlane
from mpifed.exchange import Exchange, RankTimeout
comm = MPI.COMM_WORLD
exchange = Exchange(comm, polite=True, timeout=2.0, data=TorchPlane(comm, torch.device("cpu"), 2.0, True))
model, start = torch.zeros(1000), time.monotonic()
try:
    for step in range(5):
        exchange.broadcast_tensor(model)
        if step == 2 and comm.rank == 2:
            time.sleep(30)
        exchange.reduce_tensor(model)
    print(f"rank {comm.rank} done", flush=True)
except RankTimeout as err:
    print(f"rank {comm.rank} timeout after {time.monotonic() - start:.1f} s: {err}", flush=True)
    time.sleep(ABORT_GRACE_SECONDS)  # as mpifed's own abort does: MPI_Abort drops output still in the launcher's pipes
    comm.Abort(1)
"""


def test_a_rank_stuck_outside_a_gloo_collective_is_named(tmp_path):
    if MPIRUN is None:
        pytest.skip("mpirun not found; install the MPICH wheel: pip install -e '.[mpich]'")
    proc = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-c", _STUCK], cwd=tmp_path, timeout=120,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    timeouts = [line for line in proc.stdout.splitlines() if " timeout after " in line]
    assert len(timeouts) == 1 and timeouts[0].startswith("rank 0 "), proc.stdout + proc.stderr
    assert "Roll call: rank 2 (client 1) did not answer within 2 s: busy outside MPI" in timeouts[0]
    assert float(timeouts[0].split(" timeout after ")[1].split(" s")[0]) < 20  # not gloo's own timeout


class _Devices:
    """A communicator stand-in whose ranks compute on `devices` (their MPI CUDA-aware or not)."""

    def __init__(self, *devices, aware=False):
        self.ranks = [(d, aware and d == "cuda", "MPIX_Query_cuda_support() = %d in libmpi.so" % aware)
                      for d in devices]

    def allgather(self, mine):
        return self.ranks


def test_the_choice_is_checked_against_every_ranks_device_and_mpi(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_plane("auto", _Devices("cpu", "cpu", "cpu"), cpu)[0] == "mpi-host"
    assert choose_plane("nccl", _Devices("cpu", "cpu"), cpu) == ("nccl", 'comm.data = "nccl" (gloo for cpu tensors)')
    assert choose_plane("mpi-host", _Devices("cuda", "cuda"), cpu)[0] == "mpi-host"
    monkeypatch.setattr("torch.distributed.is_nccl_available", lambda: True)
    plane, why = choose_plane("auto", _Devices("cuda", "cuda", aware=True), cpu)
    assert plane == "nccl" and "every rank on CUDA" in why  # NCCL first
    assert choose_plane("auto", _Devices("cpu", "cuda"), cpu)[0] == "mpi-host"  # a CPU server: MPI
    with pytest.raises(InputError, match=r'needs every rank on the same kind of device, but rank 0 on cpu, '
                                         r'rank 1 on cuda.*comm.data = "mpi-host"'):
        choose_plane("nccl", _Devices("cpu", "cuda"), cpu)
    monkeypatch.setattr("torch.distributed.is_nccl_available", lambda: False)
    assert choose_plane("auto", _Devices("cuda", "cuda"), cpu)[0] == "mpi-host"
    plane, why = choose_plane("auto", _Devices("cuda", "cuda", aware=True), cpu)
    assert plane == "mpi-device" and "MPIX_Query_cuda_support() = 1" in why
    with pytest.raises(InputError, match="this torch has no NCCL"):
        choose_plane("nccl", _Devices("cuda", "cuda"), cpu)
    assert choose_plane("mpi-device", _Devices("cuda", "cuda", aware=True), cpu)[0] == "mpi-device"
    with pytest.raises(InputError, match=r'not CUDA-aware on rank 0 \(MPIX_Query_cuda_support\(\) = 0.*"nccl"'):
        choose_plane("mpi-device", _Devices("cuda", "cuda"), cpu)
    with pytest.raises(InputError, match=r"rank\(s\) 0 compute on the CPU"):
        choose_plane("mpi-device", _Devices("cpu", "cuda", aware=True), cpu)


def _libmpi_of_mpi4py() -> ctypes.CDLL:
    """The MPI library mpi4py itself loaded, found by mpi4py's own loader (not by mpifed's search)."""
    try:
        from mpi4py._mpiabi import _dlopen_libmpi
    except ImportError:
        pytest.skip(f"mpi4py {mpi4py.__version__} has no library loader (mpi4py._mpiabi) to ask the MPI library")
    return _dlopen_libmpi()


def test_the_cuda_answer_is_the_mpi_librarys_own():
    """mpi-device is chosen on the MPI library's word: mpifed's answer is what MPIX_Query_cuda_support()
    of the libmpi that mpi4py loaded says, asked here directly (no such query: not aware), on a CUDA-aware
    MPI as on one that is not."""
    aware, how = mpi_cuda_aware()
    query = getattr(_libmpi_of_mpi4py(), "MPIX_Query_cuda_support", None)
    if query is None:
        assert not aware and how.startswith("no MPIX_Query_cuda_support in "), how
        return
    query.restype = ctypes.c_int
    said = bool(query())
    assert aware == said, how
    assert how.startswith(f"MPIX_Query_cuda_support() = {int(said)} in libmpi"), how


_DEVICE_PLANE = """
import numpy as np
import torch
from mpi4py import MPI
from mpifed.dataplane import MpiDevicePlane
from mpifed.exchange import Exchange
comm = MPI.COMM_WORLD
exchange = Exchange(comm, polite=True, timeout=30.0, data=MpiDevicePlane(comm, chunk_bytes=256))
model = torch.arange(1000, dtype=torch.float32) if comm.rank == 0 else torch.zeros(1000)
exchange.broadcast_tensor(model)  # tensors handed to MPI themselves, in pieces of 64 floats
update = torch.full((1000,), float(comm.rank))
exchange.reduce_tensor(update)
payloads = exchange.gather_bytes(np.full(comm.rank, comm.rank, dtype=np.uint8))  # host bytes: MPI's own path
said = comm.gather(f"rank {comm.rank} model ok {torch.equal(model, torch.arange(1000.0))} update {update[0].item()}")
if comm.rank == 0:  # one writer: lines of several ranks on one stdout can interleave
    print("\\n".join(said + [f"sum {update[:3].tolist()} payloads {[p.tolist() for p in payloads]}"]), flush=True)
"""


def test_the_mpi_device_plane_hands_tensors_to_mpi_in_pieces(tmp_path):
    """On CPU tensors: the same calls a CUDA-aware MPI gets on a GPU."""
    if MPIRUN is None:
        pytest.skip("mpirun not found; install the MPICH wheel: pip install -e '.[mpich]'")
    proc = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-c", _DEVICE_PLANE], cwd=tmp_path, timeout=120,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "rank 0 model ok True update 3.0", proc.stdout  # 0 + 1 + 2 into the root
    assert lines[1:3] == ["rank 1 model ok True update 1.0", "rank 2 model ok True update 2.0"]  # left alone
    assert lines[3] == "sum [3.0, 3.0, 3.0] payloads [[], [1], [2, 2]]"
