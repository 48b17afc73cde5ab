"""A full disk, said in one line: which file, how much is free, and how to go on.

Every writer of a run's files (the log, checkpoints, the model, job.toml, the lock) reports a full
disk through here, and a file replaced whole never leaves part of itself behind. Torch-free, so that
the log (which readers open without torch) and the checkpoints share it; that is also why the
checkpoint files are listed here: the advice names the newest one to resume from.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from mpifed.errors import InputError
from mpifed.units import format_bytes


class DiskFullError(InputError, OSError):
    """A file of the run could not be written because its disk (or quota) is full. The message says
    where, how much is free and how to go on: a traceback adds nothing to that."""


_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = tuple(os.strerror(code) for code in _FULL)


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error it arose from, is ENOSPC/EDQUOT. HDF5 names the errno only in its
    message, and torch.save reports it as the context of its own RuntimeError."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) in _FULL or any(text in str(err) for text in _FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(what: str, folder: Path, advice: str, needs: int | None = None) -> DiskFullError:
    """The error for a write that found the disk holding `folder` full: what failed, the free space
    (and what the file needs, when known), and `advice` on how to go on."""
    where = Path(folder)
    while not where.exists() and where != where.parent:  # a folder the failed write was to create
        where = where.parent
    try:
        free = format_bytes(shutil.disk_usage(where).free)
    except OSError:
        free = "unknown"
    needed = f", it needs about {format_bytes(needs)}" if needs else ""
    err = DiskFullError(f"{what} could not be written: the disk holding {folder} is full ({free} free{needed}); "
                        f"{advice}")
    err.errno = errno.ENOSPC
    return err


def write_whole(path: Path, write: Callable[[BinaryIO], object], what: str, advice: Callable[[], str],
                needs: Callable[[], int] | None = None) -> None:
    """write(fh) into a temporary name, fsynced, then renamed over `path` and the folder fsynced: a
    reader finds the old file or the new one, never part of one, and after a crash too; a failure
    removes the temporary. On a full disk it raises a DiskFullError naming `what`, the free space (and
    what it `needs`) and advice() on how to go on."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full(what, path.parent, advice(), needs() if needs else None) from err
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder after a rename in it: the file's data was fsynced, but until its folder is, a
    crash (a lost node) may bring back the old name or none."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints lie: <run>/checkpoints/round-<R>.pt."""
    return Path(run_dir) / "checkpoints"


def checkpoint_files(run_dir: Path) -> list[Path]:
    """A run's checkpoint files, newest first."""
    return sorted(checkpoint_dir(run_dir).glob("round-*.pt"), reverse=True)


def resume_command(run_dir: Path, ranks: int) -> str:
    """The command that continues the run in `run_dir` with its `ranks` processes, as every message that
    offers to resume prints it."""
    return f"mpirun -n {ranks} mpifed train --resume {run_dir}"


def continue_note(run_dir: Path, ranks: int) -> str:
    """What rank 0 adds when its rounds end in a failure (a rank killed or lost, found by comm.timeout):
    the logged rounds are kept, and --resume continues from the newest checkpoint, if there is one."""
    found = checkpoint_files(run_dir)
    if not found:
        return (f"mpifed: the rounds logged stay in {run_dir / 'run.h5'}; the run wrote no checkpoint to continue "
                f"from ([checkpoint] every = K writes one every K rounds)")
    return (f"mpifed: the rounds logged stay in {run_dir / 'run.h5'}; continue the run from {found[0].name} "
            f"with: {resume_command(run_dir, ranks)}")


def resume_advice(run_dir: Path, ranks: int) -> str:
    """How to go on after a write of the run (of `ranks` processes) failed on a full disk: from its
    newest checkpoint, if any."""
    found = checkpoint_files(run_dir)
    if not found:
        return ("the run wrote no checkpoint to resume from: free space there, or choose another run.out "
                "(--out), and start it again")
    return (f"free space there, or move {run_dir} to a disk with room, then continue from {found[0].name} with: "
            f"{resume_command(run_dir, ranks)} (new runs: choose a run.out, --out, with room)")
