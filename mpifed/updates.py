"""How a client's update reaches the server: codec, error feedback, validation, the collectives.

The update a client sends is its weighted gradient (or model delta) w_k u_k, w_k = b_k / B, as a
flat float32 vector of the model's parameters. What travels depends on the codec (job [compress]):
  summable codecs (none, fp16, bf16, randomk, powersgd) -> a reduce of equal-size payloads, the
      server decodes the sum; a non-finite sum cannot be traced to a client, so the round's step is
      skipped and logged.
  other codecs (topk, qsgd, sign, efsign) -> a gather of byte payloads; the server validates each
      one (length, index range, finite values), rejects the bad ones by client and round, and sums
      the rest, rescaled to the accepted clients' share of the weight.
BatchNorm statistics and the per-layer squared norms that feed the noise-scale estimate travel
beside the update as a small dense tail (one more reduce). Both go through the job's data plane
(comm.data: MPI, or torch.distributed's NCCL / gloo; mpifed.dataplane).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

from mpifed.compress import Codec, ErrorFeedback, PayloadError, RoundContext
from mpifed.compress.aggregate import aggregate
from mpifed.exchange import ROOT, Exchange


def _mpi_op(codec: Codec):
    """MPI.SUM where MPI can add the payload dtype, else the codec's in-place combine as a user op.

    MPICH calls the op once per reduction-tree step on a whole buffer (Exchange's piece), so the
    combine's own speed is the op's cost: it adds into MPI's inout buffer without temporaries.
    """
    if getattr(codec, "native_sum", True):
        return MPI.SUM

    def combine(inbuf, inoutbuf, datatype):
        codec.combine_into(np.frombuffer(inbuf, dtype=codec.payload_dtype),
                           np.frombuffer(inoutbuf, dtype=codec.payload_dtype))

    return MPI.Op.Create(combine, commute=True)


class _Collective:
    """The `allreduce(payload) -> sum | None` callable a summable codec's phases run through."""

    def __init__(self, codec: Codec, exchange: Exchange):
        self.exchange, self.codec, self.op = exchange, codec, _mpi_op(codec)
        self.everyone = getattr(codec, "all_ranks_need_sum", False)
        self.seconds = 0.0

    def __call__(self, payload: np.ndarray) -> np.ndarray | None:
        # allreduce overwrites the buffer on every rank: never hand the codec's own array to it
        buf = np.array(payload, copy=True) if self.everyone else np.ascontiguousarray(payload)
        t0 = time.perf_counter()
        self.exchange.reduce_data(buf, op=self.op, everyone=self.everyone, as_tensor=self.codec.sum_view)
        self.seconds += time.perf_counter() - t0
        return buf if (self.everyone or self.exchange.comm.rank == ROOT) else None


@dataclass
class Received:
    """What the server got this round."""

    ok: bool                                   # False: no usable update, skip the step
    rejected: list[int] = field(default_factory=list)  # client ids whose payload was refused
    messages: list[str] = field(default_factory=list)


class UpdateChannel:
    """One per rank. Clients `send`, the server `receive`, in the same order every round."""

    def __init__(self, codec: Codec, exchange: Exchange, n: int, seed: int, client: int | None):
        self.codec, self.exchange, self.n, self.seed, self.client = codec, exchange, n, seed, client
        self.collective = _Collective(codec, exchange) if codec.summable else None
        self._comm = 0.0
        self.feedback = ErrorFeedback(n) if (codec.error_feedback and client is not None) else None

    @property
    def lossless(self) -> bool:
        """The server decodes exactly what the client sent (codec none, no error feedback needed)."""
        return self.codec.name == "none"

    @property
    def comm_seconds(self) -> float:
        """Seconds the last send/receive spent in collectives (the rest is encoding/decoding)."""
        return self._comm + (self.collective.seconds if self.collective else 0.0)

    def _reset_clock(self) -> None:
        self._comm = 0.0
        if self.collective:
            self.collective.seconds = 0.0

    def _gather(self, payload: np.ndarray):
        t0 = time.perf_counter()
        out = self.exchange.gather_bytes(payload)
        self._comm += time.perf_counter() - t0
        return out

    @property
    def nbytes(self) -> int:
        """Bytes one client sends per round for the update (the codec's own count)."""
        return self.codec.payload_nbytes(self.n)

    def send(self, weighted: np.ndarray, rnd: int, corrupt: str = "") -> np.ndarray:
        """Send this client's weighted update; return what the server will decode from it (the
        codec's round trip, for error feedback and honest norms). `corrupt` is fault injection."""
        self._reset_clock()
        if self.codec.summable:
            ctx = RoundContext(self.seed, rnd, self.client)
            x = _corrupted(self.feedback.compensate(weighted) if self.feedback is not None else weighted, corrupt)
            try:
                own = self.codec.exchange(x, ctx, self.collective, keep_own=True).own
            except PayloadError:  # a multi-phase codec saw a non-finite sum on every rank
                own = np.zeros(self.n, np.float32)
            if self.feedback is not None:
                self.feedback.update(x, own)
            return own
        payload, own = self.encode(weighted, rnd, self.client, self.feedback, corrupt)
        self._gather(payload)
        return own

    def encode(self, weighted: np.ndarray, rnd: int, client: int, feedback: ErrorFeedback | None,
               corrupt: str = "") -> tuple[np.ndarray, np.ndarray]:
        """Gathered codecs: `client`'s payload for round `rnd`, and what the server will decode of it;
        `feedback` (the client's residual, or None) compensates the update and keeps what was dropped."""
        ctx = RoundContext(self.seed, rnd, client)
        x = _corrupted(feedback.compensate(weighted) if feedback is not None else weighted, corrupt)
        payload = self.codec.encode(x, ctx)
        own = self.codec.decode(payload, self.n, ctx)
        if corrupt == "truncate":
            payload = payload[:-1]
        elif corrupt == "garbage":
            payload = np.full_like(payload, 0xFF)
        if feedback is not None:
            feedback.update(x, own)
        return payload, own

    def send_payload(self, payload: torch.Tensor) -> None:
        """A client's payload encoded where its update lies (mpifed.protocol's direct path), by the gather."""
        self._reset_clock()
        self._gather(payload)

    def send_payloads(self, payloads: list[np.ndarray | torch.Tensor]) -> None:
        """A pooled worker's clients' payloads (gathered codecs), in one gather: their byte lengths as int64,
        then the payloads, in the order of the round's assignment (uint8 arrays, or tensors where they were
        encoded on the device)."""
        self._reset_clock()
        header = np.array([p.nbytes for p in payloads], dtype=np.int64).view(np.uint8)
        if payloads and isinstance(payloads[0], torch.Tensor):
            self._gather(torch.cat([torch.from_numpy(header).to(payloads[0].device), *payloads]))
        else:
            self._gather(np.concatenate([header, *payloads]))

    def receive_pooled(self, rnd: int, out: np.ndarray, ids: np.ndarray, ranks: np.ndarray, weights: np.ndarray,
                       squares: np.ndarray | None = None) -> Received:
        """Server side of `send_payloads`: each worker's bytes split into its clients' payloads, each then
        validated, rejected or summed by client id like one client per rank (`receive`)."""
        self._reset_clock()
        blobs = self._gather(np.zeros(0, np.uint8))
        payloads: list[np.ndarray] = [np.zeros(0, np.uint8)] * len(ids)
        messages = []
        for rank in np.unique(ranks):
            slots = np.flatnonzero(ranks == rank)
            split = split_payloads(blobs[rank], len(slots))
            if split is None:
                messages.append(f"round {rnd + 1}: rank {rank} sent {blobs[rank].size} bytes that do not split into "
                                f"its {len(slots)} clients' payloads; all of them are rejected")
                continue
            for slot, payload in zip(slots, split):
                payloads[slot] = payload
        return self._aggregated(rnd, payloads, ids.tolist(), out, weights, squares, messages)

    def receive(self, rnd: int, out: np.ndarray, weights: np.ndarray, squares: np.ndarray | None = None) -> Received:
        """Fill `out` with the decoded sum of the clients' weighted updates, and `squares` (gather codecs
        only) with sum_k w_k u_k^2 per coordinate over the accepted clients (see `aggregate`)."""
        self._reset_clock()
        ctx = RoundContext(self.seed, rnd)
        if squares is not None and self.codec.summable:
            raise ValueError(f"codec {self.codec.name!r} is summable: the server never sees single updates, "
                             f"so clients must reduce their squares themselves")
        if self.codec.summable:
            try:
                out.fill(0.0)  # the server's contribution; codec none sums into it where it lies
                total = self.codec.exchange(out, ctx, self.collective).total
                if total is not out:
                    out[:] = total
            except PayloadError as err:
                return Received(False, [], [f"round {rnd + 1}: the summed update is not usable ({err}); a summable "
                                            f"codec cannot say which client sent it: step skipped"])
            return Received(True)
        payloads = self._gather(np.zeros(0, np.uint8))[1:]
        return self._aggregated(rnd, payloads, list(range(len(payloads))), out, weights, squares)

    def _aggregated(self, rnd: int, payloads: list[np.ndarray], clients: list[int], out: np.ndarray,
                    weights: np.ndarray, squares: np.ndarray | None, messages: list[str] | None = None) -> Received:
        """Validate, reject by client id, decode and sum gathered payloads (mpifed.compress.aggregate)."""
        result = aggregate(self.codec, payloads, clients, self.n, self.seed, rnd, weights=weights, squares=squares,
                           out=out)
        messages = [*(messages or []), *(str(r) for r in result.rejections)]
        if not result.accepted:
            messages.append(f"round {rnd + 1}: every client's update was rejected: step skipped")
        return Received(bool(result.accepted), [r.client for r in result.rejections], messages)


def split_payloads(blob: np.ndarray, count: int) -> list[np.ndarray] | None:
    """`count` payloads out of one worker's bytes [count int64 lengths | payloads]; None when the bytes do
    not add up (the worker builds the lengths itself, so only a transport fault gets here)."""
    head = 8 * count
    if blob.size < head:
        return None
    lengths = np.frombuffer(blob[:head].tobytes(), dtype=np.int64)
    if (lengths < 0).any() or head + int(lengths.sum()) != blob.size:
        return None
    ends = head + np.cumsum(lengths)
    return [blob[end - size: end] for end, size in zip(ends, lengths)]


def _corrupted(x: np.ndarray, corrupt: str) -> np.ndarray:
    """debug.corrupt = "nan": a copy of the update with one NaN; else the update itself."""
    if corrupt != "nan":
        return x
    x = x.copy()
    x[0] = np.nan
    return x
