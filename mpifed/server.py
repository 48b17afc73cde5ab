"""The server's rounds: broadcast the model, sum the clients' weighted updates, step, log, evaluate.

The round's collectives are mpifed.protocol's (the clients run the same steps); what is the
server's own is here: aggregating, the scaling policy, the optimizer step, the log and evaluation.

Each client pre-multiplies its update by b_k / B, so the sum the server gets is g = sum_k (b_k / B) u_k
(from the MPI reduce for summable codecs, from its own validate-and-decode of the gathered payloads
for the others: mpifed.updates), the gradient of the union of all client batches
(E=1) or the batch-weighted average model delta (E>1). The BatchNorm statistics, appended to each
update, average the same way. Rank 0 alone writes files.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from mpifed import checkpoint
from mpifed.diskfull import resume_command
from mpifed.learn.tasks import Task
from mpifed.planning import StartupPlan
from mpifed.pool_model import PoolModel
from mpifed.progress import Progress
from mpifed.scaling import BatchController, ClientRound, ServerScalingPolicy, split_batch
from mpifed.optimizers import server_optimizer
from mpifed.placement import SERVER
from mpifed.protocol import STOP_ASKED, STOP_DIVERGED, RoundProtocol, UpdateLayout
from mpifed.runlog import CLIENT_FIELDS, ITER_FIELDS, RunWriter, column
from mpifed.sampling import ClientPool, predicted_seconds
from mpifed.schedule import learning_rate
from mpifed.session import Session
from mpifed.skipped import SkippedSteps


def straggler_wait(t_up: np.ndarray) -> np.ndarray:
    """Per-client time spent in the update collective beyond the quickest client's: the time it
    waited for the slowest one (the quickest client arrived last and waited least)."""
    return t_up - t_up.min()


def run_server(s: Session, writer: RunWriter, run_dir: Path, progress: Progress,
               plan: StartupPlan | PoolModel | None = None) -> dict:
    """The server's rounds; `plan` is the start-up performance model (a PoolModel when clients are
    pooled), None without one."""
    job, model = s.job, s.model
    protocol = s.protocol()
    lay, n = protocol.layout, model.n_params
    # [sum of updates | BatchNorm statistics | per-layer squares | per-coordinate squares, if any]
    agg = torch.zeros(lay.aggregate_size, dtype=torch.float32, device=s.device)
    grad = agg[:n]
    model.attach_grads(grad)
    optimizer = server_optimizer(s)
    policy = ServerScalingPolicy(job.scaling, [p.numel() for p in model.params], job.run.seed)
    test_x, test_y = s.dataset.tensors(_eval_indices(s))
    weights = s.batches / s.global_batch
    table = np.empty((s.world.size, len(ITER_FIELDS)))
    row = np.full(len(ITER_FIELDS), np.nan)
    nbytes, nbytes_up = model.size * 4, protocol.nbytes_up
    senders = s.placement.workers  # ranks that send an update: one per client, or each pooled worker once
    pool = _client_pool(s, plan)
    pool_model = plan if isinstance(plan, PoolModel) else None
    plan = plan if isinstance(plan, StartupPlan) else None
    if pool is not None:
        assignment = np.zeros((4, s.placement.round_size), dtype=np.int64)
        clients = np.zeros((s.placement.round_size, len(CLIENT_FIELDS)))
    began = time.perf_counter()
    last_eval: dict = {}
    skips = SkippedSteps(job.train.max_skipped)

    controller, caps = None, []
    if job.scaling.grow_batch:
        # a client's batch is bounded by its memory (0: not sized) and by its own data
        caps = [min(int(m) if m > 0 else int(b), max(int(d), int(b)))
                for m, b, d in zip(s.max_batches, s.batches, s.data_sizes)]
        # the controller steers a round's batch: pooled, K of the N clients' batches on average
        k = s.placement.round_size  # (n is the parameter count, used below)
        controller = BatchController(s.global_batch * k // s.n_clients, sum(caps) * k // s.n_clients,
                                     job.scaling.batch_rate)
    online = plan.online_model() if plan is not None else None
    replanner = plan.replanner(s.batches, job.plan.replan_band) if plan is not None and job.plan.replan else None
    if s.resumed_from is not None:
        _restore(s, optimizer, policy, protocol, pool)
        if controller is not None:
            controller.load_state_dict(s.resumed_from["controller"])
        began -= float(s.resumed_from["wall"])  # the log's wall clock continues where it stopped
    if s.start_round == 0 and job.train.eval_every:  # the initial model: where every learning curve starts
        loss, acc = evaluate(model.module, test_x, test_y, job.train.eval_batch, s.device, s.task)
        last_eval = dict(round=0, test_loss=loss, test_acc=acc, wall=time.perf_counter() - began)
        writer.append_eval(last_eval)
    for rnd in range(s.start_round, job.train.rounds):
        row[:] = np.nan
        start = time.perf_counter()
        round_batch = s.global_batch
        if pool is not None:  # the round's K clients, on which ranks, from which cursors
            round_batch = int(s.batches[pool.assign(rnd, assignment)].sum())
            weights = s.batches[assignment[0]] / round_batch
            if pool_model is not None:  # from the placement, before the round
                s.t_iter_pred = pool_model.predict(assignment)
            protocol.share_assignment(assignment)
            protocol.move_residuals(assignment, pool.residuals)
        protocol.share_batches(s.batches)
        if protocol.batches_may_change and pool is None:  # pooled: the round's weights, above
            weights = s.batches / s.global_batch
        protocol.share_model(model.flat)
        t_down = time.perf_counter() - start

        t0 = time.perf_counter()
        received, t_up = protocol.receive_update(rnd, agg, weights, assignment if pool is not None else None)
        for message in received.messages:
            progress.warn(f"mpifed: {message}")

        lr = learning_rate(job.optim, rnd, job.train.rounds, round_batch)
        if job.train.local_steps > 1:
            lr = job.optim.server_lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats: dict = {}
        tail_ok = bool(torch.isfinite(agg[lay.tail]).all())  # False: a client diverged (summed, so unnamed)
        if received.ok and not tail_ok:
            progress.warn(f"mpifed: round {rnd + 1}: the clients' BatchNorm statistics or update norms hold a "
                          f"non-finite value (a client diverged): the server keeps its own statistics and "
                          f"skips this round's noise estimate")
        if received.ok:
            sampled = assignment[0] if pool is not None else None
            scaled, stats = policy.apply(rnd, grad, _client_round(s, agg, received, lay, tail_ok, sampled))
            if scaled is not grad:
                grad.copy_(scaled)
            optimizer.step()
            if tail_ok:
                model.flat[n:].copy_(agg[n: model.size])
        t_decode = time.perf_counter() - t0 - t_up

        t0 = time.perf_counter()
        done = rnd + 1
        due = done == job.train.rounds or (job.train.eval_every and done % job.train.eval_every == 0)
        if due:
            loss, acc = evaluate(model.module, test_x, test_y, job.train.eval_batch, s.device, s.task)
            last_eval = dict(round=done, test_loss=loss, test_acc=acc, wall=time.perf_counter() - began)
        t_eval = time.perf_counter() - t0

        values = dict(t_down=t_down, t_up=t_up, t_decode=t_decode, t_eval=t_eval, t_wait=t_up, t_emul=0.0,
                      t_iter=time.perf_counter() - start, batch=round_batch, rejected=len(received.rejected),
                      bytes_up=nbytes_up * senders, bytes_down=nbytes * senders,
                      grad_norm=stats.get("grad_norm", np.nan))
        for key, value in values.items():
            row[column(key)] = value
        if pool is not None:
            clients[:] = 0.0
            protocol.reduce_client_rows(clients)
            _complete_clients(s, clients, assignment, received.rejected)
        protocol.gather_rows(row, table)
        train_loss, train_acc = _complete_table(s, table, received.rejected, clients if pool is not None else None)
        skips.observe(done, received.ok, train_loss)
        writer.append_round(table, dict(stats, lr=lr, global_batch=round_batch, train_loss=train_loss,
                                        skipped=float(not received.ok), wall=time.perf_counter() - began,
                                        train_acc=train_acc),
                            clients if pool is not None else None)
        if due:  # after its round's row: a crash in between leaves no evaluation of an unlogged round
            writer.append_eval(last_eval)
        progress.update(done, train_loss, last_eval.get("test_acc"), round_batch * job.train.local_steps,
                        time.perf_counter() - start)
        if online is not None and rnd > s.start_round:  # a run's first round holds every rank's arrival
            online.observe(s.batches, table[s.placement.client_ranks, column("t_compute")], t_down, t_up,
                           t_decode, table[SERVER, column("t_iter")] - t_eval)  # the model predicts training rounds
        if pool_model is not None and rnd > s.start_round:
            pool_model.observe(clients, table[SERVER, column("t_iter")] - t_eval)
        _next_batches(s, done, stats, controller, caps, replanner, online, progress)
        if pool is not None and not np.array_equal(pool.batches, s.batches):  # grown: place by the new times
            pool.rebatch(s.batches, _client_seconds(s, pool_model))
        stop = protocol.agree_stop(STOP_DIVERGED if skips.diverged else STOP_ASKED if s.stop else 0)
        path = None
        if s.state_due(done, stop):
            path = _checkpoint(s, done, optimizer, policy, protocol, run_dir, time.perf_counter() - began,
                               controller.state_dict() if controller is not None else {}, pool)
        if stop == STOP_DIVERGED:
            progress.warn(f"mpifed: {skips.explain(job.optim.lr)}; "
                          + (f"checkpoint {path}" if path else "no checkpoint (checkpoint.every = 0)"))
            return dict(last_eval, diverged=done)
        if stop:
            progress.print(f"mpifed: stopped by a signal after round {done}; checkpoint {path}; "
                           f"continue with: {resume_command(run_dir, s.world.size)}")
            return dict(last_eval, stopped=done)

    checkpoint.save_model(run_dir, model.module.state_dict())
    return last_eval


def _client_pool(s: Session, plan) -> ClientPool | None:
    """The sampler and placer of pooled clients (mpifed.sampling), placing by the performance model's
    times where a plan exists, else by samples over speed; None with one client per rank."""
    if not s.placement.pooled:
        return None
    c = s.job.clients
    return ClientPool(s.job.run.seed, s.batches, _client_seconds(s, plan), s.data_sizes,
                      s.placement.round_size, s.placement.workers, s.job.train.local_steps,
                      by_data=c.sampling == "data", balanced=c.placement == "balanced")


def _client_seconds(s: Session, plan) -> np.ndarray:
    """Each pooled client's predicted time at its batch: the performance model's, else samples / speed."""
    if isinstance(plan, PoolModel):
        plan.rebatch(s.batches)
        return plan.client_seconds()
    names = s.profile_names  # a speed per profile, spread to the clients: O(profiles) lookups, not O(clients)
    speeds = names.per_client(np.array([s.job.profile(name).speed for name in names.names], dtype=np.float64))
    return predicted_seconds(s.batches, speeds, s.job.train.local_steps)


def _complete_clients(s: Session, clients: np.ndarray, assignment: np.ndarray, rejected: list[int]) -> None:
    """The pooled clients' table: what the server knows (id, rank, samples, rejections) beside what the
    workers sent."""
    ids, ranks = assignment[0], assignment[1]
    clients[:, CLIENT_FIELDS.index("id")] = ids
    clients[:, CLIENT_FIELDS.index("rank")] = ranks
    clients[:, CLIENT_FIELDS.index("batch")] = s.batches[ids] * s.job.train.local_steps
    clients[:, CLIENT_FIELDS.index("rejected")] = np.isin(ids, rejected)


def _complete_table(s: Session, table: np.ndarray, rejected: list[int],
                    clients: np.ndarray | None) -> tuple[float, float]:
    """What only the server knows, into the gathered round table: the prediction (on every rank's row,
    since a client's round spans the same interval), each client rank's wait for the slowest, which
    clients were rejected, and the batch-weighted training loss and metric (returned; pooled: over the
    round's clients, whose table is `clients`)."""
    ranks = s.placement.worker_ranks
    table[:, column("t_iter_pred")] = s.t_iter_pred
    table[ranks, column("t_wait")] = straggler_wait(table[ranks, column("t_up")])
    table[ranks, column("rejected")] = 0
    if clients is None:
        table[[s.placement.rank_of(k) for k in rejected], column("rejected")] = 1
    else:  # a worker's count of rejected clients
        on = clients[:, CLIENT_FIELDS.index("rank")].astype(np.int64)
        table[ranks, column("rejected")] = np.bincount(on, clients[:, CLIENT_FIELDS.index("rejected")],
                                                      minlength=len(ranks) + 1)[ranks]
    if clients is None:
        batches, losses, accs = (table[ranks, column(f)] for f in ("batch", "loss", "acc"))
    else:
        batches, losses, accs = (clients[:, CLIENT_FIELDS.index(f)] for f in ("batch", "loss", "acc"))
    train_loss, train_acc = (float(np.dot(batches, values) / batches.sum()) for values in (losses, accs))
    table[SERVER, column("loss")], table[SERVER, column("acc")] = train_loss, train_acc
    return train_loss, train_acc


def _next_batches(s: Session, done: int, stats: dict, controller: BatchController | None, caps: list[int],
                  replanner, online, progress: Progress) -> None:
    """The next round's batches and its predicted time: grown towards the noise scale (scaling.grow_batch;
    pooled: every client's batch, so that K of them hold the grown batch on average),
    or re-split where the step times drifted from the plan (plan.replan); the clients learn them from
    the next round's first broadcast."""
    if controller is not None:
        grown = controller.update(stats.get("noise_scale", float("nan")))
        k, n = s.placement.round_size, s.n_clients  # pooled: the controller steers a round's K clients
        if grown != s.global_batch * k // n:
            s.batches = np.array(split_batch(grown * n // k, caps), dtype=np.int64)
    if replanner is not None and replanner.observe(online.curves()):
        s.batches = np.array(replanner.batches, dtype=np.int64)
        progress.print(f"mpifed: round {done}: step times drifted from the plan; batches now "
                       f"{', '.join(map(str, s.batches))} (speed factors "
                       f"{', '.join(f'{v:.2f}' for v in online.speed)})")
    if online is not None:  # from this round and the ones before
        s.t_iter_pred = online.predict(s.batches).t_round


def _client_round(s: Session, agg: torch.Tensor, received, lay: UpdateLayout, tail_ok: bool,
                  sampled: np.ndarray | None = None) -> ClientRound:
    """The clients' statistics for the scaling policy, out of the reduced tail (and the decoded squares);
    none when the tail is not finite (the policy then estimates nothing this round). `sampled`: the
    round's pooled clients (None: every client)."""
    # a rejected client is left out of the decoded sums (which are rescaled to the others' weight)
    rejected = set(received.rejected)
    ids = range(s.n_clients) if sampled is None else sampled.tolist()
    batches = [int(s.batches[k]) for k in ids if k not in rejected]
    if not tail_ok:
        return ClientRound(batches)
    layer_sq = agg[lay.layer_sq] * (s.global_batch if sampled is None else int(s.batches[sampled].sum()))
    if not lay.route:
        return ClientRound(batches, weighted_sq=layer_sq)
    return ClientRound(batches, weighted_sq=layer_sq, coordinate_sq=agg[lay.coordinate_sq])


def _checkpoint(s: Session, done: int, optimizer, policy, protocol: RoundProtocol, run_dir: Path, wall: float,
                controller: dict, pool: ClientPool | None) -> Path:
    """Collect every client's state (pooled: the server's own cursors) and write the checkpoint for
    resuming at round `done`."""
    pooled = {}
    if pool is None:
        cursors, residuals = protocol.collect_state()
    else:  # the residuals of the clients that have one, and which clients those are
        ids, table = protocol.collect_residuals(pool.holders, pool.residuals)
        cursors, residuals = torch.from_numpy(pool.cursors.copy()), torch.from_numpy(table)
        pooled = dict(residual_clients=torch.from_numpy(ids), client_seconds=torch.from_numpy(pool.seconds.copy()))
    payload = dict(round=done, identity=checkpoint.identity(s.job, s.n_clients), model=s.model.module.state_dict(),
                   optimizer=optimizer.state_dict(), policy=policy.state_dict(),
                   cursors=cursors, residuals=residuals, wall=wall,
                   batches=torch.from_numpy(s.batches.copy()), controller=controller, **pooled)
    return checkpoint.save(run_dir, payload, s.job.checkpoint.keep, s.world.size)


def _restore(s: Session, optimizer, policy, protocol: RoundProtocol, pool: ClientPool | None) -> None:
    """Load the checkpoint into the server and hand each client its cursor and residual (pooled: the
    server keeps the cursors, sends them with each round's assignment, and holds the residuals until
    their clients train). A checkpoint of either kind resumes either way: with one client per rank
    every client's residual is stored, pooled only those of clients that have one (`residual_clients`)."""
    state = s.resumed_from
    s.model.module.load_state_dict(state["model"])  # copies into the flat buffer's views
    optimizer.load_state_dict(state["optimizer"])
    policy.load_state_dict(state["policy"])
    residuals = state["residuals"]
    clients = state.get("residual_clients", torch.arange(len(residuals) if residuals.numel() else 0))
    if pool is None:
        if residuals.numel() and len(clients) != s.n_clients:  # a pooled checkpoint's: the others start at zero
            residuals = torch.zeros(s.n_clients, residuals.shape[1]).index_copy_(0, clients, residuals)
        protocol.hand_out_state(state["cursors"], residuals)
    else:
        seconds = state.get("client_seconds")  # what the placement balanced, so it places as before
        pool.restore(state["cursors"].numpy(), clients.numpy(), residuals.numpy(),
                     None if seconds is None or len(seconds) != s.n_clients else seconds.numpy())


def _eval_indices(s: Session) -> np.ndarray:
    n = len(s.dataset)
    return np.arange(min(n, s.job.data.eval_size) if s.job.data.eval_size else n)


@torch.no_grad()
def evaluate(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
             device: torch.device, task: Task) -> tuple[float, float]:
    """Mean loss and accuracy (per sample, or per token) over (x, y) by the task's loss and metric, in
    eval mode (BatchNorm uses running stats)."""
    module.eval()
    total_loss, correct, counted = 0.0, 0.0, 0
    for i in range(0, len(y), batch):
        xb, yb = x[i: i + batch].to(device), y[i: i + batch].to(device)
        loss, right, n = task.totals(module(xb), yb)
        total_loss, correct, counted = total_loss + loss, correct + right, counted + n
    module.train()
    return total_loss / counted, correct / counted
