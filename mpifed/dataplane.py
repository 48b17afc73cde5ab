"""The data plane (job field comm.data): which engine moves the round's large buffers.

MPI always carries the control: the job, the placement, the batches, the rows of timings, the stop
flag and the roll call. The data plane carries what grows with the model: the model's broadcast,
the update's reduce (and a multi-phase codec's allreduces) and the gathered payloads.

  mpi-host  MPI on host memory: a CPU tensor's own memory, a CUDA tensor staged through a pinned
            host buffer kept per tensor (mpifed.exchange).
  mpi-device  MPI handed the CUDA tensors themselves, where the MPI library says it is CUDA-aware
            (MPIX_Query_cuda_support, which Open MPI and MPICH export; never guessed).
  nccl      torch.distributed's process group, started from the MPI world: rank 0 opens a TCPStore
            on a free port and broadcasts its address over MPI, so no launcher or environment
            variable is needed. NCCL moves CUDA tensors device to device; on CPU the same code path
            runs with gloo (which is how it is tested without a GPU).
  auto      on CUDA: nccl where torch has NCCL, else mpi-device where MPI is CUDA-aware; else mpi-host.

Its work handles are waited on by the exchange like MPI's requests (polite, timed, answering rank
0's roll call), so a stuck collective of either engine ends the job with the stuck rank named.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import socket
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from mpi4py import MPI

from mpifed.errors import InputError

ROOT = 0


def mpi_cuda_aware() -> tuple[bool, str]:
    """Whether this process's MPI library says it moves CUDA memory, and how that is known: its own
    MPIX_Query_cuda_support(), looked up in the libmpi this process loaded. No answer is a no."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if Path(line.split()[-1]).name.startswith("libmpi")})
    except OSError:
        return False, "the loaded MPI library could not be found (no /proc/self/maps)"
    for path in paths:
        query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        if query is not None:
            query.restype = ctypes.c_int
            aware = bool(query())
            return aware, f"MPIX_Query_cuda_support() = {int(aware)} in {Path(path).name}"
    return False, f"no MPIX_Query_cuda_support in {', '.join(paths) or 'any loaded libmpi'}"


def choose_plane(wanted: str, comm: MPI.Intracomm, device: torch.device) -> tuple[str, str]:
    """(plane, why), the same on every rank: the job's choice, or auto's, checked against every rank's
    device and MPI (a start-up collective)."""
    aware, how = mpi_cuda_aware() if device.type == "cuda" else (False, "CPU tensors")
    ranks = comm.allgather((device.type, aware, how))
    devices = [d for d, _, _ in ranks]
    if wanted == "mpi-host":
        return "mpi-host", "comm.data = \"mpi-host\""
    same = len(set(devices)) == 1
    if wanted == "mpi-device":
        if devices != ["cuda"] * len(devices):
            cpu = ", ".join(str(r) for r, d in enumerate(devices) if d != "cuda")
            raise InputError(f"comm.data = \"mpi-device\" hands CUDA tensors to MPI, but rank(s) {cpu} compute on "
                             f"the CPU: set run.device = \"cuda\" on GPU nodes, or comm.data = \"mpi-host\" (CPU "
                             f"tensors already travel in their own memory)")
        unaware = [f"rank {r} ({h})" for r, (_, a, h) in enumerate(ranks) if not a]
        if unaware:
            raise InputError(f"comm.data = \"mpi-device\" but this MPI is not CUDA-aware on {', '.join(unaware[:3])}: "
                             f"set comm.data = \"nccl\" or \"mpi-host\", or use an MPI built with CUDA (Open MPI "
                             f"with CUDA or UCX, MVAPICH2-GDR)")
        return "mpi-device", f"comm.data = \"mpi-device\" ({ranks[0][2]})"
    if wanted == "nccl":
        if not same:
            where = ", ".join(f"rank {r} on {d}" for r, d in enumerate(devices))
            raise InputError(f"comm.data = \"nccl\" needs every rank on the same kind of device, but {where}: set "
                             f"run.device to \"cuda\" (or \"cpu\") for every rank, or comm.data = \"mpi-host\"")
        if devices[0] == "cuda" and not dist.is_nccl_available():
            raise InputError("comm.data = \"nccl\" but this torch has no NCCL: install a CUDA build of torch, "
                             "or set comm.data = \"mpi-host\"")
        return "nccl", f"comm.data = \"nccl\" ({backend_for(devices[0])} for {devices[0]} tensors)"
    if same and devices[0] == "cuda" and dist.is_nccl_available():
        return "nccl", "auto: every rank on CUDA and torch has NCCL (device buffers move without host staging)"
    if same and devices[0] == "cuda" and all(a for _, a, _ in ranks):
        return "mpi-device", f"auto: every rank on CUDA, no NCCL in torch, and MPI is CUDA-aware ({ranks[0][2]})"
    if devices[0] == "cuda" or not same:
        return "mpi-host", "auto: not every rank on CUDA, or no NCCL in this torch: MPI through host buffers"
    return "mpi-host", "auto: CPU tensors, which MPI moves in place (mpifed bench exchange times gloo beside it)"


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


