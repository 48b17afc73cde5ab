"""The per-round collectives, over contiguous numeric buffers (mpi4py's uppercase methods).

Nothing here pickles. Buffers larger than `chunk` elements travel in several calls, so a model
over 2 GiB works with an MPI that lacks MPI-4 large counts. Every collective is non-blocking and is
waited on in one of two ways: `poll` (Testall in a loop, or MPI's own Waitall when there is no
timeout: lowest latency, spins a core) or `sleep` (Testall with an exponential back-off capped at
`max_sleep`), which leaves the core to ranks that compute when ranks outnumber cores (measured
here: 7 spinning ranks slowed a computing one 4.2x).
With a `timeout`, a wait that lasts longer ends the job (RankTimeout): a stopped, deadlocked or lost
rank would otherwise hold every other rank in its collective forever.
If device buffers ever go straight to a CUDA-aware MPI, that belongs in this module alone.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

ROOT = 0


class RankTimeout(RuntimeError):
    """A collective waited longer than comm.timeout: some rank stopped answering."""


SUSPENDED = 5.0
"""Seconds between two polls of one wait beyond which this rank itself was not running (the whole job
suspended: SLURM's scontrol suspend, preemption by suspension, Ctrl-Z): that gap is not counted as
waiting, or a job resumed after more than comm.timeout would abort at once. A poll takes microseconds
and a back-off sleep at most max_sleep, so only a stopped process sees such a gap."""


class Exchange:
    def __init__(self, comm: MPI.Intracomm, polite: bool, chunk_bytes: int = 256 * 2**20,
                 max_sleep: float = 2e-4, timeout: float = 0.0):
        self.comm, self.polite, self.max_sleep, self.timeout = comm, polite, max_sleep, timeout
        self.chunk_bytes = max(1, int(chunk_bytes))

    def _pieces(self, buf: np.ndarray) -> list[np.ndarray]:
        step = max(1, self.chunk_bytes // buf.itemsize)
        return [buf[i: i + step] for i in range(0, max(buf.size, 1), step)]

    def wait(self, requests: list[MPI.Request]) -> None:
        if not self.polite and not self.timeout:
            MPI.Request.Waitall(requests)
            return
        waited, last, pause = 0.0, time.monotonic(), 1e-6
        while not MPI.Request.Testall(requests):
            if self.polite:
                time.sleep(pause)
                pause = min(2 * pause, self.max_sleep)
            now = time.monotonic()
            waited += now - last if now - last < SUSPENDED else 0.0
            last = now
            if self.timeout and waited > self.timeout:
                raise RankTimeout(f"this rank waited {self.timeout:g} s (comm.timeout) in a collective that "
                                  f"another rank never joined: that rank is stuck (stopped, deadlocked, or on a "
                                  f"lost node); if rounds really take this long, raise comm.timeout")

    def broadcast(self, buf: np.ndarray) -> None:
        """Root's `buf` into every rank's `buf` (same shape and dtype everywhere)."""
        self.wait([self.comm.Ibcast(piece, root=ROOT) for piece in self._pieces(buf)])

    def reduce_sum(self, buf: np.ndarray, op: MPI.Op = MPI.SUM, everyone: bool = False) -> None:
        """Elementwise sum (or `op`) of every rank's `buf` into root's `buf`, or into every rank's
        with `everyone` (allreduce). Root contributes its own values (the server passes zeros);
        without `everyone`, non-root buffers are left unchanged."""
        if everyone:
            reqs = [self.comm.Iallreduce(MPI.IN_PLACE, piece, op=op) for piece in self._pieces(buf)]
        elif self.comm.rank == ROOT:
            reqs = [self.comm.Ireduce(MPI.IN_PLACE, piece, op=op, root=ROOT) for piece in self._pieces(buf)]
        else:
            reqs = [self.comm.Ireduce(piece, None, op=op, root=ROOT) for piece in self._pieces(buf)]
        self.wait(reqs)

    def gather_rows(self, row: np.ndarray, table: np.ndarray | None) -> None:
        """Fixed-size per-rank rows into root's (size, len(row)) table."""
        self.wait([self.comm.Igather(row, table if self.comm.rank == ROOT else None, root=ROOT)])

    def scatter_rows(self, table: np.ndarray | None, row: np.ndarray) -> None:
        """Root's (size, len(row)) table, one row to each rank (used once, when resuming)."""
        self.wait([self.comm.Iscatter(table if self.comm.rank == ROOT else None, row, root=ROOT)])

    def arrive(self) -> None:
        """Wait, in this exchange's way, until every rank reaches this point. Start-up's pickled,
        blocking collectives come after it, so their waiting is polite and bounded by the timeout too."""
        self.wait([self.comm.Ibarrier()])

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank passes True (one tiny allreduce)."""
        value = np.array([int(flag)], dtype=np.int64)
        self.wait([self.comm.Iallreduce(MPI.IN_PLACE, value, op=MPI.MAX)])
        return bool(value[0])

    def gather_bytes(self, payload: np.ndarray) -> list[np.ndarray] | None:
        """Variable-size uint8 payloads to root (Gatherv with explicit counts and displacements).

        Root receives one array per rank (its own included, normally empty)."""
        counts = np.zeros(self.comm.size, dtype=np.int64) if self.comm.rank == ROOT else None
        self.wait([self.comm.Igather(np.array([payload.size], dtype=np.int64), counts, root=ROOT)])
        if self.comm.rank != ROOT:
            self.wait([self.comm.Igatherv(payload, None, root=ROOT)])
            return None
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        recv = np.empty(int(counts.sum()), dtype=np.uint8)
        self.wait([self.comm.Igatherv(payload, [recv, counts, displs, MPI.BYTE], root=ROOT)])
        return [recv[d: d + c] for d, c in zip(displs, counts)]
