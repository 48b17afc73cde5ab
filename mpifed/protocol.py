"""One round's protocol: the order of its collectives and the update's wire layout, for both roles.

Every rank issues the same collectives in the same order, or the job deadlocks. So each step of a
round is written once, here, with its server side and its client side next to each other; training
(mpifed.server, mpifed.client), the start-up probe rounds (mpifed.probes) and `mpifed bench rounds`
all run these methods, and a new step is added in this one place. A round, top to bottom:

  0. clients  server -> workers  pooled clients only: the round's K clients, the rank that trains each,
                                 and each one's sampler cursor (mpifed.sampling; one int64 buffer)
  1. batches  server -> clients  every client's batch b_k, when they may change between rounds
  2. model    server -> clients  the flat model [parameters | float buffers], received in place
              (the clients now train: E local steps, mpifed.client; no collective)
  3. update   clients -> server  w_k u_k through the codec's channel (a reduce of summable payloads,
                                 or a gather the server validates client by client), then the
                                 dense tail by one reduce (codec none on a torch data plane: both
                                 in one reduce, where the update lies)
                                 (pooled: a worker sums its clients' weighted updates and sends once)
  4. rows     clients -> server  one fixed-size row of timings and metrics per rank, for the run log
                                 (pooled: and the (K, fields) metrics of the round's clients, by one reduce)
  5. stop     all                did any rank get a signal? (one tiny allreduce)
  6. state    clients -> server  after a round that checkpoints: each client's sampler cursor and
                                 error-feedback residual (resuming: server -> clients, before round 1)

The update on the wire (UpdateLayout), one float32 vector per client, w_k = b_k / B:

  [ w_k u_k (n parameters) | w_k BatchNorm statistics | w_k |u_k,l|^2 per layer | w_k u_k^2 per coordinate ]
    through the codec        `-------------------- the dense tail, summed by one reduce ------------------'

so the sums the server gets are the global batch's update, its BatchNorm statistics and the squared
norms the noise-scale estimate needs, with no extra round trip. The per-coordinate squares are
there only for the per-coordinate teacher with a summable codec ("reduce"); with a gathered codec
the server squares what it decodes ("decode"). The server's aggregate has the same layout, with the
decoded squares in the last n places for "decode".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from mpifed.compress import ErrorFeedback, PayloadError, RoundContext, make_codec
from mpifed.config import Job
from mpifed.exchange import Exchange
from mpifed.flat import FlatModel
from mpifed.placement import SERVER, Placement
from mpifed.updates import Received, UpdateChannel

STOP_ASKED = 1
"""agree_stop's reason when a rank was asked to stop (a signal): checkpoint and exit with STOPPED."""
STOP_DIVERGED = 2
"""agree_stop's reason when the server's steps were skipped train.max_skipped rounds in a row: exit with
DIVERGED, checkpointing first where checkpoint.every > 0."""


@dataclass(frozen=True)
class UpdateLayout:
    """Where each part of an update (and of the server's aggregate) lies; see the module docstring."""

    n: int        # parameters
    size: int     # parameters + float buffers (the flat model)
    layers: int   # parameter tensors, one squared norm each
    route: str    # per-coordinate squares: '' not needed, 'reduce' clients send them, 'decode' the server squares

    @classmethod
    def of(cls, model: FlatModel, per_coordinate: bool, summable: bool) -> UpdateLayout:
        route = ("reduce" if summable else "decode") if per_coordinate else ""
        return cls(model.n_params, model.size, len(model.params), route)

    @property
    def payload(self) -> int:
        """Floats of update, statistics and per-layer squares."""
        return self.size + self.layers

    @property
    def buffers(self) -> slice:
        return slice(self.n, self.size)

    @property
    def layer_sq(self) -> slice:
        return slice(self.size, self.payload)

    @property
    def coordinate_sq(self) -> slice:
        return slice(self.payload, self.payload + self.n)

    @property
    def tail(self) -> slice:
        """The dense tail, which every rank reduces: statistics, per-layer squares, reduced squares."""
        return slice(self.n, self.payload + self.n * (self.route == "reduce"))

    @property
    def update_size(self) -> int:
        """Floats of a client's update vector."""
        return self.tail.stop

    @property
    def aggregate_size(self) -> int:
        """Floats of the server's aggregate: the tail, and the decoded squares where it squares them."""
        return self.payload + self.n * bool(self.route)


