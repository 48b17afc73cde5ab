"""PowerSGD: rank-r approximation of each layer's gradient matrix by one power iteration (Vogels et al. 2019).

Each layer with a weight of 2+ dimensions is viewed as a matrix M (rows = shape[0], cols = the rest,
so a conv kernel (out, in, kh, kw) is out x in*kh*kw). Per round, on every rank in the same order:

  phase 1  P_i = M_i Q          Allreduce -> P = sum_i P_i, orthonormalized (reduced QR) to P^
  phase 2  Q_i = M_i^T P^       Allreduce -> Q = sum_i Q_i
  result   P^ Q^T = P^ P^^T sum_i M_i       (the projection of the summed gradient)

so the result is linear in the client updates: the factors are summable and travel by Allreduce
(clients need P^ for phase 2, and Q for the next round's warm start). Layers that would not shrink,
(rows + cols) r >= rows cols, and all 1-D parameters (biases, norms) ride dense in phase 1.

Warm start (default on) reuses last round's summed Q as this round's Q, so the power iteration
continues across rounds; every rank holds the same Q because every rank received the same sums.
The first Q is drawn from the shared stream of the first round. Error feedback is on by default,
as in the paper; `own` for it is P^ Q_i^T, this rank's share of the result.

Bytes per client per round: 4 (sum over compressed layers of (rows + cols) r + dense values).
Memory: Q, 4 * sum cols * r bytes on every rank, plus P and Q buffers of the same order per round.

On the device (`phases_torch`): the same phases in torch ops (matmul, torch.linalg.qr) where the update
lies, Q kept there; only the fresh Q, drawn from the shared stream on the host as above (sum cols * r
values), is copied over. The factors agree with the host's to float32 rounding (another BLAS and QR).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from mpifed.compress.base import (
    F32, Exchanged, PayloadError, Phases, ReduceCodec, RoundContext, TensorPhases, as_flat_f32, check_count,
    check_finite, check_reduce_payload, register_codec,
)


class _Layer:
    """Where one parameter lives in the flat vector and how it is sent."""

    def __init__(self, name: str, shape: Sequence[int], offset: int, rank: int):
        self.name, self.offset = name, offset
        self.size = math.prod(int(d) for d in shape)
        self.rows = int(shape[0]) if len(shape) >= 2 else 0
        self.cols = self.size // self.rows if self.rows else 0
        self.rank = min(rank, self.rows, self.cols) if self.rows else 0
        self.compressed = self.rows > 0 and (self.rows + self.cols) * self.rank < self.size

    def matrix(self, x):
        """This layer's rows x cols view of the flat vector x (an array or a tensor)."""
        return x[self.offset:self.offset + self.size].reshape(self.rows, self.cols)


