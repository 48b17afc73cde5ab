"""The run's HDF5 log: rank 0 writes it, flushes every round, and readers may follow it live (SWMR).

Layout (schema 1); every name is documented in ATTRS and the *_DOCS tables below:
  attrs           ATTRS: versions, the resolved job, the command, world size, wait mode, data plane
  /ranks/<col>    (N,) one row per rank: RANK_DOCS
  /iter/<field>   (T, N) one row per round, one column per rank: ITER_DOCS
  /server/<name>  (T,) server-side series: SERVER_DOCS
  /eval/<name>    (E,) one row per evaluation: EVAL_DOCS
  /clients/<f>    (T, K) pooled clients only (more clients than client ranks, or sampled): per round, the
                  K clients that trained, in id order: CLIENT_DOCS
  /models         attrs of fitted models: memory.client<k>.<field> (static_bytes, per_sample_bytes,
                  ...), and the performance model when a run fits one
A crash loses at most the round in flight: every append is followed by a flush. A log is only ever
rewritten through a copy (resume, recover) that replaces it once complete, so a failure (a full
disk) leaves the old one as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from h5py import h5s

from mpifed.diskfull import disk_full, is_disk_full, resume_advice, sync_folder

SCHEMA = 1

# Every name the log holds, with what it means: the documentation's run-log page is generated from these
# (python -m mpifed.reference), so a name cannot be added here without its meaning.
ATTRS = {
    "schema": "layout version of this file (SCHEMA); a reader refuses a newer one",
    "mpifed_version": "the mpifed that wrote the log",
    "torch_version": "torch's version",
    "mpi4py_version": "mpi4py's version",
    "h5py_version": "h5py's version",
    "mpi_library": "the MPI library, as it names itself (first line of MPI_Get_library_version)",
    "job": "the resolved job, as TOML (a resume's --set included)",
    "command": "the command line of rank 0",
    "world_size": "ranks in the job (server + client ranks)",
    "started": "start time, ISO 8601, seconds",
    "wait_mode": "how ranks waited in collectives: sleep (back-off) or poll (comm.wait)",
    "data_plane": "the engine that moved the large buffers: mpi-host, mpi-device or nccl (comm.data)",
    "data_plane_reason": "why that plane was chosen",
    "n_params": "parameters of the model (float32 values in the flat model)",
    "n_buffers": "float buffer values (BatchNorm statistics) that travel with the update",
    "resumes": "one note per resume: the round it started at (present once resumed)",
}
# Per rank, one row each (N,).
RANK_DOCS = {
    "role": "server, client <k>, or worker (a rank of pooled clients)",
    "host": "host name",
    "device": "cpu or cuda:<i>",
    "profile": "the device profile's name (- for the server, pooled for a rank of pooled clients)",
    "emulated": "true when the profile is emulated (slowed compute or link)",
    "speed": "the profile's compute speed, relative to the device",
    "memory_budget": "the profile's memory budget, bytes (0 = the device's own memory)",
    "bandwidth": "the profile's emulated link bandwidth, bytes/s (0 = the real link)",
    "latency": "the profile's emulated link latency, seconds",
    "data_size": "training samples of this rank's client (server, and a rank of pooled clients: the whole "
                 "training split)",
    "requested_batch": "the batch the job asked for, samples",
    "max_batch": "the memory model's largest batch, samples (0 = not sized)",
    "batch": "the batch it trains with, samples (the server's row: the global batch)",
    "sized_budget": "bytes the memory model sized this rank's clients against (0 = not sized)",
    "budget_bound": "what bound that budget: a profile's memory, the free device memory, or the host's "
                    "smallest of MemAvailable, memory cgroup and SLURM allocation",
}
# Per round and rank (T, N). Times in seconds, sizes in bytes, batch in samples.
ITER_DOCS = {
    "t_down": "receiving (client) or sending (server) the model broadcast",
    "t_compute": "forward/backward of the local steps, emulated slow-down included",
    "t_encode": "building the update payload (flatten, weight, compress)",
    "t_up": "the update reduce/gather, emulated link delay included (server: waiting for all clients)",
    "t_decode": "server: decode, aggregate and optimizer step",
    "t_eval": "server: evaluation on the test set",
    "t_wait": "straggler wait inside t_up: t_up - min over clients of t_up (server: all of t_up); an emulated "
              "slow link's own transfer time is counted here too",
    "t_emul": "injected emulation delay (slower compute, slower link) included in the times above",
    "t_iter": "the whole round on this rank",
    "t_iter_pred": "the performance model's prediction of t_iter, made before the round (NaN: no model)",
    "batch": "samples trained this round (all local steps; a pooled worker: the sum over its clients)",
    "bytes_up": "bytes of the update this rank sent (server: received from all clients)",
    "bytes_down": "bytes of the model this rank received (server: sent to all clients)",
    "loss": "client: loss of its batch (before the update); server: batch-weighted mean",
    "grad_norm": "L2 norm of this rank's update as the server decodes it (server: of the aggregate)",
    "rejected": "1 when the server refused this client's payload this round (server: how many)",
    "acc": "client: the task's metric on its batch, scored with the loss (before the update; accuracy: the "
           "share correct); server: batch-weighted mean",
}
# Pooled clients only (more clients than client ranks, or sampled): per round the K clients that trained,
# in id order (T, K).
CLIENT_DOCS = {
    "id": "the client",
    "rank": "the worker rank that trained it this round",
    "batch": "its samples this round (all local steps)",
    "loss": "mean loss of its local steps",
    "t_compute": "its local steps, emulated slow-down included",
    "grad_norm": "L2 norm of its (unweighted) update, as the server decodes it",
    "bytes_up": "its own payload (gathered codecs); 0 where it travels inside its worker's sum",
    "rejected": "1 when the server refused its payload this round",
    "acc": "the task's metric on the batches of its local steps (accuracy: the share correct)",
}
# Server series (T,): the scaling policy's statistics are mpifed.scaling.STATS_KEYS.
SERVER_DOCS = {
    "lr": "learning rate of the round's step",
    "global_batch": "samples of the round's global batch B",
    "train_loss": "batch-weighted mean of the clients' losses",
    "wall": "seconds since the start of training",
    "grad_norm": "L2 norm of the aggregated update",
    "rel_change": "relative change of the window-mean gradient norm between consecutive windows",
    "critical": "1 in a critical phase (the first scaling.warmup rounds, or a change above scaling.threshold)",
    "scale": "the step factor applied to the aggregate (1 = none)",
    "noise_scale": "gradient noise scale B_simple = tr(Sigma) / |G|^2 (smoothed by scaling.noise_ema)",
    "sigma_trace": "tr(Sigma), the per-sample gradient variance summed over coordinates",
    "signal_sq": "|G|^2, the squared norm of the true gradient, estimated",
    "teacher_std": "the teacher's noise standard deviation per coordinate (0 = no noise added)",
    "skipped": "1 in a round whose step the server skipped (no usable update: mpifed.skipped)",
    "train_acc": "batch-weighted mean of the clients' metric on their batches (accuracy), beside train_loss",
}
# Evaluations (E,): one row each time the server evaluates (train.eval_every: round 0, the initial model, then
# every eval_every rounds, and after the last round).
EVAL_DOCS = {
    "round": "the round after which it evaluated (0: the initial model, before the first round)",
    "test_loss": "mean loss on the test set",
    "test_acc": "the task's metric on the test set (accuracy: the share of correct predictions)",
    "wall": "seconds since the start of training",
}
# /models attributes: "<model>.<field>", the model's name by what it describes.
MODELS_DOCS = {
    "memory.client<k>": "client k's memory model (one client a rank): static and per-sample bytes, the method "
                        "(analytic walk or measured steps), max batch; on CUDA the verified peak beside the predicted",
    "memory.profile.<name>": "the memory model of a device profile (pooled clients), as above",
    "perf.client<k>": "the performance model's compute curve of client k (plan.mode other than off)",
    "perf.profile.<name>": "the compute curve of a device profile (pooled clients with plan.mode = predict)",
    "perf.comm": "the performance model's collective costs (model and payload bytes)",
    "perf.round": "the performance model's round terms and the start-up prediction",
}
ITER_FIELDS = tuple(ITER_DOCS)
CLIENT_FIELDS = tuple(CLIENT_DOCS)
SERVER_FIELDS = tuple(SERVER_DOCS)
EVAL_FIELDS = tuple(EVAL_DOCS)
RANK_COLUMNS = tuple(RANK_DOCS)


def column(name: str) -> int:
    return ITER_FIELDS.index(name)


class RunWriter:
    """Creates every dataset up front (SWMR forbids creating them later), then appends rows.

    A write that fails (a full disk) is reported as itself: close() after it drops HDF5's follow-up
    errors, which would otherwise replace it. The file has no chunk cache: a row goes to disk when it is
    written, so a full disk fails that write (with its errno) and leaves no dirty chunk behind, which
    HDF5 2.0 would try to write again at exit and crash on."""

    def __init__(self, path: Path, attrs: dict, ranks: dict[str, list], clients_per_round: int = 0):
        self.path, self.failed, self.rounds, self.evals = Path(path), False, 0, 0
        self.world_size = len(ranks["role"])  # for the resume command a full disk's message offers
        with self._guard(closing=True):
            self.file = _open_log(self.path, "w")
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
            self.clients = {f: self._series(f"clients/{f}", (clients_per_round,)) for f in CLIENT_FIELDS
                            if clients_per_round}
            self.file.create_group("models")

    @classmethod
    def reopen(cls, path: Path, rounds: int, note: str, job_text: str) -> "RunWriter":
        """Append to an existing log from round `rounds` on (resume): rows logged after the
        checkpoint are dropped, so the log ends with no duplicated and no missing rounds.

        The log is not changed in place: the kept rows go into a copy that replaces it once complete,
        so a resume that fails (a full disk) leaves the log readable and as it was."""
        path = Path(path)
        with h5py.File(path, "r") as src:
            if src.attrs.get("schema") != SCHEMA:
                raise ValueError(f"{path} has log schema {src.attrs.get('schema')}, this mpifed writes {SCHEMA}")
            logged, world_size = src["iter/t_iter"].shape
            if logged < rounds:
                raise ValueError(f"{path} holds {logged} rounds but the checkpoint resumes at {rounds}")
            evals = int((src["eval/round"][:] <= rounds).sum())
            resumes = [*map(str, src.attrs.get("resumes", [])), note]

        def trim(dst: h5py.File) -> None:
            series = (*(f"iter/{f}" for f in ITER_FIELDS), *(f"server/{f}" for f in SERVER_FIELDS),
                      *(f"clients/{f}" for f in CLIENT_FIELDS if "clients" in dst))
            for name in series:
                if name not in dst:  # a series this log predates: NaN for its rounds (SWMR cannot add one later),
                    group = dst[name.split("/")[0]]  # one column per rank or client, as its group's others
                    row = next(iter(group.values())).shape[1:]
                    dst.create_dataset(name, shape=(rounds, *row), maxshape=(None, *row), dtype="f8",
                                       chunks=(64, *row), fillvalue=np.nan)
                dst[name].resize(min(rounds, dst[name].shape[0]), axis=0)
            for name in EVAL_FIELDS:
                dst[f"eval/{name}"].resize(evals, axis=0)
            dst.attrs["resumes"] = resumes
            dst.attrs["job"] = job_text  # --set may have changed it (e.g. more rounds)

        _rewrite(path, ".resuming", trim, f"the resumed log (a copy of {path.name}; resuming never changes "
                                          f"the log in place)")
        self = cls.__new__(cls)
        self.path, self.failed, self.rounds, self.evals, self.world_size = path, False, rounds, evals, world_size
        with self._guard(closing=True):
            self.file = _open_log(path, "r+")
            self.iter = {f: self.file[f"iter/{f}"] for f in ITER_FIELDS}
            self.server = {f: self.file[f"server/{f}"] for f in SERVER_FIELDS}
            self.eval = {f: self.file[f"eval/{f}"] for f in EVAL_FIELDS}
            self.clients = {f: self.file[f"clients/{f}"] for f in CLIENT_FIELDS if "clients" in self.file}
            self.begin_swmr()
        return self

    def _series(self, name: str, row: tuple) -> h5py.Dataset:
        return self.file.create_dataset(name, shape=(0, *row), maxshape=(None, *row), dtype="f8",
                                        chunks=(64, *row), fillvalue=np.nan)

    def set_model_attrs(self, name: str, values: dict) -> None:
        """Store a fitted model's parameters, before begin_swmr(): SWMR allows no new attributes (HDF5
        before 2.0)."""
        if self.file.swmr_mode:
            raise RuntimeError(f"set_model_attrs({name!r}) after begin_swmr(): SWMR allows no new attributes")
        for key, value in values.items():
            self.file["models"].attrs[f"{name}.{key}"] = value

    def begin_swmr(self) -> None:
        """Readers (mpifed watch) may follow the log from here on; nothing new can be created after. Called
        once set-up has written everything static: a job that dies in its first round then leaves a log
        that SWMR readers and recover() can open, not one marked open by a plain writer."""
        if not self.file.swmr_mode:
            self.file.swmr_mode = True

    def append_round(self, table: np.ndarray, server: dict[str, float], clients: np.ndarray | None = None) -> None:
        """One round: the (ranks, ITER_FIELDS) table, the server's series, and for pooled clients the
        (K, CLIENT_FIELDS) table of the clients that trained."""
        rows = [*((self.iter[name], table[:, i]) for i, name in enumerate(ITER_FIELDS)),
                *((ds, server.get(name, np.nan)) for name, ds in self.server.items()),
                *((self.clients[name], clients[:, i]) for i, name in enumerate(CLIENT_FIELDS if clients is not None
                                                                               else ()))]
        self._append_whole(rows, self.rounds)
        self.rounds += 1

    def append_eval(self, row: dict[str, float]) -> None:
        self._append_whole([(ds, row[name]) for name, ds in self.eval.items()], self.evals)
        self.evals += 1

    def _append_whole(self, rows: list[tuple[h5py.Dataset, object]], row: int) -> None:
        """Write `row` of every dataset in `rows` (one round, or one evaluation), then flush: all of
        them or none. A write that fails part way (a full disk) shrinks the datasets it had grown back
        to `row` rows: the log it leaves holds whole rounds, not /iter/t_down a round longer than /iter/loss."""
        with self._guard():
            self.begin_swmr()
            try:
                for ds, values in rows:
                    _append(ds, row, values)
                self.file.flush()
            except BaseException:
                for ds, _ in rows:
                    with contextlib.suppress(Exception):  # the write's own error is the one to report
                        if ds.id.shape[0] > row:
                            ds.id.set_extent((row, *ds.id.shape[1:]))
                raise

    def close(self) -> None:
        """Close the file. After a failed write HDF5 fails here too (it cannot flush either): that
        follow-up is dropped, so that the first error is the one reported."""
        file = getattr(self, "file", None)
        try:
            if file is not None:
                file.close()
        except Exception as err:  # noqa: BLE001 - after a failure, the failure is what to report
            if not self.failed:
                self._failed(err)
                raise

    @contextlib.contextmanager
    def _guard(self, closing: bool = False):
        """Every write of the log: a failure is recorded (and said plainly for a full disk); while the
        log is being set up, it is closed too, since no writer will be returned to close it."""
        try:
            yield
        except BaseException as err:
            self.failed = True
            if closing:
                self.close()
            self._failed(err)
            raise

    def _failed(self, err: BaseException) -> None:
        """Note that a write failed (close() then keeps quiet); a full disk raises the error that says so."""
        self.failed = True
        if is_disk_full(err):
            kept = f"the {self.rounds} rounds logged before stay in it; " if self.rounds else ""
            raise disk_full(f"run log {self.path}", self.path.parent,
                            kept + resume_advice(self.path.parent, self.world_size)) from err


def _append(ds: h5py.Dataset, row: int, values) -> None:
    """Grow `ds` to row + 1 rows and write `values` there (what ds.resize and ds[row] = values do), with
    h5py's low-level calls: the high-level ones spend ~0.2 ms of Python each, and a round appends to
    28 datasets while every client waits for the server's next broadcast."""
    shape = ds.id.shape[1:]
    data = np.ascontiguousarray(values, dtype=np.float64).reshape(1, *shape)
    ds.id.set_extent((row + 1, *shape))
    space = ds.id.get_space()
    space.select_hyperslab((row, *(0 for _ in shape)), data.shape)
    ds.id.write(h5s.create_simple(data.shape), space, data)


