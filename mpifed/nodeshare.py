"""Numpy arrays held once per node, not once per rank: an MPI-3 shared-memory window.

`share_on_node` splits the node-local communicator (`Split_type(COMM_TYPE_SHARED)`), and the node's
first rank allocates one window (`Win.Allocate_shared`) that holds every array, each at an offset
aligned to 64 bytes; the other ranks allocate 0 bytes and map the leader's segment (`Shared_query(0)`).
So every rank of a node reads the same physical pages: the kernel's proportional set size (PSS)
counts them once, split among the ranks, and the node's memory no longer grows with its ranks.
The arrays come either from `make()`, called on the leader alone (its private copies are dropped once
copied in; a `Blank` is only allocated, for rows written later), or from `fill=(spec, writer)`, where
every node rank writes its own share of the rows. `make()` may also return a small JSON-able `about`
dict that reaches every rank with the layout (what the other ranks need to know of the arrays).

Arrays named in `writable` stay writable after the set-up, for data made on demand: the window then
keeps its passive epoch open until `free()`, and `NodeArrays.sync()` (MPI_Win_sync) is the memory
barrier a writer calls between writing rows and publishing them (setting a flag), and a reader between
seeing the flag and reading the rows.

Why a window and not a memory-mapped file: no file is left to clean up after a crash, nothing here
assumes a shared filesystem or a path (the MPI library picks its own backing), and the MPI library maps
it node-locally under any launcher (mpirun, srun). Its limits: the memory lives until `free()` or MPI
finalize, and a view used after `free()` reads unmapped memory (drop the views first). MPICH backs the
window with a file in /dev/shm, unlinked once every rank has mapped it: a small /dev/shm (a container's
64 MB default) caps the window there.

Waiting is polite: the node's other ranks may wait many seconds while the leader loads or generates
data, on fewer cores than ranks, so every wait here is on non-blocking requests, handed to the
caller's `wait(requests)` (Exchange.wait) or polled with Testall and a back-off sleep growing to 5 ms.
Errors end every rank the same way: a `make()` that raises on a leader, or a `writer` that raises on
any rank, is reported to every rank of `comm` (a final allreduce of a flag over `comm`, the messages
gathered after it); the failing rank re-raises its own exception, every other rank raises
NodeShareError carrying the failing ranks' messages (NodeInputError, an InputError, when a leader's
make() failed on the user's input: its message is the whole story). No rank is left waiting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpifed.errors import InputError, StoppedEarly

ALIGN = 64  # bytes: each array's offset in the window (a cache line, and any dtype's alignment)
MAX_SLEEP = 5e-3  # seconds: the default wait's longest back-off sleep

Spec = Mapping[str, tuple[tuple[int, ...], np.dtype | str | type]]
Writer = Callable[[str, np.ndarray, int, int], None]


class NodeShareError(RuntimeError):
    """Another rank failed to make or fill the shared arrays; the message is that rank's error."""


class NodeInputError(NodeShareError, InputError):
    """Another rank's failure was the user's input (a dataset, a factory): its message says it all."""


@dataclass(frozen=True)
class Blank:
    """An array `make()` asks for but does not fill: allocated in the window (pages untouched until
    written, so they cost no memory), its rows written later through a writable view."""

    shape: tuple[int, ...]
    dtype: np.dtype | str | type


class NodeArrays:
    """Named numpy arrays held once per node in MPI shared memory; every rank of the node reads the
    same pages. `arrays` are read-only views into the window, valid until `free()`."""

    def __init__(self, arrays: dict[str, np.ndarray], win: MPI.Win | None, node: MPI.Intracomm | None,
                 owns_node: bool, about: dict | None = None, locked: bool = False):
        self.arrays, self.about = arrays, about or {}
        self._win, self._node, self._owns_node, self._locked = win, node, owns_node, locked

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def node(self) -> MPI.Intracomm | None:
        """The node communicator the window lives on (None once freed)."""
        return self._node

    def sync(self) -> None:
        """A memory barrier on the window (MPI_Win_sync), for writable arrays: after writing rows and
        before publishing them; after seeing them published and before reading them."""
        if self._win is not None and self._locked:
            self._win.Sync()

    def free(self) -> None:
        """Free the window (collective on the node communicator); idempotent. Drop every view first."""
        self.arrays = {}
        if self._win is not None:
            if self._locked:
                self._win.Unlock_all()
                self._locked = False
            self._win.Free()
            self._win = None
        if self._node is not None:
            if self._owns_node:
                self._node.Free()
            self._node = None