@register_codec("powersgd")
class PowerSGD(ReduceCodec):
    """rank: r, columns of P and Q per layer; default 4. Higher r: closer to dense, (rows + cols) * 4
    more bytes per layer per unit of r. The paper reaches full accuracy on CIFAR-10 ResNet-18 at r = 2-4.

    warm_start: reuse last round's Q (default True, as in the paper); False draws a fresh Q each round.
    layers: [(name, shape), ...] of the flat update, in order; given by make_codec, not the job file.
    """

    name = "powersgd"
    error_feedback_default = True
    needs_layers = True
    all_ranks_need_sum = True

    def __init__(self, layers: Sequence[tuple[str, Sequence[int]]], rank: int = 4, warm_start: bool = True,
                 *, error_feedback: bool | None = None):
        super().__init__(error_feedback=error_feedback)
        if isinstance(rank, bool) or int(rank) != rank or rank < 1:
            raise ValueError("powersgd rank is the number of factor columns per layer, a positive integer; "
                             f"got {rank!r}")
        if not layers:
            raise ValueError("powersgd needs the layer shapes of the update vector, got an empty list")
        self.rank, self.warm_start = int(rank), bool(warm_start)
        self.layers: list[_Layer] = []
        offset = 0
        for name, shape in layers:
            self.layers.append(_Layer(name, shape, offset, self.rank))
            offset += self.layers[-1].size
        self.n = offset
        self._compressed = [layer for layer in self.layers if layer.compressed]
        self._dense = [layer for layer in self.layers if not layer.compressed]
        self.p_count = sum(l.rows * l.rank for l in self._compressed) + sum(l.size for l in self._dense)
        self.q_count = sum(l.cols * l.rank for l in self._compressed)
        self._q: list[np.ndarray] | None = None  # warm-start state, identical on every rank

    def options(self) -> dict[str, Any]:
        return {"rank": self.rank, "warm_start": self.warm_start, **super().options()}

    def payload_nbytes(self, n: int) -> int:
        self._check_n(check_count(n))
        return 4 * (self.p_count + self.q_count)

    def _check_n(self, n: int) -> None:
        if n != self.n:
            raise ValueError(f"powersgd was built for layers totalling {self.n} values, got an update of {n}")

    def _start_q(self, ctx: RoundContext) -> list[np.ndarray]:
        gen = ctx.shared_rng("powersgd-q")
        fresh = [gen.standard_normal((l.cols, l.rank), dtype=F32) for l in self._compressed]
        if self._q is None or not self.warm_start:
            return fresh
        # A layer whose summed Q came back all zero (its gradient was zero) would stay zero forever.
        return [q if q.any() else f for q, f in zip(self._q, fresh)]

    def phases(self, x: Any, ctx: RoundContext, keep_own: bool = False) -> Phases:
        total, own = yield from self._power_iteration(as_flat_f32(x), self._start_q(ctx), _HOST, keep_own)
        return Exchanged(total, own)

    on_device = True

    def phases_torch(self, x: torch.Tensor, ctx: RoundContext, keep_own: bool = False) -> TensorPhases:
        """`phases` in torch ops on x's device (the module docstring)."""
        qs = [torch.as_tensor(q, device=x.device) for q in self._start_q(ctx)]
        return (yield from self._power_iteration(x, qs, _TORCH, keep_own))

    def _power_iteration(self, x, qs: list, ops: type, keep_own: bool):
        """The two phases on arrays or tensors (`ops`: the host's or torch's operations); returns (total, own)."""
        self._check_n(len(x))
        mats = [l.matrix(x) for l in self._compressed]

        p_sum = yield ops.cat([(m @ q).reshape(-1) for m, q in zip(mats, qs)]
                              + [x[l.offset:l.offset + l.size] for l in self._dense])
        p_sum = self._check_sum(p_sum, self.p_count, "P")
        p_hat, offset = [], 0
        for l in self._compressed:
            p_hat.append(ops.orthonormal(p_sum[offset:offset + l.rows * l.rank].reshape(l.rows, l.rank)))
            offset += l.rows * l.rank
        dense_sum = p_sum[offset:]

        q_local = [m.T @ p for m, p in zip(mats, p_hat)]
        q_sum = yield ops.cat([q.reshape(-1) for q in q_local]) if q_local else ops.empty(0, x)
        q_sum = self._check_sum(q_sum, self.q_count, "Q")
        q_new, offset = [], 0
        for l in self._compressed:
            q_new.append(ops.copy(q_sum[offset:offset + l.cols * l.rank].reshape(l.cols, l.rank)))
            offset += l.cols * l.rank
        self._q = q_new

        total = self._assemble(p_hat, q_new, dense_sum, ops)
        own = self._assemble(p_hat, q_local, x, ops, dense_from_x=True) if keep_own else None
        return total, own

    def _check_sum(self, summed, count: int, what: str):
        if summed is None:
            raise ValueError(f"powersgd needs the {what} sum on every rank: exchange it with Allreduce, not Reduce")
        if isinstance(summed, torch.Tensor):
            if summed.dtype != torch.float32 or summed.numel() != count:
                raise PayloadError(f"powersgd {what} payload must be {count} float32 values, got "
                                   f"{summed.numel()} {summed.dtype}")
            if not bool(torch.isfinite(summed).all()):
                check_finite(summed.cpu().numpy(), f"powersgd summed {what}")  # raises, naming the value
            return summed
        summed = check_reduce_payload(summed, F32, count, f"powersgd {what}")
        check_finite(summed, f"powersgd summed {what}")
        return summed

    def _assemble(self, p_hat: list, qs: list, dense, ops: type, dense_from_x: bool = False):
        out = ops.empty(self.n, dense)
        for l, p, q in zip(self._compressed, p_hat, qs):
            ops.matmul(p, q.T, out=l.matrix(out))
        offset = 0
        for l in self._dense:
            src = dense[l.offset:l.offset + l.size] if dense_from_x else dense[offset:offset + l.size]
            out[l.offset:l.offset + l.size] = src
            offset += l.size
        return out


class _HOST:
    """The host path's operations on numpy arrays (PowerSGD._power_iteration)."""

    cat, matmul = staticmethod(np.concatenate), staticmethod(np.matmul)

    @staticmethod
    def orthonormal(block: np.ndarray) -> np.ndarray:
        return np.linalg.qr(block, mode="reduced")[0].astype(F32)

    @staticmethod
    def copy(a: np.ndarray) -> np.ndarray:
        return a.copy()

    @staticmethod
    def empty(n: int, like: np.ndarray) -> np.ndarray:
        return np.empty(n, dtype=F32)


class _TORCH:
    """The same on tensors, on their device."""

    cat, matmul = staticmethod(torch.cat), staticmethod(torch.matmul)

    @staticmethod
    def orthonormal(block: torch.Tensor) -> torch.Tensor:
        return torch.linalg.qr(block).Q

    @staticmethod
    def copy(a: torch.Tensor) -> torch.Tensor:
        return a.clone()

    @staticmethod
    def empty(n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, dtype=torch.float32, device=like.device)