def _open_log(path: Path, mode: str) -> h5py.File:
    """A log opened for writing; without chunk cache (RunWriter says why)."""
    return h5py.File(path, mode, libver="latest", rdcc_nbytes=0)


def _rewrite(path: Path, suffix: str, edit: Callable[[h5py.File], None], what: str) -> None:
    """Copy the log at `path` into <path><suffix>, let `edit` change the copy, fsync it and rename it
    over `path`: the log is replaced whole or not at all. A failure removes the copy and leaves the
    log as it was; a full disk raises a DiskFullError that says so."""
    fresh = path.with_name(path.name + suffix)
    try:
        with open_run(path) as src, _open_log(fresh, "w") as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for name in src:
                src.copy(src[name], dst, name=name)
            edit(dst)
        shutil.copymode(path, fresh)
        with open(fresh, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(fresh, path)
    except BaseException as err:
        fresh.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full(what, path.parent, f"{path.name} and the checkpoints are unchanged: free space there "
                                               f"and resume again, or move {path.parent} to a disk with room and "
                                               f"resume it there", path.stat().st_size) from err
        err.add_note(f"mpifed: {path} is unchanged")
        raise
    sync_folder(path.parent)  # the rename itself survives a crash too


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
    A failed copy (a full disk) is removed and the log left as it was. A log that a live job holds
    locked fails with another error, which this leaves to the caller."""
    path = Path(path)
    try:
        h5py.File(path, "r").close()
        return False
    except OSError as err:
        if LEFT_OPEN not in str(err):
            raise
    _rewrite(path, ".recovering", lambda dst: None,
             f"the copy of {path.name} that appending to it needs (a job that died left it open)")
    return True