def payload_size(model: FlatModel) -> int:
    """Floats in one update before any per-coordinate squares (what memory sizing holds per client)."""
    return model.size + len(model.params)


@dataclass(frozen=True)
class Sent:
    """A client's update, once sent: the norm of what the server decodes, and the seconds spent in
    collectives (the rest of the step is encoding)."""

    grad_norm: float
    comm_seconds: float


class RoundProtocol:
    """One rank's side of every round; the same object serves the server and a client (`is_server`)."""

    def __init__(self, exchange: Exchange, model: FlatModel, channel: UpdateChannel, placement: Placement,
                 rank: int, per_coordinate: bool = False, batches_may_change: bool = False):
        self.exchange, self.model, self.channel, self.placement = exchange, model, channel, placement
        self.layout = UpdateLayout.of(model, per_coordinate, channel.codec.summable)
        self.is_server = rank == SERVER
        self.batches_may_change = batches_may_change
        self.layer_sizes = [p.numel() for p in model.params]

    @property
    def nbytes_up(self) -> int:
        """Bytes one client uploads per round: the codec's payload plus the dense float32 tail."""
        return self.channel.nbytes + 4 * (self.layout.tail.stop - self.layout.tail.start)

    @property
    def direct(self) -> bool:
        """On a torch or device data plane, a summable codec's update is encoded, reduced and decoded where
        it lies (on the GPU with NCCL) on every rank, never staged through host memory. Codec none's payload
        is the update itself: it and its tail go in one reduce; another codec's payloads each go in their
        own (PowerSGD: P, then Q), then the tail. A gathered codec: see `encodes_on_device`."""
        return self.exchange.data is not None and self.channel.codec.on_device and self.channel.codec.summable

    @property
    def encodes_on_device(self) -> bool:
        """On a data plane, a client of a gathered codec encodes where its update lies, with its error
        feedback there too; only the compressed payload reaches the server's host-side validation. Pooled
        clients with error feedback encode on the host, where their residuals live: they move between
        ranks, and a residual on the device would cross to the host and back for every client trained."""
        codec = self.channel.codec
        return (self.exchange.data is not None and codec.on_device and not codec.summable
                and not (self.placement.pooled and codec.error_feedback))

    @property
    def up_collective(self) -> str:
        """The collective that carries the update: 'reduce' (summable codecs) or 'gatherv'."""
        return "reduce" if self.channel.codec.summable else "gatherv"

    # 0. clients (pooled) ----------------------------------------------------------------------------
    def share_assignment(self, assignment: np.ndarray) -> None:
        """The server's (4, K) int64 [client ids; their ranks; their sampler cursors; the rank holding each
        one's error-feedback residual] into every rank's, when clients are pooled (placed each round)."""
        if self.placement.pooled:
            self.exchange.broadcast(assignment)

    @property
    def pooled_feedback(self) -> bool:
        """Pooled clients with error feedback: their residuals move between ranks (below)."""
        return self.placement.pooled and self.channel.codec.error_feedback

    def move_residuals(self, assignment: np.ndarray, held: dict[int, np.ndarray]) -> None:
        """Error feedback with pooled clients: each of the round's clients' residual, from the rank that
        holds it (assignment row 3: -1 none yet, 0 the server after a resume, else the worker that last
        trained it) to the rank that trains it now, point to point. `held` is this rank's {client:
        residual}: what it sends leaves it; what it receives, or a new zero residual, joins it."""
        if not self.pooled_feedback:
            return
        me, n = self.exchange.comm.rank, self.channel.n
        sends, receives = [], []
        for client, rank, holder in zip(*assignment[[0, 1, 3]].tolist()):
            if holder == me and rank != me:
                sends.append((held.pop(client), rank))
            elif rank == me and holder != me:
                held[client] = np.zeros(n, dtype=np.float32)
                if holder >= 0:
                    receives.append((held[client], holder))
        self.exchange.move(sends, receives, "residuals")

    # 1. batches -------------------------------------------------------------------------------------
    def share_batches(self, batches: np.ndarray) -> None:
        """The server's b_k into every rank's `batches`, in rounds whose batches may have moved (the
        noise-scale controller or the re-planner)."""
        if self.batches_may_change:
            self.exchange.broadcast(batches)

    # 2. model ---------------------------------------------------------------------------------------
    def share_model(self, flat: torch.Tensor) -> None:
        """The server's flat model into every client's, in place (staging is the exchange's)."""
        self.exchange.broadcast_tensor(flat)

    # 3. update, client side -------------------------------------------------------------------------
    def send_update(self, rnd: int, update: torch.Tensor, weight: float, corrupt: str = "") -> Sent:
        """`update` holds u_k and the BatchNorm statistics; weight it by w_k, fill its tail, send it.

        The per-layer |u_k|^2 are those of what the server decodes, weighted like the update: the
        reduction then hands the server sum_k b_k |u_k|^2 / B for the noise-scale estimate. A lossless
        codec sends the update itself, whose norms the device computes fastest (foreach norms: 10x
        faster than squaring into a float64 temporary; relative difference ~1e-4). `corrupt` is
        debug fault injection."""
        lay, ex = self.layout, self.exchange
        update.mul_(weight)
        if self.direct or self.encodes_on_device:
            return self._send_direct(rnd, update, weight, corrupt)
        host = ex.to_host(update)
        sent = self.channel.send(host[: lay.n], rnd, corrupt)
        lossless = self.channel.lossless
        layers = self.model.param_view(update) if lossless else torch.from_numpy(sent).split(self.layer_sizes)
        layer_sq = torch.stack(torch._foreach_norm(layers)).double().square().cpu().numpy()
        if lay.route == "reduce":  # in place in the tail: no n-sized temporary per round
            coordinate_sq = np.square(sent, out=host[lay.coordinate_sq])
            coordinate_sq /= np.float32(weight)
        host[lay.layer_sq] = layer_sq / weight
        t0 = time.perf_counter()
        ex.reduce_data(host[lay.tail])
        return Sent(float(np.sqrt(layer_sq.sum())) / weight, self.channel.comm_seconds + time.perf_counter() - t0)

    def _send_direct(self, rnd: int, update: torch.Tensor, weight: float, corrupt: str) -> Sent:
        """`send_update` on the device (`direct`, `encodes_on_device`): the host path's payload, error
        feedback and tail, computed there. Codec none sends the update and the tail in one reduce; another
        summable codec exchanges its payloads first; a gathered one's payload goes to the server by the
        gather; then the tail, by one reduce."""
        lay, codec, channel, ex = self.layout, self.channel.codec, self.channel, self.exchange
        lossless, feedback = channel.lossless, channel.feedback
        if lossless:  # as the host path: a lossless codec's norms are the clean update's
            layer_sq = torch.stack(torch._foreach_norm(self.model.param_view(update))).double().square()
        if corrupt == "nan":
            update[0] = float("nan")
        x = update[: lay.n]
        if feedback is not None:
            x = x + feedback.on(x.device)
        ctx = RoundContext(channel.seed, rnd, channel.client)
        seconds, payload = 0.0, None
        if lossless:
            sent = x
        elif codec.summable:
            (_, sent), seconds = self._exchange_on_device(x, ctx, keep_own=True)
        else:
            payload, sent = self._encoded_on_device(x, ctx, corrupt)
        if feedback is not None:
            feedback.update_tensor(x, sent)
        if not lossless:
            layer_sq = torch.stack(torch._foreach_norm(self.model.param_view(sent))).double().square()
        if lay.route == "reduce":
            squares = update[lay.coordinate_sq]
            torch.square(sent, out=squares)
            squares.div_(torch.tensor(weight, dtype=squares.dtype, device=squares.device))
        update[lay.layer_sq] = (layer_sq / weight).to(update.dtype)
        t0 = time.perf_counter()
        if lossless:
            ex.reduce_tensor(update[: lay.update_size])
        else:
            if payload is not None:
                channel.send_payload(payload)
            ex.reduce_tensor(update[lay.tail])
        return Sent(float(np.sqrt(layer_sq.cpu().numpy().sum())) / weight, seconds + time.perf_counter() - t0)

    def _encoded_on_device(self, x: torch.Tensor, ctx: RoundContext, corrupt: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """A gathered codec's payload of x, and what the server will decode of it, both where x lies."""
        codec = self.channel.codec
        payload = codec.encode_tensor(x, ctx)
        return _corrupted_payload(payload, corrupt), codec.decode_tensor(payload, x.numel(), ctx)

    def _exchange_on_device(self, x: torch.Tensor, ctx: RoundContext, keep_own: bool = False
                            ) -> tuple[tuple[torch.Tensor | None, torch.Tensor | None], float]:
        """A summable codec's phases where x lies, each payload reduced on the data plane (to every rank
        where the codec needs the sums); ((total, own), seconds in collectives). A non-finite sum of a
        multi-phase codec, which every rank sees, leaves a client nothing sent (the host path's rule)."""
        codec = self.channel.codec
        everyone = codec.all_ranks_need_sum
        steps, seconds = codec.phases_tensor(x, ctx, keep_own), 0.0
        payload = next(steps)
        while True:
            t0 = time.perf_counter()
            self.exchange.reduce_tensor(payload, everyone)
            seconds += time.perf_counter() - t0
            try:
                payload = steps.send(payload if (everyone or self.is_server) else None)
            except StopIteration as done:
                return done.value, seconds
            except PayloadError:
                if self.is_server:
                    raise
                return (None, torch.zeros_like(x)), seconds

    # 3. update, a pooled worker's side: add_client per client trained, then send_sum once -----------
    def add_client(self, rnd: int, update: torch.Tensor, weight: float, total: torch.Tensor, client: int,
                   feedback: ErrorFeedback | None = None, corrupt: str = ""
                   ) -> tuple[np.ndarray | torch.Tensor | None, float]:
        """One client a pooled worker trained: `update` holds its u_k and BatchNorm statistics (and is
        weighted by w_k here); its share goes into the worker's `total`, laid out like an update:
        summable codecs add w_k u_k itself (they are linear: encoding the worker's sum sends what its
        clients' encodings would add up to); gathered codecs encode the client's own payload, returned
        for `send_sum`, with the client's error feedback (without it, on a data plane: on the device).
        Either way the tail gets the weighted statistics, w_k |u_k,l|^2 of what the server decodes, and
        w_k u_k^2 where the squares are reduced.
        Returns (the payload or None, the norm of the client's update as the server decodes it)."""
        lay = self.layout
        update.mul_(weight)
        payload = None
        if self.channel.codec.summable:
            total[: lay.size].add_(update[: lay.size])
            layers = self.model.param_view(update)
            if lay.route == "reduce":
                total[lay.coordinate_sq].addcmul_(update[: lay.n], update[: lay.n], value=1.0 / weight)
        elif self.encodes_on_device:  # no error feedback (`encodes_on_device`)
            if corrupt == "nan":
                update[0] = float("nan")
            payload, sent = self._encoded_on_device(update[: lay.n], RoundContext(self.channel.seed, rnd, client),
                                                    corrupt)
            total[lay.buffers].add_(update[lay.buffers])
            layers = self.model.param_view(sent)
        else:
            host = self.exchange.to_host(update)
            payload, sent = self.channel.encode(host[: lay.n], rnd, client, feedback, corrupt)
            total[lay.buffers].add_(update[lay.buffers])
            layers = torch.from_numpy(sent).to(total.device).split(self.layer_sizes)
        layer_sq = torch.stack(torch._foreach_norm(layers)).double().square()
        total[lay.layer_sq] += (layer_sq / weight).to(total.dtype)
        return payload, float(layer_sq.sum().sqrt()) / weight

    def send_sum(self, rnd: int, total: torch.Tensor, payloads: list[np.ndarray | torch.Tensor]) -> float:
        """A pooled worker's update, once for all its clients (`add_client`): the summed payload (summable
        codecs) or its clients' payloads (gathered), then the tail by the round's one reduce. A worker
        with no client this round sends zeros and no payload. Returns the seconds spent in collectives."""
        lay, ex = self.layout, self.exchange
        if self.direct:
            if self.channel.lossless:
                t0 = time.perf_counter()
                ex.reduce_tensor(total[: lay.update_size])
                return time.perf_counter() - t0
            _, seconds = self._exchange_on_device(total[: lay.n], RoundContext(self.channel.seed, rnd, None))
            t0 = time.perf_counter()
            ex.reduce_tensor(total[lay.tail])
            return seconds + time.perf_counter() - t0
        host = ex.to_host(total)
        if self.channel.codec.summable:
            self.channel.send(host[: lay.n], rnd, "")
        else:
            self.channel.send_payloads(payloads)
        t0 = time.perf_counter()
        ex.reduce_data(host[lay.tail])
        return self.channel.comm_seconds + time.perf_counter() - t0

    # 3. update, server side -------------------------------------------------------------------------
    def receive_update(self, rnd: int, aggregate: torch.Tensor, weights: np.ndarray,
                       assignment: np.ndarray | None = None) -> tuple[Received, float]:
        """The clients' decoded, summed update into `aggregate` (layout above); returns what arrived and
        the seconds spent in collectives. Pooled: `assignment` is the round's (step 0), and `weights` are
        its clients' w_k in its order."""
        lay, ex = self.layout, self.exchange
        if self.direct:
            return self._receive_direct(rnd, aggregate)
        host = ex.host(aggregate)
        host[lay.tail].fill(0.0)  # the server's share of the tail's sum; receive zeroes the rest it fills
        squares = host[lay.coordinate_sq] if lay.route == "decode" else None
        if assignment is not None and not self.channel.codec.summable:
            received = self.channel.receive_pooled(rnd, host[: lay.n], assignment[0], assignment[1], weights, squares)
        else:
            received = self.channel.receive(rnd, host[: lay.n], weights, squares)
        t0 = time.perf_counter()
        ex.reduce_data(host[lay.tail])
        seconds = self.channel.comm_seconds + time.perf_counter() - t0
        ex.to_device(aggregate)
        return received, seconds

    def _receive_direct(self, rnd: int, aggregate: torch.Tensor) -> tuple[Received, float]:
        """`receive_update` on the device (`direct`): the server adds zeros (its encoding of zeros); a
        non-finite sum is refused as the host path refuses it (the codec's own check), after the tail."""
        lay, ex, codec = self.layout, self.exchange, self.channel.codec
        aggregate[: lay.update_size].zero_()
        problem, t0 = None, time.perf_counter()
        if self.channel.lossless:
            ex.reduce_tensor(aggregate[: lay.update_size])
            seconds = time.perf_counter() - t0
            if not bool(torch.isfinite(aggregate[: lay.n]).all()):
                problem = _refusal(codec, aggregate[: lay.n])
        else:
            try:
                (total, _), seconds = self._exchange_on_device(aggregate[: lay.n], RoundContext(self.channel.seed, rnd))
                aggregate[: lay.n] = total
            except PayloadError as err:
                problem, seconds = err, time.perf_counter() - t0
            t0 = time.perf_counter()
            ex.reduce_tensor(aggregate[lay.tail])
            seconds += time.perf_counter() - t0
        if problem is not None:
            return Received(False, [], [f"round {rnd + 1}: the summed update is not usable ({problem}); a summable "
                                        f"codec cannot say which client sent it: step skipped"]), seconds
        return Received(True), seconds

    # 4. rows ----------------------------------------------------------------------------------------
    def gather_rows(self, row: np.ndarray, table: np.ndarray | None = None) -> None:
        """Every rank's row of timings and metrics into the server's (ranks, fields) `table`."""
        self.exchange.gather_rows(row, table)

    def reduce_client_rows(self, rows: np.ndarray) -> None:
        """Pooled: the (K, fields) float64 metrics of the round's clients, each worker filling the rows of
        the clients it trained and zeros elsewhere, summed into the server's `rows`."""
        self.exchange.reduce_sum(rows)

    # 5. stop ----------------------------------------------------------------------------------------
    def agree_stop(self, asked: int) -> int:
        """Whether and why the run stops after this round, the same on every rank: the largest reason any
        rank gives (0: go on; STOP_ASKED: a SIGTERM, SIGUSR1 or Ctrl-C; STOP_DIVERGED: the server's
        steps were skipped for too long)."""
        return self.exchange.largest(int(asked))

    # 6. state, for a checkpoint ---------------------------------------------------------------------
    def send_state(self, cursor: int) -> None:
        """Client side: this client's sampler cursor and error-feedback residual, to the server."""
        self.exchange.gather_rows(np.array([cursor], dtype=np.int64), None)
        if self.channel.feedback is not None:
            self.exchange.gather_rows(self.channel.feedback.host(), None)

    def collect_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Server side: every client's (cursor, residual), in client order (no residuals: empty)."""
        ranks, n = self.placement.client_ranks, self.channel.n
        cursors = np.zeros((self.placement.world_size, 1), dtype=np.int64)
        self.exchange.gather_rows(np.zeros(1, dtype=np.int64), cursors)
        residuals = torch.zeros(0)
        if self.channel.codec.error_feedback:
            table = np.zeros((self.placement.world_size, n), dtype=np.float32)
            self.exchange.gather_rows(np.zeros(n, dtype=np.float32), table)
            residuals = torch.from_numpy(table[ranks])
        return torch.from_numpy(cursors[ranks, 0]), residuals

    def hand_out_state(self, cursors: torch.Tensor, residuals: torch.Tensor) -> None:
        """Server side, resuming: each client's cursor and residual from the checkpoint, to that client."""
        ranks, n = self.placement.client_ranks, self.channel.n
        table = np.zeros((self.placement.world_size, 1), dtype=np.int64)
        table[ranks, 0] = cursors.numpy()
        self.exchange.scatter_rows(table, np.zeros(1, dtype=np.int64))
        if self.channel.codec.error_feedback:
            table = np.zeros((self.placement.world_size, n), dtype=np.float32)
            table[ranks] = residuals.numpy()
            self.exchange.scatter_rows(table, np.zeros(n, dtype=np.float32))

    def send_residuals(self, held: dict[int, np.ndarray]) -> None:
        """A pooled worker's side of a checkpoint with error feedback: every residual it holds, in client
        order, to the server."""
        if self.pooled_feedback:
            self.exchange.move([(held[k], SERVER) for k in sorted(held)], [], "residuals")

    def collect_residuals(self, holders: np.ndarray, held: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Server side: the residual of every pooled client that has one, from the rank holding it (or
        the server's own `held`): (client ids ascending, (M, n) float32). None kept: two empty arrays."""
        if not self.pooled_feedback:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.channel.n), dtype=np.float32)
        ids = np.flatnonzero(holders >= 0)
        table = np.zeros((len(ids), self.channel.n), dtype=np.float32)
        receives = []
        for row, client in zip(table, ids.tolist()):
            if holders[client] == SERVER:
                row[:] = held[client]
            else:
                receives.append((row, int(holders[client])))
        self.exchange.move([], receives, "residuals")
        return ids, table

    def receive_state(self) -> int:
        """Client side, resuming: this client's cursor (returned) and residual (into its channel)."""
        cursor = np.zeros(1, dtype=np.int64)
        self.exchange.scatter_rows(None, cursor)
        if self.channel.feedback is not None:
            self.exchange.scatter_rows(None, self.channel.feedback.residual)
        return int(cursor[0])


def update_channel(job: Job, model: FlatModel, exchange: Exchange, client: int | None) -> UpdateChannel:
    """The job's codec and error feedback over `exchange`, for `client` (None: the server)."""
    codec = make_codec(job.compress.codec, layers=list(model.layout), **job.compress.options)
    return UpdateChannel(codec, exchange, model.n_params, job.run.seed, client)


def round_protocol(job: Job, model: FlatModel, exchange: Exchange, placement: Placement, rank: int,
                   batches_may_change: bool = False) -> RoundProtocol:
    """A rank's protocol for the job: its own update channel (a client's carries its error feedback)."""
    channel = update_channel(job, model, exchange, placement.client_on(rank))
    return RoundProtocol(exchange, model, channel, placement, rank, job.scaling.per_coordinate, batches_may_change)


def _corrupted_payload(payload: torch.Tensor, corrupt: str) -> torch.Tensor:
    """debug.corrupt's payload faults (the host path's, in mpifed.updates): one byte short, or all 0xFF."""
    if corrupt == "truncate":
        return payload[:-1]
    if corrupt == "garbage":
        return torch.full_like(payload, 0xFF)
    return payload


def _refusal(codec, total: torch.Tensor) -> PayloadError:
    """The codec's own words for a non-finite sum (its validate names the first bad value)."""
    try:
        codec.validate(codec.payload_array(total), total.numel(), None)
    except PayloadError as err:
        return err
    return PayloadError(f"{codec.name} sum holds a non-finite value")
