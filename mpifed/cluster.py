"""The MPI world: ranks and roles, node-local rank -> device, thread budget, failing fast.

This is the only module that touches MPI.COMM_WORLD and the process environment; everything else
receives an explicit communicator. Rank 0 is the server; which client a rank trains is
mpifed.placement's to say.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
from mpi4py import MPI

from mpifed.errors import InputError
from mpifed.exchange import RankTimeout
from mpifed.placement import Placement


ABORT_GRACE_SECONDS = 0.5


@dataclass(frozen=True)
class World:
    comm: MPI.Intracomm
    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    cores: int

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    @property
    def role(self) -> str:
        return Placement.one_per_rank(self.size).role(self.rank)

    @property
    def oversubscribed(self) -> bool:
        """More ranks on this node than cores: waiting ranks must not spin."""
        return self.local_size > self.cores


def init_world(comm: MPI.Intracomm | None = None) -> World:
    comm = comm or MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    world = World(comm, comm.rank, comm.size, node.rank, node.size, socket.gethostname(), _cores())
    node.Free()
    return world


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pick_device(world: World, wanted: str) -> torch.device:
    """GPU of the node-local rank when CUDA is present (and wanted); otherwise the CPU, with a
    share of the cores so that co-located ranks do not fight over them."""
    if wanted != "cpu" and torch.cuda.is_available():
        index = world.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if wanted == "cuda":
        raise InputError(f"run.device = 'cuda' but rank {world.rank} on {world.host} sees no CUDA "
                         f"device; use run.device = 'auto' or 'cpu', or run on GPU nodes")
    torch.set_num_threads(max(1, world.cores // world.local_size))
    return torch.device("cpu")


class StopRequest:
    """Set by SIGTERM or SIGUSR1 (SLURM's warning before a time limit or preemption) or SIGINT (Ctrl-C,
    which mpirun forwards to every rank). The handler only records it; the ranks agree at the next
    round boundary to checkpoint and stop. A second Ctrl-C stops at once, without a checkpoint."""

    installed: StopRequest | None = None

    def __init__(self):
        self.signal = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._record)

    @classmethod
    def install(cls) -> StopRequest:
        """The process's one stop request. `mpifed train` installs it right after MPI starts, so a
        signal that comes while the job is prepared (a resume copying its log, data loading) is kept:
        MPICH's own SIGUSR1 handler would otherwise swallow SLURM's warning."""
        if cls.installed is None:
            cls.installed = cls()
        return cls.installed

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __bool__(self) -> bool:
        return self.signal != 0


STOPPED = 3
"""Exit code of a job stopped by SIGTERM/SIGUSR1/Ctrl-C: after a checkpoint, or before round 1."""


class StoppedEarly(Exception):
    """Every rank agreed to stop on a signal during start-up (data, memory sizing, probe rounds):
    nothing is trained yet, so there is nothing to checkpoint; the job exits with STOPPED."""


def run_or_abort(world: World, body: Callable[[], int | None]) -> int:
    """Run this rank's part; on any error print rank and message and abort the whole job at once.

    MPI_Abort makes the launcher kill every rank, so peers blocked in a collective do not hang.
    """
    try:
        return body() or 0
    except StoppedEarly as err:  # every rank raises it together: a clean stop, not a failure
        if world.rank == 0:
            print(f"mpifed: stopped by {err} during start-up, before any round: nothing was trained or "
                  f"written to resume from; run the command again", file=sys.stderr, flush=True)
        return STOPPED
    except BaseException as err:  # noqa: BLE001 - any failure on any rank must end the job
        if isinstance(err, SystemExit) and not err.code:
            return 0
        return abort(world, err)


def abort(world: World, err: BaseException) -> int:
    """Print this rank's failure and end every rank of the job at once (MPI_Abort)."""
    # the user's input (a job field, a dataset, a budget), a Ctrl-C or a timeout: the message says it all
    said = isinstance(err, (InputError, KeyboardInterrupt, RankTimeout))
    shown = traceback.TracebackException.from_exception(err)
    shown.__notes__ = None  # the notes (how to go on) come last, below, with or without a traceback
    detail = "" if said else "".join(shown.format())
    why = ("interrupted (Ctrl-C) before a checkpoint could be written" if isinstance(err, KeyboardInterrupt)
           else f"{type(err).__name__}: {err}")
    notes = "".join(f"{note}\n" for note in getattr(err, "__notes__", ()))
    message = (f"{detail}mpifed: rank {world.rank} ({world.role}) on {world.host} failed: {why}\n"
               f"mpifed: aborting all {world.size} ranks\n{notes}")
    sys.stderr.flush()
    os.write(2, message.encode(errors="replace"))
    # MPI_Abort makes the launcher kill every process at once, and output still in its pipes is
    # lost: give it a moment to forward this message first (bounded: the job still ends in
    # well under a second).
    time.sleep(ABORT_GRACE_SECONDS)
    world.comm.Abort(1)
    return 1
