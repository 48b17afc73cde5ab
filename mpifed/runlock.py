"""One job at a time per run directory: rank 0 holds a lock on <run>/run.lock while its job runs.

Why: a live job's log is open in SWMR mode, which drops HDF5's own file lock, so a second launch
(a --resume typed while the job still runs, a SLURM requeue whose old ranks are still alive) could
not tell it from a log left open by a job that died: it would copy the log, replace it, and the live
job would go on writing to a file nobody sees, with both jobs pruning the same checkpoints. A POSIX
record lock (fcntl.lockf, honoured over NFS too) is released by the kernel when the holder exits,
however it exits, so a dead job never leaves a stale lock behind.
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
    _held[run_dir] = f  # locked: kept open from here on, whatever the note below does
    try:
        f.seek(0)
        f.truncate()
        since = datetime.datetime.now().isoformat(timespec="seconds")
        f.write(f"{socket.gethostname()} pid {os.getpid()} since {since}\n")
        f.flush()
    except OSError as err:
        raise _unwritable(err, run_dir) from err
    return True


def _unwritable(err: OSError, run_dir: Path) -> Exception:
    """The first write into a run directory failed: a full disk says so; anything else is left as is."""
    if is_disk_full(err):
        return disk_full(LOCK_NAME, run_dir, "free space there, or choose another run.out (--out)")
    return err
