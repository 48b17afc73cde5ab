"""`mpifed train`, once rank 0 has prepared the run (mpifed.rundir): each rank's role.

    mpirun -n 4 mpifed train                       # embedded default job, 3 clients
    mpirun -n 16 mpifed train --job jobs/hetero15.toml
    srun --mpi=pmi2 mpifed train --job jobs/x.toml
"""

from __future__ import annotations

import datetime
import sys

import h5py
import mpi4py
import torch
from mpi4py import MPI

import mpifed
from mpifed import runlock
from mpifed.client import prepare_client, run_client
from mpifed.cluster import DIVERGED, EXIT_CODES, STOPPED, World
from mpifed.config import Job, JobError
from mpifed.diskfull import continue_note
from mpifed.perf.report import predict_for
from mpifed.planning import plan_startup
from mpifed.pool_model import start_pool_model
from mpifed.progress import Progress
from mpifed.rundir import Start, write_job
from mpifed.runlog import RANK_COLUMNS, RunWriter
from mpifed.server import run_server
from mpifed.scaling import check_scaling
from mpifed.placement import SERVER
from mpifed.session import Session, agree_batches, gather_rank_facts, open_session, restore_batches, stop_if_asked
from mpifed.units import format_bytes
from mpifed.worker import agree_pooled_batches, prepare_worker, run_worker


