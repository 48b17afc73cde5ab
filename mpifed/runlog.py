"""The run's HDF5 log: rank 0 writes it, flushes every round, and readers may follow it live (SWMR).

Layout (schema 1):
  attrs           schema, versions (mpifed, torch, mpi4py, MPI library), job (resolved TOML),
                  command, world_size, hosts, started (ISO time)
  /ranks/<col>    (N,) one row per rank: role, host, device, profile, emulated, speed, memory_budget,
                  bandwidth, latency, data_size, requested_batch, max_batch (memory model; 0 = not
                  sized), batch (what it trains with; the server's row holds the global batch)
  /iter/<field>   (T, N) one row per round, one column per rank; ITER_FIELDS below, seconds/bytes/samples
  /server/<name>  (T,) server-side series: SERVER_FIELDS below
  /eval/<name>    (E,) round, test_loss, test_acc, wall
  /models         attrs of fitted models: memory.client<k>.<field> (static_bytes, per_sample_bytes,
                  ...), and the performance model when a run fits one
A crash loses at most the round in flight: every append is followed by a flush.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

SCHEMA = 1

# Per-rank, per-round columns. Times in seconds, sizes in bytes, batch in samples.
ITER_FIELDS = (
    "t_down",       # receiving (client) or sending (server) the model broadcast
    "t_compute",    # forward/backward of the local steps, emulated slow-down included
    "t_encode",     # building the update payload (flatten, weight, compress)
    "t_up",         # the update reduce/gather, emulated link delay included (server: waiting for all clients)
    "t_decode",     # server: decode, aggregate and optimizer step
    "t_eval",       # server: evaluation on the test set
    "t_wait",       # straggler wait inside t_up: t_up - min over clients of t_up (server: all of t_up);
                    # an emulated slow link's own transfer time is counted here too
    "t_emul",       # injected emulation delay (slower compute, slower link) included in the times above
    "t_iter",       # the whole round on this rank
    "t_iter_pred",  # the performance model's prediction of t_iter, made before the round (NaN: no model)
    "batch",
    "bytes_up",
    "bytes_down",
    "loss",         # client: loss of its batch (before the update); server: batch-weighted mean
    "grad_norm",    # L2 norm of this rank's update as the server decodes it (server: of the aggregate)
    "rejected",     # 1 when the server refused this client's payload this round (server: how many)
)
# Server series: lr, global batch (samples), train loss (batch-weighted client mean), wall (s since
# start), and the scaling policy's statistics (mpifed.scaling.STATS_KEYS): norm of the aggregate,
# its relative change between windows, the critical flag, the applied scale, the gradient noise
# scale B_simple, tr(Sigma), |G|^2 and the teacher's noise std.
SERVER_FIELDS = ("lr", "global_batch", "train_loss", "wall", "grad_norm", "rel_change", "critical", "scale",
                 "noise_scale", "sigma_trace", "signal_sq", "teacher_std")
EVAL_FIELDS = ("round", "test_loss", "test_acc", "wall")
RANK_COLUMNS = ("role", "host", "device", "profile", "emulated", "speed", "memory_budget", "bandwidth",
                "latency", "data_size", "requested_batch", "max_batch", "batch")


def column(name: str) -> int:
    return ITER_FIELDS.index(name)


class RunWriter:
    """Creates every dataset up front (SWMR forbids creating them later), then appends rows."""

    def __init__(self, path: Path, attrs: dict, ranks: dict[str, list]):
        self.file = h5py.File(path, "w", libver="latest")
        for key, value in attrs.items():
            self.file.attrs[key] = str(value) if isinstance(value, str) else value  # plain str: h5py
            # cannot store str subclasses such as torch.__version__
        self.file.attrs["schema"] = SCHEMA
        n = len(ranks["role"])
        group = self.file.create_group("ranks")
        for key in RANK_COLUMNS:
            values = ranks[key]
            if isinstance(values[0], str):
                group.create_dataset(key, data=np.array(values, dtype=h5py.string_dtype()))
            else:
                group.create_dataset(key, data=np.asarray(values))
        self.iter = {f: self._series(f"iter/{f}", (n,)) for f in ITER_FIELDS}
        self.server = {f: self._series(f"server/{f}", ()) for f in SERVER_FIELDS}
        self.eval = {f: self._series(f"eval/{f}", ()) for f in EVAL_FIELDS}
        self.file.create_group("models")
        self.rounds = 0
        self.evals = 0

    @classmethod
    def reopen(cls, path: Path, rounds: int, note: str, job_text: str) -> "RunWriter":
        """Append to an existing log from round `rounds` on (resume): rows logged after the
        checkpoint are dropped, so the log ends with no duplicated and no missing rounds."""
        self = cls.__new__(cls)
        self.file = h5py.File(path, "r+", libver="latest")
        if self.file.attrs.get("schema") != SCHEMA:
            raise ValueError(f"{path} has log schema {self.file.attrs.get('schema')}, this mpifed writes {SCHEMA}")
        self.iter = {f: self.file[f"iter/{f}"] for f in ITER_FIELDS}
        self.server = {f: self.file[f"server/{f}"] for f in SERVER_FIELDS}
        self.eval = {f: self.file[f"eval/{f}"] for f in EVAL_FIELDS}
        for ds in (*self.iter.values(), *self.server.values()):
            ds.resize(min(rounds, ds.shape[0]), axis=0)
        self.evals = int((self.eval["round"][:] <= rounds).sum())
        for ds in self.eval.values():
            ds.resize(self.evals, axis=0)
        self.rounds = self.iter["t_iter"].shape[0]
        if self.rounds != rounds:
            raise ValueError(f"{path} holds {self.rounds} rounds but the checkpoint resumes at {rounds}")
        resumes = list(self.file.attrs.get("resumes", []))
        self.file.attrs["resumes"] = [*map(str, resumes), note]
        self.file.attrs["job"] = job_text  # --set may have changed it (e.g. more rounds)
        self.file.flush()
        self.file.swmr_mode = True
        return self

    def _series(self, name: str, row: tuple) -> h5py.Dataset:
        return self.file.create_dataset(name, shape=(0, *row), maxshape=(None, *row), dtype="f8",
                                        chunks=(64, *row), fillvalue=np.nan)

    def set_model_attrs(self, name: str, values: dict) -> None:
        """Store a fitted model's parameters, before the first round: SWMR, which begins with it,
        allows no new attributes (HDF5 before 2.0)."""
        if self.file.swmr_mode:
            raise RuntimeError(f"set_model_attrs({name!r}) after the first round: SWMR allows no new attributes")
        for key, value in values.items():
            self.file["models"].attrs[f"{name}.{key}"] = value

    def _begin_swmr(self) -> None:
        """Readers (mpifed watch) may follow the log from here on; nothing new can be created after."""
        if not self.file.swmr_mode:
            self.file.swmr_mode = True

    def append_round(self, table: np.ndarray, server: dict[str, float]) -> None:
        self._begin_swmr()
        t = self.rounds
        for i, name in enumerate(ITER_FIELDS):
            ds = self.iter[name]
            ds.resize(t + 1, axis=0)
            ds[t] = table[:, i]
        for name, ds in self.server.items():
            ds.resize(t + 1, axis=0)
            ds[t] = server.get(name, np.nan)
        self.rounds += 1
        self.file.flush()

    def append_eval(self, row: dict[str, float]) -> None:
        self._begin_swmr()
        e = self.evals
        for name, ds in self.eval.items():
            ds.resize(e + 1, axis=0)
            ds[e] = row[name]
        self.evals += 1
        self.file.flush()

    def close(self) -> None:
        self.file.close()


LEFT_OPEN = "already open for write"
"""How HDF5 refuses a plain open of a log whose writer is running, or died without closing it."""


def open_run(path: str | Path) -> h5py.File:
    """Open a run log for reading; works while the run is still writing it (SWMR)."""
    return h5py.File(path, "r", libver="latest", swmr=True)


def recover(path: Path) -> bool:
    """Make a log whose writer died appendable again; True if it was needed.

    A writer killed without closing the file (SIGKILL, a lost node, the launcher ending rank 0 after
    another rank's MPI_Abort) leaves it marked "open for write", and HDF5 then refuses to open it for
    appending, although every round it logged was flushed. Its objects are copied into a fresh file
    (SWMR reads a marked file), which is fsynced and renamed over it: the rounds are kept, not lost.
    A log that a live job holds locked fails with another error, which this leaves to the caller."""
    try:
        h5py.File(path, "r").close()
        return False
    except OSError as err:
        if LEFT_OPEN not in str(err):
            raise
    fresh = path.with_name(path.name + ".recovering")
    with open_run(path) as src, h5py.File(fresh, "w", libver="latest") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            src.copy(src[name], dst, name=name)
    with open(fresh, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(fresh, path)
    return True
