"""The per-round collectives, over contiguous numeric buffers (mpi4py's uppercase methods).

Nothing here pickles. Buffers larger than `chunk` elements travel in several calls, so a model
over 2 GiB works with an MPI that lacks MPI-4 large counts. Every collective is non-blocking and is
waited on in one of two ways: `poll` (Testall in a loop, or MPI's own Waitall when there is no
timeout: lowest latency, spins a core) or `sleep` (Testall with an exponential back-off capped at
`max_sleep`, and in a long wait at 1% of the time waited so far, at most 5 ms), which leaves the
core to ranks that compute when ranks outnumber cores (measured here: 7 spinning ranks slowed a
computing one 4.2x).
With a `timeout`, a wait that lasts longer ends the job (RankTimeout): a stopped, deadlocked or lost
rank would otherwise hold every other rank in its collective forever. Rank 0's message names that
rank (mpifed.rollcall); the other ranks leave the word to rank 0.
The roles hand torch tensors, CPU or CUDA, to `broadcast_tensor`, `to_host` and `to_device`: how a
device buffer reaches MPI (staged through a host buffer kept per tensor, since the MPI here sees host
memory only) is this module's business alone. The round's large buffers (`broadcast_tensor`,
`reduce_data`, `gather_bytes`) go through the job's data plane (mpifed.dataplane: MPI itself, or
torch.distributed's NCCL / gloo), whose work handles are waited on here like MPI's requests.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from mpi4py import MPI

from mpifed.dataplane import MpiDevicePlane, TorchPlane
from mpifed.errors import RankTimeout  # noqa: F401 - raised here, and imported from here
from mpifed.placement import Placement
from mpifed.rollcall import ANSWER_AFTER, LISTEN_EVERY, ROOT, Position, RollCall, answer, grace


LONG_WAIT_SHARE, LONG_WAIT_MAX = 0.01, 0.005
"""A polite wait's back-off grows past max_sleep once the wait is long: to this share of the time
already waited, at most LONG_WAIT_MAX seconds (measured: 2 pooled workers on 2 cores computed 1.35x
slower while rank 0 woke up every 0.2 ms)."""


SUSPENDED = 5.0
"""Seconds between two polls of one wait beyond which this rank itself was not running (the whole job
suspended: SLURM's scontrol suspend, preemption by suspension, Ctrl-Z): that gap is not counted as
waiting, or a job resumed after more than comm.timeout would abort at once. A poll takes microseconds
and a back-off sleep milliseconds at most, so only a stopped process sees such a gap."""


class Exchange:
    started = 0
    """Collectives this process has started: every rank starts the same ones in the same order, so a
    roll call compares these numbers to find a rank that is out of step."""

    def __init__(self, comm: MPI.Intracomm, polite: bool, chunk_bytes: int = 256 * 2**20,
                 max_sleep: float = 2e-4, timeout: float = 0.0, placement: Placement | None = None,
                 data: TorchPlane | MpiDevicePlane | None = None):
        self.comm, self.polite, self.max_sleep, self.timeout = comm, polite, max_sleep, timeout
        self.chunk_bytes = max(1, int(chunk_bytes))
        self.stage_bytes = self.chunk_bytes  # the model broadcast's pieces (`agree_pieces`)
        self._side: dict[torch.device, torch.cuda.Stream] = {}  # the copy stream of each device
        self.placement = placement  # names each rank's clients in a roll call
        self.data = data  # the round's large buffers: None = MPI's host path, else the plane
        self.data_plane = ("mpi-host", "")  # (name, why), for the run log
        self._staging: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}  # pinned host buffer, its array
        self._in_flight: dict[tuple, torch.cuda.Event] = {}  # a buffer's copy to the device, not yet done

    def _pieces(self, buf: np.ndarray) -> list[np.ndarray]:
        step = max(1, self.chunk_bytes // buf.itemsize)
        return [buf[i: i + step] for i in range(0, max(buf.size, 1), step)]

    def wait(self, requests: list, kind: str = "collective") -> None:
        """Wait for MPI requests or torch.distributed work handles (one kind a call), politely and timed."""
        Exchange.started += 1
        if not self.polite and not self.timeout:
            if requests and not isinstance(requests[0], MPI.Request):
                for work in requests:
                    work.wait()
            else:
                MPI.Request.Waitall(requests)
            return
        number = Exchange.started
        if _complete(requests):  # already done: nothing to time
            return
        waiting = _Waiting(self, requests, number, kind)
        if waiting.until(self.timeout or math.inf):  # timeout 0: wait for ever
            return
        here = Position(number, kind)
        waited_in = f"this rank waited {self.timeout:g} s (comm.timeout) in {here.describe()}"
        said = f"{waited_in}, which another rank never joined"
        advice = "If rounds really take this long, raise comm.timeout"
        if self.comm.rank == ROOT:  # name the stuck rank, then end the job
            call, waited = RollCall(self.comm, self.placement), waiting.waited
            if waiting.until(waited + grace(self.timeout), call):
                raise RankTimeout(f"{waited_in}, and every rank joined it {waiting.waited - self.timeout:.1f} s "
                                  f"later: a rank was late, not stuck. {advice}")
            raise RankTimeout(f"{said}. Roll call: {call.report(here, waiting.waited - waited)}. {advice}")
        # rank 0 is calling the roll and will end the job, or times out soon and will: leave it the word
        if waiting.until(2 * self.timeout + grace(self.timeout)):
            return
        if waiting.answered:
            raise RankTimeout(f"{said}; rank 0 called the roll but did not end the job: see its message")
        raise RankTimeout(f"{said}, and rank 0 did not call the roll within {self.timeout + grace(self.timeout):g} "
                          f"s more: rank 0 itself is stuck (stopped, deadlocked, or on a lost node). {advice}")

    def answer_roll_call(self, kind: str, waited: float) -> None:
        """Outside a wait, busy on purpose (an emulated sleep: `kind` "emulated"): answer rank 0's roll
        call, if one came, with where this rank is, so rank 0 does not take it for stuck."""
        if self.timeout and self.comm.rank != ROOT:
            answer(self.comm, Position(Exchange.started + 1, kind, waited))

    def host(self, tensor: torch.Tensor) -> np.ndarray:
        """The host memory MPI moves for a flat torch tensor: a CPU tensor's own memory (no copy), or
        the pinned host buffer kept for a device tensor (reused every round: no new allocation; pinned,
        so the copies are DMA, about twice as fast as from pageable memory). A buffer whose copy to the
        device is still running is waited for before it is handed out again."""
        if tensor.device.type == "cpu":
            return tensor.numpy()
        key = _key(tensor)
        if key not in self._staging:
            pinned = torch.empty(tensor.numel(), dtype=tensor.dtype, pin_memory=True)
            self._staging[key] = (pinned, pinned.numpy())
        if key in self._in_flight:
            self._in_flight.pop(key).synchronize()
        return self._staging[key][1]

    def to_host(self, tensor: torch.Tensor) -> np.ndarray:
        """`tensor`'s values in host memory for MPI: its own memory, or copied into its host buffer."""
        host = self.host(tensor)
        if tensor.device.type != "cpu":
            self._staging[_key(tensor)][0].copy_(tensor, non_blocking=True)
            torch.cuda.current_stream(tensor.device).synchronize()  # MPI reads the buffer next
        return host

    def to_device(self, tensor: torch.Tensor) -> None:
        """What MPI wrote into `tensor`'s host buffer (`host(tensor)`), into the tensor itself: queued on
        the tensor's stream (the kernels that use it come after it there), not waited for here."""
        if tensor.device.type != "cpu":
            self.host(tensor)
            tensor.copy_(self._staging[_key(tensor)][0], non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(tensor.device))
            self._in_flight[_key(tensor)] = done

    def broadcast_tensor(self, tensor: torch.Tensor) -> None:
        """Root's flat torch tensor into every rank's, wherever it lives (see `host`), in `stage_bytes`
        pieces (`agree_pieces`: the calls must match on every rank). A device tensor crosses its pinned
        host buffer: the root copies the pieces on a side stream and hands each to MPI as soon as its copy
        is done, MPI moving the pieces it has while the next ones copy, so only the first piece's copy
        delays the broadcast; the other ranks queue the copy to the device (`to_device`)."""
        if self.data is not None:
            self._on_data_plane(*self.data.broadcast(tensor), "broadcast")
            return
        on_device, root = tensor.device.type != "cpu", self.comm.rank == ROOT
        host = self.host(tensor)
        spans = _spans(tensor.numel(), max(1, min(self.stage_bytes, self.chunk_bytes) // tensor.element_size()))
        if on_device and root:
            requests = []
            for (start, stop), done in zip(spans, self._copied_to_host(tensor, spans)):
                while not done.query():
                    MPI.Request.Testall(requests)  # lets MPI move the pieces it already has
                requests.append(self.comm.Ibcast(host[start:stop], root=ROOT))
        else:
            requests = [self.comm.Ibcast(host[start:stop], root=ROOT) for start, stop in spans]
        self.wait(requests, "broadcast")
        if on_device and not root:
            self.to_device(tensor)

    def agree_pieces(self, device: torch.device) -> None:
        """The model broadcast's pieces on MPI's host path: STAGE_BYTES where every rank stages a device
        tensor (the root's copies then overlap MPI), else whole chunks (on this CPU 8 MiB pieces made a
        47 MB broadcast 1.15x slower at 3 ranks and 1.5-1.7x at 8). A start-up collective: the pieces
        must be the same on every rank."""
        everyone = all(kind == "cuda" for kind in self.comm.allgather(device.type))
        self.stage_bytes = STAGE_BYTES if everyone else self.chunk_bytes

    def _copied_to_host(self, tensor: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.cuda.Event]:
        """Queue each span's copy from the device tensor into its pinned host buffer on a side stream (after
        what the tensor's own stream has queued); an event per span says when its copy is done."""
        pinned = self._staging[_key(tensor)][0]
        if tensor.device not in self._side:
            self._side[tensor.device] = torch.cuda.Stream(tensor.device)  # one per device, kept
        side = self._side[tensor.device]
        side.wait_stream(torch.cuda.current_stream(tensor.device))
        events = []
        with torch.cuda.stream(side):
            for start, stop in spans:
                pinned[start:stop].copy_(tensor[start:stop], non_blocking=True)
                events.append(torch.cuda.Event())
                events[-1].record(side)
        return events

    def broadcast(self, buf: np.ndarray) -> None:
        """Root's `buf` into every rank's `buf` (same shape and dtype everywhere)."""
        self.wait([self.comm.Ibcast(piece, root=ROOT) for piece in self._pieces(buf)], "broadcast")

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
        self.wait(reqs, "allreduce" if everyone else "reduce")

    def reduce_data(self, buf: np.ndarray, op: MPI.Op = MPI.SUM, everyone: bool = False,
                    as_tensor=torch.from_numpy) -> None:
        """`reduce_sum` of a round's large buffer, on the data plane: MPI with `op`, or torch.distributed's
        sum of `as_tensor(buf)` (the codec's view of its payload: 16-bit floats for fp16 / bf16 bits)."""
        if self.data is None or not self.data.carries_host:
            self.reduce_sum(buf, op, everyone)
        else:
            self._on_data_plane(*self.data.reduce(as_tensor(buf), everyone), "allreduce" if everyone else "reduce")

    def reduce_tensor(self, tensor: torch.Tensor, everyone: bool = False) -> None:
        """Every rank's `tensor` summed into root's (into every rank's with `everyone`), where it lies, on
        the data plane (the direct path: mpifed.protocol)."""
        self._on_data_plane(*self.data.reduce(tensor, everyone), "allreduce" if everyone else "reduce")

    def _on_data_plane(self, works: list, finish, kind: str) -> None:
        self.wait(works, kind)
        finish()

    def gather_rows(self, row: np.ndarray, table: np.ndarray | None) -> None:
        """Fixed-size per-rank rows into root's (size, len(row)) table."""
        self.wait([self.comm.Igather(row, table if self.comm.rank == ROOT else None, root=ROOT)], "gather")

    def scatter_rows(self, table: np.ndarray | None, row: np.ndarray) -> None:
        """Root's (size, len(row)) table, one row to each rank (used once, when resuming)."""
        self.wait([self.comm.Iscatter(table if self.comm.rank == ROOT else None, row, root=ROOT)], "scatter")

    def arrive(self) -> None:
        """Wait, in this exchange's way, until every rank reaches this point. Start-up's pickled,
        blocking collectives come after it, so their waiting is polite and bounded by the timeout too."""
        self.wait([self.comm.Ibarrier()], "barrier")

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank passes True (one tiny allreduce)."""
        return bool(self.largest(int(flag)))

    def largest(self, value: int) -> int:
        """The largest of the ranks' values, on every rank (one tiny allreduce)."""
        buf = np.array([value], dtype=np.int64)
        self.wait([self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.MAX)], "allreduce")
        return int(buf[0])

    def move(self, sends: list[tuple[np.ndarray, int]], receives: list[tuple[np.ndarray, int]],
             kind: str = "move") -> None:
        """Point to point: each (buffer, rank) of `sends` to that rank, each of `receives` filled from its
        rank, waited for like a collective. Every rank calls it at the same step, with or without
        messages, so that the ranks' counts of waits stay in step for the roll call; messages between two
        ranks match in the order both sides list them (MPI does not let them overtake)."""
        requests = [self.comm.Isend(buf, dest=rank, tag=MOVE_TAG) for buf, rank in sends]
        requests += [self.comm.Irecv(buf, source=rank, tag=MOVE_TAG) for buf, rank in receives]
        self.wait(requests, kind)

    def gather_bytes(self, payload: np.ndarray | torch.Tensor) -> list[np.ndarray] | None:
        """Variable-size uint8 payloads to root (Gatherv with explicit counts and displacements).

        Root receives one host array per rank (its own included, normally empty). On a torch data plane the
        lengths travel by MPI and the payloads, padded to the longest, by the plane's gather, from where
        they lie (a payload encoded on the device: mpifed.protocol); MPI's own path takes host bytes."""
        if self.data is not None and self.data.carries_host:
            return self._gather_on_data_plane(payload)
        if isinstance(payload, torch.Tensor):
            payload = payload.cpu().numpy()
        counts = np.zeros(self.comm.size, dtype=np.int64) if self.comm.rank == ROOT else None
        self.wait([self.comm.Igather(np.array([payload.size], dtype=np.int64), counts, root=ROOT)], "gather")
        if self.comm.rank != ROOT:
            self.wait([self.comm.Igatherv(payload, None, root=ROOT)], "gather")
            return None
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        recv = np.empty(int(counts.sum()), dtype=np.uint8)
        self.wait([self.comm.Igatherv(payload, [recv, counts, displs, MPI.BYTE], root=ROOT)], "gather")
        return [recv[d: d + c] for d, c in zip(displs, counts)]

    def _gather_on_data_plane(self, payload: np.ndarray | torch.Tensor) -> list[np.ndarray] | None:
        payload = torch.from_numpy(payload) if isinstance(payload, np.ndarray) else payload
        counts = np.zeros(self.comm.size, dtype=np.int64)
        self.wait([self.comm.Iallgather(np.array([payload.numel()], dtype=np.int64), counts)], "allgather")
        width = int(counts.max())
        if width == 0:  # nothing to gather: the same number of waits on every rank all the same
            self.wait([], "gather")
            return [np.zeros(0, np.uint8)] * self.comm.size if self.comm.rank == ROOT else None
        mine = torch.zeros(width, dtype=torch.uint8, device=payload.device)
        mine[: payload.numel()] = payload
        rows = torch.empty((self.comm.size, width), dtype=torch.uint8) if self.comm.rank == ROOT else None
        self._on_data_plane(*self.data.gather(mine, rows), "gather")
        if rows is None:
            return None
        table = rows.numpy()
        return [table[rank, :count] for rank, count in enumerate(counts.tolist())]


MOVE_TAG = 7303
"""The tag of `Exchange.move`'s point-to-point messages (the roll call's are 7301 and 7302)."""


class _Waiting:
    """One wait's clock and polling: Testall, the polite back-off, and, once the wait is long, answering
    rank 0's roll call (or, on rank 0 after its timeout, collecting the answers)."""

    __slots__ = ("exchange", "requests", "number", "kind", "waited", "last", "pause", "answered", "listens",
                 "listened")

    def __init__(self, exchange: Exchange, requests: list[MPI.Request], number: int, kind: str):
        self.exchange, self.requests, self.number, self.kind = exchange, requests, number, kind
        self.waited, self.last, self.pause, self.answered = 0.0, time.monotonic(), 1e-6, False
        # only a client can be called, and only by a rank 0 that has a timeout (all ranks share it)
        self.listens = bool(exchange.timeout) and exchange.comm.rank != ROOT
        self.listened = ANSWER_AFTER

    def until(self, limit: float, call: RollCall | None = None) -> bool:
        """Poll until the requests complete (True) or `limit` seconds of waiting have passed (False);
        with `call`, also stop (False) once every rank answered it."""
        ex = self.exchange
        while not _complete(self.requests):
            if call is not None and call.complete():
                return False
            if ex.polite or call:
                time.sleep(self.pause)
                # a long wait (the server while clients compute) wakes up less often: each wake-up takes
                # a core from a computing rank; the latency added stays under 1% of the wait so far
                self.pause = min(2 * self.pause, max(ex.max_sleep, min(LONG_WAIT_SHARE * self.waited, LONG_WAIT_MAX)))
            now = time.monotonic()
            self.waited += now - self.last if now - self.last < SUSPENDED else 0.0
            self.last = now
            if self.waited > limit:
                return False
            if self.listens and self.waited > self.listened:  # a look every LISTEN_EVERY s: the grace is seconds
                self.listened = self.waited + LISTEN_EVERY
                self.answered |= answer(ex.comm, Position(self.number, self.kind, self.waited))
        return True


STAGE_BYTES = 8 * 2**20
"""Pieces of the model broadcast on MPI's host path (`Exchange.broadcast_tensor`): 8 MiB is about 0.4 ms of
a PCIe copy, and a 45 MB model makes six, so all but one piece's copy to the host overlaps MPI."""


def _spans(count: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, count)) for start in range(0, max(count, 1), step)]


def _key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.data_ptr(), tensor.numel(), tensor.dtype)


def _complete(requests: list) -> bool:
    """Whether every MPI request or torch work handle has completed; a torch work that failed raises here."""
    if not requests or isinstance(requests[0], MPI.Request):
        return MPI.Request.Testall(requests)
    if all(work.is_completed() for work in requests):
        for work in requests:
            work.wait()  # raises the collective's error (a peer that died), if any
        return True
    return False
