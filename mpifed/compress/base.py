"""The codec interface, the per-round random context, payload errors and byte packing.

A codec turns one client's flat float32 update `x` (n values, already multiplied by the client's
aggregation weight b_k / B) into the buffers that cross MPI, and the server's buffers back into the
*sum* of the client updates. Codecs come in two kinds, by what the wire can do with them:

* `GatherCodec` (top-k, QSGD, sign): payloads are uint8 arrays that cannot be added, so they travel
  by Gatherv to rank 0, which validates each one (`validate`), decodes it and sums
  (see `aggregate.aggregate`). A bad payload costs only its own client.
* `ReduceCodec` (none, fp16/bf16, random-k with shared indices, PowerSGD): payloads of all ranks have
  the same length and dtype and their elementwise sum is meaningful, so MPI adds them on the way
  (Reduce/Allreduce) and rank 0 decodes one sum. A codec may need several collectives per round
  (PowerSGD: P, then Q); it says so as a generator, `phases`, that yields one payload per collective
  and receives that collective's sum. `exchange` drives it over any `allreduce` callable.
  A bad contribution poisons the sum, and the server cannot tell whose it was: a non-finite sum
  skips that round's step (see the module docstring of `aggregate`).

Shapes never travel: both ends know n (and, for PowerSGD, the layer shapes).
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Generator, NamedTuple, Sequence

import numpy as np
import torch

from mpifed.seeding import Purpose, rng as seeded_rng

F32 = np.dtype(np.float32)
U8 = np.dtype(np.uint8)


class PayloadError(ValueError):
    """A payload is malformed (length, index range, non-finite value); the message says which."""


@dataclass(frozen=True)
class RoundContext:
    """Who is encoding in which round: the keys of every codec random stream.

    seed: the run's seed (job `run.seed`). round: 0-based round number. client: the client id (not the
    rank), or None on the server, which has no private stream.
    """

    seed: int
    round: int
    client: int | None = None

    def __post_init__(self) -> None:
        if self.seed < 0 or self.round < 0 or (self.client is not None and self.client < 0):
            raise ValueError(f"RoundContext needs non-negative seed, round and client; got {self}")

    def rng(self, purpose: str) -> np.random.Generator:
        """This client's own stream for `purpose` this round (e.g. QSGD's stochastic rounding)."""
        if self.client is None:
            raise ValueError(f"a server-side RoundContext has no private stream for {purpose!r}; "
                             "give the client id, or use shared_rng for randomness common to all ranks")
        return seeded_rng(self.seed, Purpose.CODEC, self.round, _tag(purpose), 1, self.client)

    def shared_rng(self, purpose: str) -> np.random.Generator:
        """The stream every rank draws identically this round (e.g. random-k's indices)."""
        return seeded_rng(self.seed, Purpose.CODEC, self.round, _tag(purpose), 0, 0)


def _tag(purpose: str) -> int:
    # crc32, not hash(): Python salts str hashes per process, and every rank must agree.
    return zlib.crc32(purpose.encode())


class Exchanged(NamedTuple):
    """Result of one summable exchange on one rank.

    total: decoded sum of all ranks' updates (float32, n), or None on a rank that did not receive the
    final sum (a client under MPI Reduce). own: this rank's own update as the server will see it
    (float32, n), for error feedback; None unless asked for.
    """

    total: np.ndarray | None
    own: np.ndarray | None


def as_flat_f32(x: Any) -> np.ndarray:
    """A 1-D float32 numpy view of a torch tensor or array (no copy when it already is one)."""
    if hasattr(x, "detach"):  # a torch tensor: CPU numpy view, shares memory
        x = x.detach().cpu().float().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"codecs take the flat update vector (1-D), got shape {arr.shape}; "
                         "flatten and concatenate the parameter gradients first")
    if arr.dtype != F32:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"codecs take float32 updates, got dtype {arr.dtype}")
        arr = arr.astype(F32)
    return arr


def check_count(n: int) -> int:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"the update length n must be a positive integer, got {n!r}")
    return int(n)


# ---- byte packing: payloads are flat byte buffers made of typed parts -------------------------