def share_on_node(comm: MPI.Intracomm, make: Callable[[], Mapping[str, np.ndarray]] | None = None,
                  wait: Callable[[list], None] | None = None, fill: tuple[Spec, Writer] | None = None,
                  node: MPI.Intracomm | None = None, writable: tuple[str, ...] = ()) -> NodeArrays:
    """Arrays held once per node; collective over `comm` (every rank calls it).

    make: called on the node's first rank only; returns {name: array or Blank} (numeric dtypes, any
        shapes), or ({name: array or Blank}, about) with `about` a JSON-able dict every rank receives.
    fill: (spec, writer) instead of make: spec {name: (shape, dtype)}, the same on every rank;
        `writer(name, view, start, stop)` writes rows [start, stop) (first axis) of the whole writable
        array `view`; each node rank writes its contiguous share of every array's rows.
    wait: waits for a list of MPI requests (e.g. Exchange.wait); default: Testall with a back-off sleep.
    node: the node communicator when the caller already has one (kept, not freed); default: split
        from `comm` with COMM_TYPE_SHARED, and freed by `NodeArrays.free()`.
    writable: names of arrays whose views stay writable (rows made on demand; see NodeArrays.sync).
    """
    if (make is None) == (fill is None):
        raise TypeError("share_on_node: give exactly one of make and fill")
    wait = wait or poll_politely
    owns_node = node is None
    if node is None:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    win, locked, failed, mine, about = None, False, None, None, {}  # failed: own exception; mine: its message
    try:
        if make is not None:
            layout, mine, failed, arrays, about = _agree_on_made(node, make, wait)
        else:
            spec, writer = fill
            layout, arrays = _layout(spec), None
            mine, failed = _same_spec(node, layout)
        if mine is None:  # the node agrees on a layout (a leader's failure reaches the whole node)
            win = MPI.Win.Allocate_shared(_total(layout) if node.rank == 0 else 0, 1, comm=node)
            win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch: Win.Sync orders the writes before the reads
            locked = True
            mem = np.frombuffer(win.Shared_query(0)[0], dtype=np.uint8)
            if arrays is not None:  # the leader copies its arrays in, dropping each once copied
                for name, dtype, shape, offset in layout:
                    if not isinstance(made := arrays.pop(name), Blank):
                        _view(mem, dtype, shape, offset)[...] = made
                arrays = None
            elif make is None:
                try:
                    _fill(node, layout, mem, writer)
                except Exception as err:  # noqa: BLE001 - reported to every rank below
                    failed, mine = err, f"{type(err).__name__}: {err}"
            del mem
            win.Sync()
        _agree(comm, mine, failed, wait)  # also the sync: no rank reads before every write is done
        if locked:
            win.Sync()
            if not writable:  # else the epoch stays open for NodeArrays.sync, until free()
                win.Unlock_all()
                locked = False
    except StoppedEarly:  # a signal ends the job at once: freeing the window would wait for the node's ranks
        raise
    except BaseException:
        if locked:
            win.Unlock_all()
        if win is not None:
            win.Free()
        if owns_node:
            node.Free()
        raise
    buffer = win.Shared_query(0)[0]
    mem = np.frombuffer(memoryview(buffer).toreadonly(), dtype=np.uint8)
    views = {}
    for name, dtype, shape, offset in layout:
        if name in writable:
            views[name] = _view(np.frombuffer(buffer, dtype=np.uint8), dtype, shape, offset)
        else:
            views[name] = view = _view(mem, dtype, shape, offset)
            view.flags.writeable = False
    return NodeArrays(views, win, node, owns_node, about, locked)