def train(world: World, job: Job, start: Start, progress_mode: str) -> int:
    """Run this rank's role; return the exit code (0, STOPPED or DIVERGED)."""
    s = open_session(world, job)
    s.start_round, s.resumed_from, run_dir = start.round, start.checkpoint, start.run_dir
    pooled = s.placement.pooled  # several clients a rank, placed each round (mpifed.worker)
    if world.is_server:
        setup = None
    else:  # partition, data, memory sizing
        setup = prepare_worker(s) if pooled else prepare_client(s)
    stop_if_asked(s)
    if pooled:  # [plan]: a curve per profile, each round predicted from its placement
        agree_pooled_batches(s, None if setup is None else setup.caps)
        plan = start_pool_model(s, setup)
    else:
        plan = plan_startup(s, setup)  # [plan]: time steps and collectives, choose the batches
        agree_batches(s, 0 if setup is None else setup.batch)   # waits politely while clients prepare
    if start.round:
        restore_batches(s, start.checkpoint)
    k = s.placement.round_size
    check = check_scaling(job.scaling, s.global_batch * k // s.n_clients, k)
    if check:
        raise JobError("after memory sizing: " + "; ".join(check))
    if not world.is_server:
        return EXIT_CODES[run_worker(s, setup) if pooled else run_client(s, setup)]
    infos = gather_rank_facts(s, None)  # each client rank's /ranks row (client/worker._report_setup)
    infos[SERVER] = dict(role="server", host=world.host, device=str(s.device), profile="-", emulated=False,
                    speed=1.0, memory_budget=0.0, bandwidth=0.0, latency=0.0, data_size=len(s.dataset),
                    requested_batch=0, max_batch=0, batch=s.global_batch, sized_budget=0, budget_bound="")
    ranks = {key: [info[key] for info in infos] for key in RANK_COLUMNS}
    if pooled:
        s.data_sizes = [int(n) for n in infos[1]["data_sizes"]]
        memory_models = {f"memory.profile.{name}": record for name, record in infos[1]["memory_models"].items()}
        messages = sorted({info["message"] for info in infos[1:] if info["message"]})
    else:
        clients = s.placement.by_client(infos)
        s.max_batches = [int(info["max_batch"]) for info in clients]
        s.data_sizes = [int(info["data_size"]) for info in clients]
        memory_models = {f"memory.client{k}": info["memory_model"] for k, info in enumerate(clients)
                         if info["memory_model"]}
        messages = [info["message"] for info in clients if info["message"]]
    if start.checkpoint is not None:
        writer = RunWriter.reopen(run_dir / "run.h5", start.round, start.note, job.to_toml())
    else:
        writer = RunWriter(run_dir / "run.h5", _attrs(world, s), ranks, k if pooled else 0)
        for name, record in memory_models.items():
            writer.set_model_attrs(name, record)
        if plan is not None:
            plan.record(writer, run_dir)
        writer.begin_swmr()
    write_job(run_dir, job, world.size)  # set-up and the log succeeded: the job is what runs
    progress = Progress(progress_mode, job.train.rounds, job.train.eval_every or job.train.rounds)
    for line in budget_report(infos):
        progress.print(f"mpifed: {line}")
    for message in messages:
        progress.print(f"mpifed: memory model: {message}")
    for line in plan.describe() if plan is not None else ():
        progress.print(f"mpifed: {line}")
    if not pooled and plan is not None and start.round and s.batches.tolist() != plan.batches:
        s.t_iter_pred = predict_for(plan.profile, s.batches.tolist()).t_round  # what the rounds will run
        progress.print(f"mpifed: resuming with the checkpoint's batches {', '.join(map(str, s.batches))}, not "
                       f"this start-up plan's; predicted round {1e3 * s.t_iter_pred:.1f} ms")
    sampled = f" ({k} a round, on {s.placement.workers} ranks)" if pooled else ""
    progress.print(f"mpifed: {s.n_clients} clients{sampled} on {len(set(ranks['host']))} host(s), model "
                   f"{job.model.name} ({s.model.n_params:,} parameters), global batch "
                   f"{s.global_batch * k // s.n_clients}, log {run_dir / 'run.h5'}")
    try:
        final = run_server(s, writer, run_dir, progress, plan)
    except BaseException as err:
        if "--resume" not in str(err):  # a full disk's message already says how to go on
            err.add_note(continue_note(run_dir, world.size))
        raise
    finally:
        writer.close()
        progress.close()
    runlock.release(run_dir)  # ended of itself: nothing left to guard
    if "stopped" in final:
        return STOPPED
    if "diverged" in final:
        return DIVERGED
    progress.print(f"mpifed: done: test accuracy {final['test_acc']:.4f}, test loss {final['test_loss']:.4f} "
                   f"after {final['round']} rounds ({final['wall']:.1f} s); model in {run_dir / 'model.pt'}")
    return 0


def budget_report(infos: list[dict]) -> list[str]:
    """What bound the memory budgets the clients were sized against: one line per source (a cgroup,
    MemAvailable, SLURM's allocation, a GPU's free memory), naming its smallest budget and its ranks.
    The job's own profile budgets go unsaid: the job states them."""
    by_source: dict[str, list[int]] = {}
    for rank, info in enumerate(infos):
        if info.get("budget_source") and info["budget_source"] != "profile memory":
            by_source.setdefault(info["budget_source"], []).append(rank)
    lines = []
    for ranks in by_source.values():
        least = min(ranks, key=lambda r: infos[r]["sized_budget"])
        lines.append(f"memory budget {format_bytes(infos[least]['sized_budget'])} a rank ({_rank_runs(ranks)}), "
                     f"bound by {infos[least]['budget_bound']}")
    return lines


def _rank_runs(ranks: list[int]) -> str:
    """"ranks 1-4, 7": consecutive ranks as runs."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"


def _attrs(world: World, s: Session) -> dict:
    return dict(mpifed_version=mpifed.__version__, torch_version=torch.__version__,
                mpi4py_version=mpi4py.__version__, h5py_version=h5py.__version__,
                mpi_library=MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0],
                job=s.job.to_toml(), command=" ".join(sys.argv), world_size=world.size,
                started=datetime.datetime.now().isoformat(timespec="seconds"),
                wait_mode="sleep" if s.exchange.polite else "poll",
                data_plane=s.exchange.data_plane[0], data_plane_reason=s.exchange.data_plane[1],
                n_params=s.model.n_params, n_buffers=s.model.n_buffers)
