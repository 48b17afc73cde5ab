"""One job at a time per run directory: rank 0 holds a lock on <run>/run.lock while its job runs.

Why: a live job's log is open in SWMR mode, which drops HDF5's own file lock, so a second launch
(a --resume typed while the job still runs, a SLURM requeue whose old ranks are still alive) could
not tell it from a log left open by a job that died: it would copy the log, replace it, and the live
job would go on writing to a file nobody sees, with both jobs pruning the same checkpoints. A POSIX
record lock (fcntl.lockf, honoured over NFS too) is released by the kernel when the holder exits,
however it exits, so a dead job never leaves a stale lock behind; a job that ends of itself also
removes the file (`release`), so a finished run directory holds only the run's files.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
from pathlib import Path

from mpifed.config import JobError
from mpifed.diskfull import disk_full, is_disk_full

LOCK_NAME = "run.lock"

_held: dict[Path, object] = {}
"""Open lock files of this process, kept for its lifetime (closing one would release its lock)."""

_BUSY = (errno.EACCES, errno.EAGAIN)


def hold(run_dir: Path) -> bool:
    """Lock `run_dir` for this process, or raise JobError naming the job that holds it. False when the
    file system offers no locks (then nothing protects the directory, as before locks existed)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return True
    path = run_dir / LOCK_NAME
    try:
        f = open(path, "a+")
    except OSError as err:
        raise _unwritable(err, run_dir) from err
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if err.errno in _BUSY:
            raise JobError(f"{run_dir} is in use by a running job ({holder}); wait for it to end, or stop it "
                           f"(Ctrl-C, scancel) and resume then (nothing was changed)") from None
        return False
    if not _still_named(f, path):  # its job ended and removed it (`release`) while we opened it: lock anew
        f.close()
        return hold(run_dir)
    _held[run_dir] = f  # locked: kept open from here on, whatever the note below does
    try:  # straight to the file, no buffer: a note a full disk refused must not fail again at close
        os.ftruncate(f.fileno(), 0)
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.write(f.fileno(), f"{socket.gethostname()} pid {os.getpid()} since {since}\n".encode())
    except OSError as err:
        raise _unwritable(err, run_dir) from err
    return True


def release(run_dir: Path) -> None:
    """A job that ended of itself (finished, stopped after its checkpoint, diverged) removes its lock
    file, then lets go of the lock; one that dies leaves the file, unlocked, which the next launch
    takes over. A launch that opened the file just before it was removed sees that (`_still_named`)."""
    run_dir = Path(run_dir).resolve()
    f = _held.pop(run_dir, None)
    if f is None:
        return
    try:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
    finally:
        f.close()


def release_all() -> None:
    """`release` every run directory this process holds: a launch refused before it changed anything
    leaves its run directory as it found it."""
    for run_dir in list(_held):
        release(run_dir)


def _still_named(f, path: Path) -> bool:
    """Whether the open file `f` is still the one at `path` (not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _unwritable(err: OSError, run_dir: Path) -> Exception:
    """The first write into a run directory failed: a full disk says so; anything else is left as is."""
    if is_disk_full(err):
        return disk_full(LOCK_NAME, run_dir, "free space there, or choose another run.out (--out)")
    return err


def holds_files(run_dir: Path) -> bool:
    """Whether a run directory holds anything but its lock (which a failed start-up leaves behind)."""
    return any(p.name != LOCK_NAME for p in Path(run_dir).iterdir())