def _agree_on_made(node, make, wait):
    """The leader calls make() and sends the layout (or its failure) to the node's other ranks.
    Returns (layout, message or None, own exception or None, the leader's arrays or None, about)."""
    arrays, failed, mine = None, None, None
    if node.rank == 0:
        try:
            made = make()
            made, about = made if isinstance(made, tuple) else (made, {})
            arrays = {str(name): a if isinstance(a, Blank) else np.asarray(a) for name, a in dict(made).items()}
            for name, a in arrays.items():
                if np.dtype(a.dtype).hasobject:
                    raise TypeError(f"share_on_node: array {name!r} holds Python objects ({a.dtype}); "
                                    f"only plain data can live in shared memory")
            header = {"layout": _plain(_layout({name: (a.shape, a.dtype) for name, a in arrays.items()})),
                      "about": dict(about)}
        except Exception as err:  # noqa: BLE001 - sent to the node, re-raised here
            failed, arrays = err, None
            mine = f"{type(err).__name__}: {err}"
            header = {"error": mine, "input": isinstance(err, InputError)}
        payload = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        size = np.array([payload.size], dtype=np.int64)
    else:
        size = np.zeros(1, dtype=np.int64)
    wait([node.Ibcast(size, root=0)])  # the long wait: the leader is loading or generating
    if node.rank != 0:
        payload = np.empty(int(size[0]), dtype=np.uint8)
    wait([node.Ibcast(payload, root=0)])
    header = json.loads(payload.tobytes())  # names, dtypes, shapes: text, never unpickled
    if "error" in header:
        if node.rank and header["input"]:  # the leader's message says it all: the others show no traceback
            failed = NodeInputError
        return None, (mine if node.rank == 0 else ""), failed, None, {}  # "": known, the leader reports it
    return _unplain(header["layout"]), None, None, arrays, header["about"]


def _layout(spec: Spec) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """(name, dtype, shape, offset) of each array, offsets aligned to ALIGN bytes, in spec order."""
    out, offset = [], 0
    for name, (shape, dtype) in spec.items():
        dtype = np.dtype(dtype)
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
        if dtype.hasobject:
            raise TypeError(f"share_on_node: array {name!r} holds Python objects ({dtype})")
        offset = -(-offset // ALIGN) * ALIGN
        out.append((str(name), dtype, shape, offset))
        offset += dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    return out


def _plain(layout) -> list:
    """A layout as JSON can carry it: (name, dtype string, shape, offset)."""
    return [[name, dtype.str, list(shape), offset] for name, dtype, shape, offset in layout]


def _unplain(rows: list) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    return [(str(name), np.dtype(dtype), tuple(int(n) for n in shape), int(offset)) for name, dtype, shape, offset in rows]


def _same_spec(node, layout):
    """(message, exception) when the node's ranks were given different specs; (None, None) otherwise."""
    layouts = node.allgather(json.dumps(_plain(layout)))  # all arrive together: nothing slow ran before
    odd = [r for r, other in enumerate(layouts) if other != layouts[0]]
    if not odd:
        return None, None
    err = ValueError(f"share_on_node: fill spec differs between node ranks 0 and {odd}")
    return (str(err) if node.rank == 0 else ""), err


def _total(layout) -> int:
    end = max((off + dt.itemsize * int(np.prod(sh, dtype=np.int64)) for _, dt, sh, off in layout), default=0)
    return max(end, ALIGN)  # never a 0-byte window: Shared_query then gives a buffer to view


def _view(mem: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    return mem[offset: offset + nbytes].view(dtype).reshape(shape)


def _fill(node, layout, mem, writer) -> None:
    """This rank's contiguous share of every array's rows; a 0-d array is the leader's."""
    for name, dtype, shape, offset in layout:
        rows = shape[0] if shape else 1
        start, stop = rows * node.rank // node.size, rows * (node.rank + 1) // node.size
        if stop > start:
            writer(name, _view(mem, dtype, shape, offset), start, stop)


def _agree(comm, mine, failed, wait) -> None:
    """Every rank of comm learns whether any rank failed (and after the copy or fill: the final sync,
    so that no rank reads the window before it is whole); every rank then raises (`failed`: its own
    exception, or the class of NodeShareError to raise)."""
    flag = np.array([0 if mine is None else 1], dtype=np.int64)
    total = np.zeros(1, dtype=np.int64)
    wait([comm.Iallreduce(flag, total, op=MPI.MAX)])
    if not total[0]:
        return
    said = [(r, m) for r, m in enumerate(comm.allgather(mine)) if m]  # all are here now: no long wait
    if isinstance(failed, BaseException):
        raise failed
    raise (failed or NodeShareError)("; ".join(f"rank {r}: {m}" for r, m in said) or "another rank failed")


def poll_politely(requests: list) -> None:
    """Testall with a back-off sleep growing to MAX_SLEEP: a waiting rank leaves its core to others."""
    pause = 5e-5
    while not MPI.Request.Testall(requests):
        time.sleep(pause)
        pause = min(2 * pause, MAX_SLEEP)
