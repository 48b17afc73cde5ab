"""Read a run log into plain numpy arrays, checking first that it is an mpifed log we understand.

Reading is lenient about content and strict about identity: a file must carry the `schema`
attribute and the few datasets every summary needs; any other dataset (/server/scale,
/server/critical, /server/noise_scale, ...: a run without scaling or an older log may lack them) is
loaded when present and simply absent otherwise. Logs of running jobs work too: they are opened with SWMR, and
the series are cut to the rounds that every dataset already holds (the writer grows them one by one).
A truncated file is refused at once: HDF5 checks the size only on a plain (non-SWMR) open.
"""

from __future__ import annotations

import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from mpifed.runlog import LEFT_OPEN, SCHEMA, open_run

REQUIRED = ("ranks/role", "iter/t_iter", "iter/batch")
# How HDF5 refuses a file shorter than its superblock says it is: "truncated file: eof = N, ..., stored_eof = M".
TRUNCATED = re.compile(r"truncated file: eof = (\d+).*?stored_eof = (\d+)")
# How a plain open refuses a log that a job holds (or held when it crashed); SWMR reads those.
IN_USE = (LEFT_OPEN, "unable to lock file")
SUGGESTED = 3  # run directories named when a path holds no run.h5 itself


class RunLogError(Exception):
    """A path that cannot be analysed; the message says why and what to do."""


class LogUnavailable(RunLogError):
    """No file there yet, or one HDF5 cannot open: perhaps a job that is still creating it."""


@dataclass(frozen=True)
class Run:
    """One run log in memory. Series are float arrays with NaN where nothing was measured."""

    path: Path
    attrs: dict[str, object]
    job: dict                       # the resolved job (TOML parsed), {} when the log has none
    ranks: dict[str, np.ndarray]    # (N,) per rank; strings decoded
    iter: dict[str, np.ndarray]     # (T, N) per round and rank
    server: dict[str, np.ndarray]   # (T,)
    eval: dict[str, np.ndarray]     # (E,)
    models: dict[str, object] = field(default_factory=dict)
    pooled: dict[str, np.ndarray] = field(default_factory=dict)  # (T, K) /clients, when clients were pooled

    @property
    def rounds(self) -> int:
        return self.iter["t_iter"].shape[0]

    @property
    def world_size(self) -> int:
        return len(self.ranks["role"])

    @property
    def clients(self) -> np.ndarray:
        """Rank indices of the clients (every rank whose role is not 'server')."""
        return np.flatnonzero(self.ranks["role"] != "server")

    @property
    def name(self) -> str:
        """The job's run.name, else the name of the log's directory."""
        return str(self.job.get("run", {}).get("name") or self.path.parent.name)


def resolve(path: str | Path) -> Path:
    """Accept a run directory for its run.h5; refuse missing paths with what to give instead."""
    p = Path(path)
    if p.is_dir() and not (p / "run.h5").exists():
        # LogUnavailable, not a final error: `mpifed watch` waits in a run directory for a job to create its log.
        runs = sorted(d for d in p.iterdir() if (d / "run.h5").is_file())
        if not runs:
            raise LogUnavailable(f"{path} holds no run.h5 (nor do its folders): give a run directory that "
                                 f"`mpifed train` has written its run.h5 in, or that run.h5")
        more = f" (and {len(runs) - SUGGESTED} more)" if len(runs) > SUGGESTED else ""
        raise LogUnavailable(f"{path} holds no run.h5: give a run directory ({p / '<name>'}) or its run.h5; "
                             f"it holds runs: {', '.join(map(str, runs[:SUGGESTED]))}{more}")
    if p.is_dir():
        p = p / "run.h5"
    if not p.exists():
        raise LogUnavailable(f"{path}: no such file; give a run's log, runs/<name>/run.h5 (or its directory)")
    return p


def open_log(path: str | Path) -> tuple[Path, h5py.File]:
    """Open and check a log (SWMR when a job is writing it); the caller closes the file."""
    p = resolve(path)
    f = _open(p)
    try:
        check(f, p)
    except RunLogError:
        f.close()
        raise
    return p, f