class TorchPlane:
    """torch.distributed collectives on tensors, for the exchange. Each call returns (work handles, a
    finish step to run once they completed): a host tensor handed to NCCL is staged through a device
    buffer kept per shape, and a reduce works on a copy off the root (gloo overwrites a non-root's input
    with partial sums, where MPI leaves it as it was)."""

    carries_host = True  # host buffers (encoded payloads, the tail) go through torch.distributed too

    def __init__(self, comm: MPI.Intracomm, device: torch.device, timeout: float, one_host: bool):
        self.backend = backend_for(device.type)
        self.device = device if self.backend == "nccl" else torch.device("cpu")
        self.rank = comm.rank
        self._scratch: dict[tuple, torch.Tensor] = {}
        # torch's own timeout stays out of the way of comm.timeout, which names the stuck rank first
        limit = datetime.timedelta(seconds=3 * timeout + 600 if timeout else 30 * 86400)
        host = "127.0.0.1" if one_host else socket.gethostbyname(socket.gethostname())
        store = None
        if comm.rank == ROOT:
            store = dist.TCPStore(host, 0, comm.size, True, timeout=limit, wait_for_workers=False)
        host, port = comm.bcast((host, store.port if store is not None else 0), root=ROOT)
        if store is None:
            store = dist.TCPStore(host, port, comm.size, False, timeout=limit)
        options = dict(device_id=device) if self.backend == "nccl" else {}
        dist.init_process_group(self.backend, store=store, rank=comm.rank, world_size=comm.size, timeout=limit,
                                **options)
        self._store = store
        atexit.register(self.close)  # before mpi4py finalizes MPI (registered earlier, so run later)

    @property
    def name(self) -> str:
        return f"nccl ({self.backend})"

    def _kept(self, like: torch.Tensor, role: str) -> torch.Tensor:
        key = (role, like.shape, like.dtype)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(like.shape, dtype=like.dtype, device=self.device)
        return self._scratch[key]

    def broadcast(self, t: torch.Tensor) -> tuple[list, Callable[[], None]]:
        moved = t if t.device == self.device else self._kept(t, "broadcast")
        if moved is not t and self.rank == ROOT:
            moved.copy_(t)
        work = dist.broadcast(moved, ROOT, async_op=True)
        return [work], (lambda: t.copy_(moved)) if moved is not t and self.rank != ROOT else _nothing

    def reduce(self, t: torch.Tensor, everyone: bool) -> tuple[list, Callable[[], None]]:
        keeps = everyone or self.rank == ROOT  # the sum lands in t
        moved = t if (t.device == self.device and keeps) else self._kept(t, "reduce").copy_(t)
        if everyone:
            work = dist.all_reduce(moved, async_op=True)
        else:
            work = dist.reduce(moved, ROOT, async_op=True)
        return [work], (lambda: t.copy_(moved)) if moved is not t and keeps else _nothing

    def gather(self, t: torch.Tensor, rows: torch.Tensor | None) -> tuple[list, Callable[[], None]]:
        """Every rank's equal-length `t` into root's (size, len) `rows`. A collective, not point to point:
        gloo completes a send or receive only inside its blocking wait, which a timed wait cannot poll."""
        moved = t.to(self.device)
        into = None if rows is None else list((rows if rows.device == self.device else
                                              torch.empty_like(rows, device=self.device)).unbind())
        work = dist.gather(moved, into, dst=ROOT, async_op=True)
        if into is None or rows.device == self.device:
            return [work], _nothing
        return [work], lambda: rows.copy_(torch.stack(into))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class MpiDevicePlane:
    """MPI handed tensors themselves (mpi4py reads their DLPack): with a CUDA-aware MPI, device memory
    moves without host staging. The calls of TorchPlane, returning MPI requests; host buffers (encoded
    payloads) stay on the exchange's own MPI path. Large tensors travel in pieces, as host buffers do."""

    name = "mpi-device"
    carries_host = False

    def __init__(self, comm: MPI.Intracomm, chunk_bytes: int):
        self.comm, self.chunk_bytes = comm, max(1, int(chunk_bytes))

    def _pieces(self, t: torch.Tensor) -> list[torch.Tensor]:
        if t.is_cuda:  # MPI reads the memory now: the kernels that write it must have finished
            torch.cuda.current_stream(t.device).synchronize()
        return list(t.split(max(1, self.chunk_bytes // t.element_size()))) if t.numel() else [t]

    def broadcast(self, t: torch.Tensor) -> tuple[list, Callable[[], None]]:
        return [self.comm.Ibcast(piece, root=ROOT) for piece in self._pieces(t)], _nothing

    def reduce(self, t: torch.Tensor, everyone: bool) -> tuple[list, Callable[[], None]]:
        pieces = self._pieces(t)
        if everyone:
            return [self.comm.Iallreduce(MPI.IN_PLACE, p, op=MPI.SUM) for p in pieces], _nothing
        if self.comm.rank == ROOT:
            return [self.comm.Ireduce(MPI.IN_PLACE, p, op=MPI.SUM, root=ROOT) for p in pieces], _nothing
        return [self.comm.Ireduce(p, None, op=MPI.SUM, root=ROOT) for p in pieces], _nothing


def _nothing() -> None:
    pass


def open_plane(wanted: str, comm: MPI.Intracomm, device: torch.device, timeout: float, one_host: bool,
               chunk_bytes: int) -> tuple[TorchPlane | MpiDevicePlane | None, str, str]:
    """(the plane, None for MPI's host path; the plane's name; why it was chosen)."""
    plane, why = choose_plane(wanted, comm, device)
    if plane == "mpi-host":
        return None, plane, why
    if plane == "mpi-device":
        return MpiDevicePlane(comm, chunk_bytes), plane, why
    torch_plane = TorchPlane(comm, device, timeout, one_host)
    return torch_plane, torch_plane.name, why