def pack_parts(*parts: np.ndarray) -> np.ndarray:
    """Concatenate typed 1-D arrays into one uint8 payload (native byte order, no header)."""
    return np.concatenate([np.ascontiguousarray(p).reshape(-1).view(U8) for p in parts])


def empty_parts(spec: Sequence[tuple[Any, int]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """A new uint8 payload laid out per `spec` and typed views of its parts, for codecs that write
    each part in place rather than concatenating copies (pack_parts)."""
    payload = np.empty(parts_nbytes([(np.dtype(dt), c) for dt, c in spec]), dtype=U8)
    return payload, unpack_parts(payload, spec, "new")


def parts_nbytes(spec: Sequence[tuple[np.dtype, int]]) -> int:
    return sum(np.dtype(dt).itemsize * count for dt, count in spec)


def unpack_parts(payload: np.ndarray, spec: Sequence[tuple[Any, int]], what: str) -> list[np.ndarray]:
    """Split a uint8 payload into typed arrays per `spec` [(dtype, count), ...], checking its length.

    The arrays are views of the payload (possibly unaligned, which numpy handles).
    """
    payload = np.asarray(payload)
    if payload.dtype != U8 or payload.ndim != 1:
        raise PayloadError(f"{what} payload must be a 1-D uint8 array, got {payload.dtype} {payload.shape}")
    expected = parts_nbytes([(np.dtype(dt), c) for dt, c in spec])
    if payload.nbytes != expected:
        raise PayloadError(f"{what} payload has {payload.nbytes} bytes, expected {expected}")
    out, offset = [], 0
    for dt, count in spec:
        size = np.dtype(dt).itemsize * count
        out.append(payload[offset:offset + size].view(dt))
        offset += size
    return out


def check_finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise PayloadError(f"{what} holds a non-finite value (first at position {bad}: {values[bad]})")


# ---- the interface --------------------------------------------------------------------------

class Codec(ABC):
    """What every codec states: its name, its transport, its bytes, whether it wants error feedback.

    error_feedback: whether the client should keep a residual (`feedback.ErrorFeedback`, 4n bytes of
    client memory) and add it to the next update. Each codec has its own default (on for the biased
    top-k, EF-signSGD and PowerSGD, as their papers use them); the job file may override it.
    """

    name: ClassVar[str] = ""
    summable: ClassVar[bool]
    error_feedback_default: ClassVar[bool] = False
    needs_layers: ClassVar[bool] = False
    on_device: ClassVar[bool] = False  # encode_tensor / decode_tensor run where the update lies (below)

    def __init__(self, *, error_feedback: bool | None = None):
        self.error_feedback = self.error_feedback_default if error_feedback is None else bool(error_feedback)

    @abstractmethod
    def payload_nbytes(self, n: int) -> int:
        """Bytes this codec puts on the wire per client per round for n values (all phases)."""

    def options(self) -> dict[str, Any]:
        """The resolved options, for the run log."""
        return {"error_feedback": self.error_feedback}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({self.name!r}, {opts})"


class OneShot(Codec):
    """A codec with one payload per round: encode on the client, validate and decode on the server."""

    @abstractmethod
    def encode(self, x: Any, ctx: RoundContext) -> np.ndarray:
        """The flat payload for update x (torch tensor or array of n float32 values)."""

    @abstractmethod
    def validate(self, payload: np.ndarray, n: int, ctx: RoundContext) -> None:
        """Raise PayloadError naming the defect if `payload` is not safe to decode for n values."""

    @abstractmethod
    def decode(self, payload: np.ndarray, n: int, ctx: RoundContext) -> np.ndarray:
        """The n float32 values `payload` stands for; assumes `validate` passed."""

    def decode_add(self, payload: np.ndarray, n: int, ctx: RoundContext, total: np.ndarray,
                   squares: np.ndarray | None = None, weight: float = 1.0) -> None:
        """total += decode(payload); squares += decode(payload)^2 / weight if given. The server's sum,
        without keeping each client's decode; a sparse codec overrides it to touch only what it sent."""
        decoded = self.decode(payload, n, ctx)
        total += decoded
        if squares is not None:  # a decode may be a view of the payload: square into a new array
            square = np.square(decoded)
            square /= np.float32(weight)
            squares += square

    # On the device (`on_device`): the codec where the update lies, so that on a torch or device data
    # plane an update is never copied to host memory to be encoded (mpifed.protocol's direct path).
    # A CPU tensor's memory is host memory: there the host codec runs on it in place (its bits, and numpy's
    # speed, 3-15x that of torch's CPU ops for the bucketed codecs); on an accelerator, `encode_torch` and
    # `decode_torch`, the codec in torch ops, whose payload has the host payload's layout (the same bits
    # where both compute the same way, stated per codec) and is decoded by either side.
    def encode_tensor(self, x: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        """The payload of the flat float32 tensor `x`, on x's device."""
        if x.device.type == "cpu":
            return torch.from_numpy(self.encode(x.detach().numpy(), ctx))
        return self.encode_torch(x, ctx)

    def decode_tensor(self, payload: torch.Tensor, n: int, ctx: RoundContext) -> torch.Tensor:
        """The n float32 values a payload tensor stands for (a client's, or a sum), on its device."""
        if payload.device.type == "cpu":
            return torch.from_numpy(self.decode(payload.numpy(), n, ctx))
        return self.decode_torch(payload, n, ctx)

    def encode_torch(self, x: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        """`encode` in torch ops, on any device (what encode_tensor runs off the CPU)."""
        raise NotImplementedError(f"codec {self.name!r} encodes in host memory only")

    def decode_torch(self, payload: torch.Tensor, n: int, ctx: RoundContext) -> torch.Tensor:
        """`decode` in torch ops, on any device."""
        raise NotImplementedError(f"codec {self.name!r} decodes in host memory only")

    def payload_array(self, payload: torch.Tensor) -> np.ndarray:
        """A payload tensor as the host array `validate` checks (a copy to host memory)."""
        return payload.detach().cpu().numpy()


class GatherCodec(OneShot):
    """Payloads are uint8 buffers of any length, gathered (Gatherv) to the server and summed there."""

    summable = False


Allreduce = Callable[[np.ndarray], "np.ndarray | None"]
Phases = Generator[np.ndarray, "np.ndarray | None", Exchanged]
TensorPhases = Generator[torch.Tensor, "torch.Tensor | None", tuple["torch.Tensor | None", "torch.Tensor | None"]]


class ReduceCodec(Codec):
    """Payloads of all ranks add elementwise, so MPI sums them on the way.

    payload_dtype: dtype of every payload buffer. native_sum: True when MPI.SUM on that dtype is the
    right sum (float32 payloads); otherwise the exchange layer wraps `combine_into` in a user-defined
    MPI op. all_ranks_need_sum: True when clients need each collective's sum to go on (multi-phase codecs,
    warm-started state): use Allreduce; False: Reduce to rank 0 is enough. On the device, a multi-phase
    codec's `phases_tensor` runs its phases where the update lies (one-shot ones: encode_tensor, sum, decode_tensor).
    """

    summable = True
    payload_dtype: ClassVar[np.dtype] = F32
    native_sum: ClassVar[bool] = True
    all_ranks_need_sum: ClassVar[bool] = False

    def combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Elementwise sum of two payloads, in the payload's own encoding."""
        return a + b

    def combine_into(self, a: np.ndarray, b: np.ndarray) -> None:
        """b <- combine(a, b), in place: what an MPI user op must do with its inout buffer. Override
        it where a temporary-free sum is faster (the op runs once per reduction-tree step)."""
        b[...] = self.combine(a, b)

    def sum_view(self, payload: np.ndarray) -> torch.Tensor:
        """The payload as a tensor whose plain sum is `combine` (for a torch.distributed data plane, which
        sums natively); the payload's memory itself, so the sum lands in it."""
        if not self.native_sum:
            raise NotImplementedError(f"codec {self.name!r} has no tensor view for a torch data plane")
        return torch.from_numpy(payload)

    @abstractmethod
    def phases(self, x: Any, ctx: RoundContext, keep_own: bool = False) -> Phases:
        """Generator: yields each collective's payload, receives its sum (None if this rank gets none).

        Every rank, the server included with x = zeros(n), runs the same phases in the same order.
        Returns Exchanged(total, own).
        """

    def phases_tensor(self, x: torch.Tensor, ctx: RoundContext, keep_own: bool = False) -> TensorPhases:
        """`phases` where x lies: yields payload tensors, receives their sums (None where none arrives),
        returns (total, own) as tensors. On the CPU, `phases` itself on the tensors' memory (its bits and
        numpy's speed); elsewhere `phases_torch`."""
        if x.device.type != "cpu":
            return (yield from self.phases_torch(x, ctx, keep_own))
        steps = self.phases(x.detach().numpy(), ctx, keep_own)
        payload = next(steps)
        while True:
            summed = yield torch.from_numpy(np.ascontiguousarray(payload))
            try:
                payload = steps.send(None if summed is None else summed.numpy())
            except StopIteration as done:
                total, own = done.value
                return (None if total is None else torch.from_numpy(total)), (None if own is None else
                                                                            torch.from_numpy(own))

    def phases_torch(self, x: torch.Tensor, ctx: RoundContext, keep_own: bool = False) -> TensorPhases:
        """`phases` in torch ops, on any device."""
        raise NotImplementedError(f"codec {self.name!r} exchanges in host memory only")

    def exchange(self, x: Any, ctx: RoundContext, allreduce: Allreduce, keep_own: bool = False) -> Exchanged:
        """Run all phases, passing each payload through `allreduce` (which returns the sum or None)."""
        steps = self.phases(x, ctx, keep_own)
        payload = next(steps)
        while True:
            try:
                payload = steps.send(allreduce(payload))
            except StopIteration as done:
                return done.value


class OneShotReduce(OneShot, ReduceCodec):
    """A summable codec with one collective per round: its phases are encode, sum, decode."""

    def phases(self, x: Any, ctx: RoundContext, keep_own: bool = False) -> Phases:
        x = as_flat_f32(x)
        payload = self.encode(x, ctx)
        own = self.decode(payload, x.size, ctx) if keep_own else None
        total = yield payload
        if total is None:
            return Exchanged(None, own)
        self.validate(total, x.size, ctx)
        return Exchanged(self.decode(total, x.size, ctx), own)

    def phases_tensor(self, x: torch.Tensor, ctx: RoundContext, keep_own: bool = False) -> TensorPhases:
        """encode_tensor, the sum, decode_tensor: each where x lies (OneShot's rule for the CPU)."""
        n = x.numel()
        payload = self.encode_tensor(x, ctx)
        own = self.decode_tensor(payload, n, ctx) if keep_own else None
        total = yield payload
        if total is None:
            return None, own
        decoded = self.decode_tensor(total, n, ctx)
        if not bool(torch.isfinite(decoded).all()):
            self.validate(self.payload_array(total), n, ctx)  # names the value where the payload holds it
            raise PayloadError(f"{self.name} sum decodes to a non-finite value")
        return decoded, own


def check_reduce_payload(payload: np.ndarray, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    payload = np.asarray(payload)
    if payload.dtype != dtype or payload.ndim != 1:
        raise PayloadError(f"{what} payload must be a 1-D {dtype} array, got {payload.dtype} {payload.shape}")
    if payload.size != count:
        raise PayloadError(f"{what} payload has {payload.size} values, expected {count}")
    return payload


# ---- registry ---------------------------------------------------------------------------------

CODECS: dict[str, tuple[type[Codec], dict[str, Any]]] = {}


def register_codec(name: str, **preset: Any) -> Callable[[type[Codec]], type[Codec]]:
    """Register a codec class under `name`, with `preset` options fixed for that name.

    One class may be registered under several names (fp16/bf16, sign/efsign).
    """

    def add(cls: type[Codec]) -> type[Codec]:
        if name in CODECS:
            raise ValueError(f"codec name {name!r} registered twice")
        CODECS[name] = (cls, preset)
        return cls

    return add


def check_bucket(bucket: int, codec: str) -> int:
    if isinstance(bucket, bool) or int(bucket) != bucket or bucket < 1:
        raise ValueError(f"{codec} bucket is a number of values per scale and must be a positive integer, "
                         f"got {bucket!r}")
    return int(bucket)