def _open(p: Path) -> h5py.File:
    """A plain open first: unlike an SWMR open, it refuses a truncated or damaged file at once, where SWMR
    would retry each bad read for minutes. Only a log in use by a job (writing it, or crashed with it
    open) is then opened with SWMR."""
    for attempt in range(3):
        try:
            return h5py.File(p, "r")
        except OSError as e:
            error = str(e)
        sizes = TRUNCATED.search(error)
        if not sizes:
            break
        if attempt == 2:
            have, want = (int(n) for n in sizes.groups())
            raise RunLogError(f"{p} is truncated ({have:,} of {want:,} bytes): the copy is incomplete or the "
                              f"disk filled; copy it again, or free disk space and rerun the job")
        time.sleep(0.1)  # a live writer may be between recording a larger size and writing it: look again
    if any(reason in error for reason in IN_USE):
        try:
            return open_run(p)
        except OSError as e:
            error = str(e)
    raise LogUnavailable(f"{p}: not an HDF5 file, or a damaged one ({error}); "
                         f"give the run.h5 that `mpifed train` wrote")


def check(f: h5py.File, p: Path) -> None:
    """Refuse files that are not mpifed logs, or that a newer mpifed wrote in a layout we don't know."""
    if "schema" not in f.attrs:
        raise RunLogError(f"{p}: not an mpifed run log (no 'schema' attribute); "
                          f"give the run.h5 that `mpifed train` wrote")
    schema = f.attrs["schema"]
    if not isinstance(schema, (int, np.integer)):
        raise RunLogError(f"{p}: its 'schema' attribute is {schema!r:.40}, not an integer; "
                          f"not a log that `mpifed train` wrote, or a damaged one")
    schema = int(schema)
    if schema > SCHEMA:
        raise RunLogError(f"{p}: written with log schema {schema}, but this mpifed reads schema {SCHEMA} "
                          f"and older; upgrade mpifed (pip install -U mpifed) to analyse it")
    missing = [name for name in REQUIRED if name not in f]
    if missing:
        raise RunLogError(f"{p}: not a complete mpifed run log (missing {', '.join(missing)}); "
                          f"was it written by `mpifed train`?")


def load_run(path: str | Path) -> Run:
    """Read a whole log (or a run directory holding run.h5) into a Run."""
    p, f = open_log(path)
    with f:
        return read(f, p)


def read(f: h5py.File, p: Path) -> Run:
    """Build a Run from an open, checked log."""
    attrs = {key: _plain(value) for key, value in f.attrs.items()}
    try:
        job = tomllib.loads(attrs["job"]) if isinstance(attrs.get("job"), str) else {}
    except tomllib.TOMLDecodeError:
        job = {}
    ranks = {name: _column(ds) for name, ds in f["ranks"].items()}
    iters = _group(f, "iter")
    server = _group(f, "server")
    rounds = min(len(a) for a in (*iters.values(), *server.values()))
    iters = {k: v[:rounds] for k, v in iters.items()}
    server = {k: v[:rounds] for k, v in server.items()}
    evals = _group(f, "eval")
    n_eval = min((len(a) for a in evals.values()), default=0)
    evals = {k: v[:n_eval] for k, v in evals.items()}
    models = {k: _plain(v) for k, v in f["models"].attrs.items()} if "models" in f else {}
    pooled = {k: v[:rounds] for k, v in _group(f, "clients").items()}
    return Run(path=p, attrs=attrs, job=job, ranks=ranks, iter=iters, server=server, eval=evals, models=models,
               pooled=pooled)


def _group(f: h5py.File, name: str) -> dict[str, np.ndarray]:
    if name not in f:
        return {}
    out = {}
    for key, ds in f[name].items():
        if isinstance(ds, h5py.Dataset):
            ds.refresh()  # see rows a live writer flushed since the file was opened
            out[key] = np.asarray(ds[()], dtype=float)
    return out


def _column(ds: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.array(ds.asstr()[()], dtype=object)
    return np.asarray(ds[()])


def _plain(value: object) -> object:
    """h5py attributes as plain Python values (str, int, float, list)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
