"""The MPI world: ranks and roles, node-local rank -> device, thread budget, failing fast.

This is the only module that touches MPI.COMM_WORLD and the process environment; everything else
receives an explicit communicator. It imports torch only to pick a device, so a launch checks its job
before any rank pays for torch (mpifed.jobcheck). Rank 0 is the server; which client a rank trains is
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
from typing import TYPE_CHECKING, Callable

from mpi4py import MPI

from mpifed.errors import InputError, RankTimeout, StoppedEarly
from mpifed.placement import Placement

if TYPE_CHECKING:
    import torch


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
    import torch  # here, not above: the job is checked before any rank imports torch (mpifed.jobcheck)

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
    which mpirun forwards to every rank). The handler records it; the ranks agree at the next start-up
    step or round boundary to stop (checkpointing once there is a round to keep). A second Ctrl-C stops
    at once, without a checkpoint.

    Before the ranks' first agreement (mpifed.session.stop_if_asked), start-up reads the job, loads and
    partitions the data and sizes the clients, which may take minutes and holds nothing to keep: a
    signal then ends the job at once (StoppedEarly, not agreed) rather than when that work is done."""

    installed: StopRequest | None = None

    def __init__(self):
        self.signal = 0
        self.at_once = True  # until the ranks first agree on stopping
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
        if self.at_once:
            self.at_once = False
            raise StoppedEarly(signal.Signals(signum).name, agreed=False)

    def __bool__(self) -> bool:
        return self.signal != 0


STOPPED = 3
"""Exit code of a job stopped by SIGTERM/SIGUSR1/Ctrl-C: after a checkpoint, or before round 1."""
DIVERGED = 4
"""Exit code of a job stopped because its steps were skipped train.max_skipped rounds in a row."""
EXIT_CODES = {0: 0, 1: STOPPED, 2: DIVERGED}
"""Exit code by the reason the ranks agreed to stop for (mpifed.protocol's STOP_ASKED, STOP_DIVERGED):
every rank exits with the same code, since the launcher combines differing ones."""


def run_or_abort(world: World, body: Callable[[], int | None]) -> int:
    """Run this rank's part; on any error print rank and message and abort the whole job at once.

    MPI_Abort makes the launcher kill every rank, so peers blocked in a collective do not hang.
    """
    try:
        return body() or 0
    except StoppedEarly as err:
        if not err.agreed:
            return stop_at_once(world, err)
        if world.rank == 0:  # every rank raises it together: a clean stop, not a failure
            print(_stopped_early(err), file=sys.stderr, flush=True)
        return STOPPED
    except BaseException as err:  # noqa: BLE001 - any failure on any rank must end the job
        if isinstance(err, SystemExit) and not err.code:
            return 0
        return abort(world, err)


def _stopped_early(err: StoppedEarly) -> str:
    return (f"mpifed: stopped by {err} during start-up, before any round: nothing was trained or written to "
            f"resume from; run the command again")


def stop_at_once(world: World, err: StoppedEarly) -> int:
    """A signal before the ranks could agree on it: end every rank now (MPI_Abort with STOPPED). Rank 0
    says so; mpirun and SLURM signal every rank, so a client waits for rank 0 to end the job first and
    speaks itself only when the signal was its alone."""
    if world.rank != 0:  # a bounded wait for rank 0's abort, which ends this process
        time.sleep(4 * ABORT_GRACE_SECONDS)
    return _say_and_abort(world, _stopped_early(err) + (f" (rank {world.rank} alone got it)" if world.rank else "")
                          + "\n", STOPPED)


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
    return _say_and_abort(world, message, 1)


def _say_and_abort(world: World, message: str, code: int) -> int:
    """Write `message` to stderr and end every rank with exit code `code` (MPI_Abort)."""
    sys.stderr.flush()
    os.write(2, message.encode(errors="replace"))
    # MPI_Abort makes the launcher kill every process at once, and output still in its pipes is
    # lost: give it a moment to forward this message first (bounded: the job still ends in
    # well under a second).
    time.sleep(ABORT_GRACE_SECONDS)
    world.comm.Abort(code)
    return code
